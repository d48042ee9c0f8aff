"""Join-aggregate as matrix products on tensor cores (Triton); the definition is in :mod:`gpulab.dbjoin.aggregate`.

1. Mix and partition both tables exactly as the tensor-core join does (:func:`tensorcore_join.partition`):
   a bijective mix of the key, the low R bits pick the partition; torch gathers keys and payloads into
   partition order (the interpreter has no indirect loads, and the kernel reads only contiguous ranges).
2. One Triton program per partition (``tensorcore_aggregate_kernel.tc_agg_kernel``): equality of keys is
   E = (codes . codes^T == K) on +-1 bit codes (tl.dot, tensor cores, for every code type). The per-row
   count and payload sum over E's columns are formed one of two ways (``agg_product``):

   * "dot" (the default for int8 aggregate products only): a second product ``tl.dot(E, P)`` with
     P = [7-bit limbs of payload + 2^31 (5 columns), a column of ones, zeros]: the ones column gives the match
     count, the limb columns the payload sums. Every product entry is at most BN * 127 < 2^24, so int8 (int32
     accumulate) is exact, as fp16/bf16 (fp32 accumulate) and fp32/tf32 would be in exact arithmetic.
   * "sum" (the default for fp16/bf16/fp32 aggregate products, int8 codes at block 16 included: their aggregate
     product is fp16): int64 row sums of E and of E * payload, no second dot. Why: on an NVIDIA H200 with
     Triton 3.6 (2026-11-27) the fp16/bf16 chained dot (the first dot's result as the second's A operand, which
     Triton on Hopper may feed from the MMA accumulator registers; cf. triton issue #6124) gave wrong groups
     (39 and 35 groups for 40) and, at 1M x 1M, an illegal memory access; int8's second dot was correct
     there. The "sum" path has so far run only under the interpreter, not yet on a GPU.

   Either way the sums are accumulated in int64 (wrapping modulo 2^64 like the references).
   L x R products give cR, SR per left row; L x L products (only for tiles with a match) give cL, SL and
   whether an equal key sits at an earlier left position, so exactly one left row per key writes
   (key, cL*cR, SL*cR, SR*cL), appended with one atomic per tile. The output has at most one row per
   distinct left key, so ``len(left)`` is an exact capacity and nothing is re-run.

Work: per partition (L x R + L x L) tiles of BM x BM x K for the equality and BM x BM x 16 for the aggregate
("dot"; "sum": BM x BM row sums on the CUDA cores), about twice the tensor-core join's products; no pair is ever
materialized.
"""
from __future__ import annotations

from gpulab.core.device import package_version, version_release
from gpulab.core.errors import DeviceError, InputError
from gpulab.dbjoin.aggregate import AGGREGATES, AggResult, check_int32_payload
from gpulab.dbjoin.tensorcore_join import CODE_DTYPES, check_block, check_key_dtypes, choose_bits, partition


def compiler_problem(block: int, triton_version: str | None = None) -> str | None:
    """Why this Triton cannot compile the aggregate kernel at tile ``block`` for a GPU, or None. Seen: Triton
    3.2's compiler aborts the process (an LLVM assertion, a SIGFPE for fp32) on it at BM 16 and 32, for every
    code type, for sm_80 and sm_90; 64 and 128 compile, and Triton 3.3 compiles all (tests/dbjoin AOT tests)."""
    tv = version_release(triton_version if triton_version is not None else package_version("triton"))
    if tv and tv < (3, 3) and block < 64:
        return (f"Triton {'.'.join(map(str, tv))}'s compiler crashes on the tensor-core aggregate kernel at "
                f"--tc-block {block}: use --tc-block 64 or 128, or triton>=3.3")
    return None


AGG_PRODUCTS = ("dot", "sum")


class TensorCoreAggregate:
    """``aggregate(lk, lp, rk, rp)`` on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1).

    ``agg_product``: how count and sum over the matching columns are formed (module docstring, step 2):
    "dot" (a second tl.dot), "sum" (int64 reductions) or None, the default: "dot" exactly when the aggregate
    product type (:attr:`agg_dtype`) is int8. Forcing one is for tests and for reproducing GPU results."""

    def __init__(self, code_dtype: str = "fp16", block: int = 64, rows_per_partition: int | None = None,
                 mode: str = "sum", agg_product: str | None = None):
        if code_dtype not in CODE_DTYPES:
            raise InputError(f"--tc-dtype must be one of {', '.join(CODE_DTYPES)}, got {code_dtype!r}")
        check_block(block)
        if mode not in AGGREGATES:
            raise InputError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {mode!r}")
        if agg_product is not None and agg_product not in AGG_PRODUCTS:
            raise InputError(f"agg_product must be one of {', '.join(AGG_PRODUCTS)} or None, got {agg_product!r}")
        self.code_dtype, self.block, self.mode, self.agg_product = code_dtype, block, mode, agg_product
        self.rows_per_partition = rows_per_partition or block // 2
        if self.rows_per_partition < 1:
            raise InputError(f"rows per partition must be >= 1, got {self.rows_per_partition}")
        self.last_partitions = 0

    def _dtype(self, code: str | None = None):
        import triton.language as tl

        return {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "int8": tl.int8}[code or self.code_dtype]

    @property
    def agg_dtype(self) -> str:
        """The type of the aggregate product E x P (K = block): int8 dots need K >= 32, so fp16 for block 16."""
        return "fp16" if self.code_dtype == "int8" and self.block < 32 else self.code_dtype

    @property
    def agg_dot(self) -> bool:
        """The kernel's AGG_DOT: count and sum as a second tl.dot (int8 aggregate products, or forced "dot"),
        else as int64 reductions (fp16/bf16 chained dots were wrong on an H200 with Triton 3.6)."""
        if self.agg_product is not None:
            return self.agg_product == "dot"
        return self.agg_dtype == "int8"

    def aggregate(self, lk, lp, rk, rp) -> AggResult:
        import torch

        from gpulab.dbjoin.tensorcore_aggregate_kernel import tc_agg_kernel

        dev = lk.device
        check_key_dtypes(lk, rk)
        nl, nr = lk.numel(), rk.numel()
        if lp.numel() != nl or rp.numel() != nr:
            raise InputError(f"key and payload lengths differ: left {nl} vs {lp.numel()}, right {nr} vs {rp.numel()}")
        sums = self.mode == "sum"
        if dev.type == "cuda" and (why := compiler_problem(self.block)):  # the interpreter runs every block
            raise DeviceError(why)
        if nl == 0 or nr == 0:
            e = torch.empty(0, dtype=torch.int64, device=dev)
            return AggResult(e, e, e if sums else None, e if sums else None)
        if lk.dtype != rk.dtype:
            lk, rk = lk.to(torch.int64), rk.to(torch.int64)
        has_hi = lk.dtype == torch.int64
        r = choose_bits(nl, nr, self.rows_per_partition)
        kused = (32 - r) + (32 if has_hi else 0)
        L, Rt = partition(lk, r), partition(rk, r)
        self.last_partitions = 1 << r
        lrow, rrow = L.row.to(torch.int64), Rt.row.to(torch.int64)
        l_key = lk[lrow]
        check_int32_payload(lp, "left")
        check_int32_payload(rp, "right")
        l_pay = lp.to(torch.int32)[lrow]
        r_pay = rp.to(torch.int32)[rrow]
        out_key = torch.empty(nl, dtype=torch.int64, device=dev)
        out_count = torch.empty(nl, dtype=torch.int64, device=dev)
        out_suml = torch.empty(nl if sums else 1, dtype=torch.int64, device=dev)
        out_sumr = torch.empty(nl if sums else 1, dtype=torch.int64, device=dev)
        counter = torch.zeros(1, dtype=torch.int64, device=dev)
        tc_agg_kernel[(1 << r,)](L.lo, L.hi, l_key, l_pay, L.start, L.count, Rt.lo, Rt.hi, r_pay, Rt.start,
                                 Rt.count, out_key, out_count, out_suml, out_sumr, counter, r, kused,
                                 HAS_HI=has_hi, BM=self.block, DT=self._dtype(),
                                 ADT=self._dtype(self.agg_dtype), WITH_SUMS=sums, AGG_DOT=self.agg_dot)
        n = int(counter.item())
        if sums:
            return AggResult(out_key[:n], out_count[:n], out_suml[:n], out_sumr[:n])
        return AggResult(out_key[:n], out_count[:n])

