"""The join as matrix products on tensor cores (Triton).

1. Mix: every key goes through a *bijection* onto 32 or 64 bits (a 3-round Feistel network of
   murmur3 fmix32 for int64 keys, fmix32 itself for int32 keys), kept as two 32-bit words (lo, hi).
   Equal mixed words <=> equal keys, so no key value is special.
2. Partition: the low R bits of ``lo`` pick one of P = 2^R partitions; both tables are laid out by
   partition with their original row ids, and per-partition start/count computed. On the GPU a counting
   sort in two Triton passes that mix the keys themselves (atomic counts, a scan, atomic cursors); the
   torch reference (CPU) mixes in torch and sorts stably by partition id.
3. Kernel (Triton, one program per partition): for each BM x BN tile of (left rows, right rows) of its
   partition, expand the remaining K = 32 - R (+ 32 for int64) mixed bits into +-1 codes in registers,
   ``tl.dot`` them (fp16/bf16/int8 on the GPU, fp32 in the interpreter; one product per 32-bit word,
   accumulated) and mark the entries equal to K: a dot product of +-1 codes reaches K exactly when all K
   bits agree. R and K are runtime arguments, so one compiled kernel serves every table size. Padded rows
   get all-zero codes (dot 0 < K). Matches are appended to the output with one atomicAdd per tile, while
   they fit in ``capacity``: a tile where no left row has two matches is written one entry per left row (a
   scan of BM counts; the matched right row picked out by a masked sum), likewise per right row, and only a
   tile with duplicates on both sides is written entry by entry, in slices of 16 left rows. The counter ends
   at the exact size, and the host re-runs the kernel with that capacity when the first guess (max of the
   table sizes) was short.

The products are block-diagonal by construction: only rows of one partition meet, so the work is
about P tiles of BM x BN x K instead of a dense N x M product.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gpulab.core.errors import InputError
from gpulab.dbjoin.reference import JoinResult

CODE_DTYPES = ("fp32", "fp16", "bf16", "int8")
BLOCKS = (16, 32, 64, 128)  # --tc-block: tile sizes BM = BN
# The Triton kernels a join launches on the GPU: the two partition passes (partition_counting) and the join;
# the profiler's filter (bench --ncu) is built from these names
KERNELS = ("tc_hist_kernel", "tc_scatter_kernel", "tc_join_kernel")
PARTITION_KERNELS = KERNELS[:2]
KERNEL_REGEX = "|".join(KERNELS)
_M16 = 0xFFFF
_M32 = 0xFFFFFFFF

def _mul32(x, c: int):
    """(x * c) mod 2^32 for int64 tensors x in [0, 2^32) without int64 overflow."""
    return ((x & _M16) * c + ((((x >> 16) * c) & _M16) << 16)) & _M32


def fmix32(x):
    """murmur3's 32-bit finalizer (a bijection of [0, 2^32)) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def mix_key(key) -> tuple[Any, Any | None]:
    """Bijective mix of int32/int64 keys into (lo, hi) 32-bit words as int64 tensors (hi None for int32)."""
    import torch

    if key.dtype == torch.int32:
        return fmix32(key.to(torch.int64) & _M32), None
    k = key.to(torch.int64)
    lo = k & _M32
    hi = (k >> 32) & _M32  # arithmetic shift, masked: the high word's bits
    for rnd in range(3):  # Feistel: (hi, lo) -> (lo, hi ^ F(lo ^ c)); bijective for any F
        hi, lo = lo, hi ^ fmix32(lo ^ (0x9E3779B9 * (rnd + 1) & _M32))
    return lo, hi


def _to_i32(x):
    """int64 tensor with values in [0, 2^32) -> int32 tensor with the same bit pattern."""
    import torch

    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


@dataclass
class Partitioned:
    lo: Any  # int32 (bit pattern of the mixed low word), sorted by partition
    hi: Any  # int32 or a 1-element dummy for int32 keys
    row: Any  # int32 original row ids in partition order
    start: Any  # int32 per partition
    count: Any  # int32 per partition


MIX_BLOCK = 1024


def triton_cdiv(a: int, b: int) -> int:
    return max((a + b - 1) // b, 1)


@dataclass
class PartitionSpace:
    """The buffers of one table's counting-sort partition, allocated once (a prepared plan reuses them, so that
    the partition can be captured in a CUDA graph): the layout (:class:`Partitioned`) and the atomic cursors."""
    out: Partitioned
    cursor: Any  # int32 per partition

    @classmethod
    def allocate(cls, n: int, bits: int, has_hi: bool, dev) -> "PartitionSpace":
        import torch

        i32 = dict(dtype=torch.int32, device=dev)
        parts = 1 << bits
        hi = torch.empty(n, **i32) if has_hi else torch.zeros(1, **i32)
        return cls(Partitioned(torch.empty(n, **i32), hi, torch.empty(n, **i32), torch.empty(parts, **i32),
                               torch.empty(parts, **i32)), torch.empty(parts, **i32))


def partition_counting(key, bits: int, space: PartitionSpace | None = None) -> Partitioned:
    """Mix and partition one table by a counting sort in two Triton passes over the keys: atomic counts per
    partition, their exclusive scan, then each row scattered to the next place of its partition (atomic
    cursors): two reads of the keys, in place of a full radix sort of the partition ids (torch.argsort) with
    its histogram and gathers (by estimate several times the device time; not measured yet). The order
    within a partition is arbitrary. ``space``: buffers to write (allocated here without); no allocation
    and no host sync then, so a CUDA graph can capture it."""
    import torch

    from gpulab.dbjoin.tensorcore_kernel import tc_hist_kernel, tc_scatter_kernel

    key = key.contiguous()  # the kernels read key + offs: a strided view would be read wrongly
    n = key.numel()
    has_hi = key.dtype == torch.int64
    if space is None:
        space = PartitionSpace.allocate(n, bits, has_hi, key.device)
    p = space.out
    pmask = (1 << bits) - 1
    grid = (triton_cdiv(n, MIX_BLOCK),)
    p.count.zero_()
    tc_hist_kernel[grid](key, p.count, n, pmask, HAS_HI=has_hi, BLOCK=MIX_BLOCK)
    torch.cumsum(p.count, 0, dtype=torch.int32, out=p.start)
    p.start.sub_(p.count)
    space.cursor.copy_(p.start)
    tc_scatter_kernel[grid](key, space.cursor, p.lo, p.hi, p.row, n, pmask, HAS_HI=has_hi, BLOCK=MIX_BLOCK)
    return p


def _check_pairs_fit(total: int, dev) -> None:
    """A one-line error when ``total`` output pairs (two int32 each) would not fit in 80% of the free memory of
    ``dev`` (16 GiB assumed off a GPU), instead of an out-of-memory traceback."""
    import torch

    from gpulab.dbjoin.hash_join_cuda import check_output_size

    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 16 << 30
    check_output_size(total, int(0.8 * free))


def check_key_dtypes(left_key, right_key) -> None:
    """Join keys are int32 or int64 tensors (a float key would be truncated by the encoding: 1.5 would join 1)."""
    import torch

    from gpulab.dbjoin.tables import check_key_shape

    for side, k in (("left", left_key), ("right", right_key)):
        if k.dtype not in (torch.int32, torch.int64):
            raise InputError(f"{side} join keys must be int32 or int64, got {str(k.dtype).replace('torch.', '')}")
        check_key_shape(side, k)  # the CPU partition would refuse 2-D keys with torch's words, the GPU's flatten them


def partition(key, bits: int, fused: bool | None = None) -> Partitioned:
    """Mix, then partition one table by the low ``bits`` bits of the mixed low word.

    ``fused`` (default: on CUDA): the two-pass Triton counting sort (:func:`partition_counting`); otherwise
    the torch reference (mix as ~50 element-wise ops, a stable sort by partition id).
    """
    import torch

    if fused is None:
        fused = key.is_cuda
    if fused:
        return partition_counting(key, bits)
    lo64, hi64 = mix_key(key)
    part = (lo64 & ((1 << bits) - 1)).to(torch.int32)
    lo, hi = _to_i32(lo64), (_to_i32(hi64) if hi64 is not None else None)
    order = torch.argsort(part)  # partition ids < 2^24 as int32: fewer radix passes than int64
    counts = torch.bincount(part, minlength=1 << bits)
    starts = torch.cumsum(counts, 0) - counts
    lo_s = lo[order]
    hi_s = hi[order] if hi is not None else torch.zeros(1, dtype=torch.int32, device=key.device)
    return Partitioned(lo_s, hi_s, order.to(torch.int32), starts.to(torch.int32), counts.to(torch.int32))


def _compile():
    from gpulab.dbjoin.tensorcore_kernel import tc_join_kernel

    return tc_join_kernel


def choose_bits(n_left: int, n_right: int, rows_per_partition: int) -> int:
    """R = log2(partitions) so that a partition holds about ``rows_per_partition`` rows of the larger side."""
    big = max(n_left, n_right, 1)
    return int(min(max(math.ceil(math.log2(max(big / rows_per_partition, 1.0))), 0), 24))


def check_block(block: int) -> None:
    """A one-line InputError unless ``block`` is one of :data:`BLOCKS`."""
    if block not in BLOCKS:
        raise InputError(f"--tc-block must be 16, 32, 64 or 128, got {block}")


class TensorCoreJoin:
    """``join(left_keys, right_keys)`` on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1)."""

    def __init__(self, code_dtype: str = "fp16", block: int = 64, rows_per_partition: int | None = None):
        if code_dtype not in CODE_DTYPES:
            raise InputError(f"--tc-dtype must be one of {', '.join(CODE_DTYPES)}, got {code_dtype!r}")
        check_block(block)
        self.code_dtype = code_dtype
        self.block = block
        self.rows_per_partition = rows_per_partition or block // 2
        if self.rows_per_partition < 1:
            raise InputError(f"--tc-rows-per-partition must be >= 1, got {self.rows_per_partition}")
        self.retries = 0
        self.last_partitions = 0

    def _dtype(self):
        import triton.language as tl

        return {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "int8": tl.int8}[self.code_dtype]

    def launch_join(self, L: Partitioned, Rt: Partitioned, r: int, has_hi: bool, capacity: int, out_l, out_r,
                    counter, count_only: bool) -> None:
        """Zero ``counter`` and launch the join kernel over the two partitioned tables (no host sync)."""
        kused = (32 - r) + (32 if has_hi else 0)
        counter.zero_()
        _compile()[(1 << r,)](L.lo, L.hi, L.row, L.start, L.count, Rt.lo, Rt.hi, Rt.row, Rt.start, Rt.count,
                              out_l, out_r, capacity, counter, R=r, KUSED=kused, HAS_HI=has_hi,
                              BM=self.block, BN=self.block, DT=self._dtype(), COUNT_ONLY=count_only)

    def join(self, left_key, right_key, count_only: bool = False, mark=None) -> JoinResult:
        """The join; ``mark(phase)``, if given, is called after each phase's launches ("partition_left",
        "partition_right", "join", and "join_retry" when the first output capacity was short) and before the
        host reads the count (phase_times_ms records CUDA events there)."""
        import torch

        mark = mark or (lambda phase: None)
        dev = left_key.device
        check_key_dtypes(left_key, right_key)
        nl, nr = left_key.numel(), right_key.numel()
        if nl == 0 or nr == 0:
            e = torch.empty(0, dtype=torch.int32, device=dev)
            return JoinResult(0) if count_only else JoinResult(0, e, e)
        if left_key.dtype != right_key.dtype:
            left_key, right_key = left_key.to(torch.int64), right_key.to(torch.int64)
        has_hi = left_key.dtype == torch.int64
        r = choose_bits(nl, nr, self.rows_per_partition)
        L = partition(left_key, r)
        mark("partition_left")
        Rt = partition(right_key, r)
        mark("partition_right")
        self.last_partitions = 1 << r
        counter = torch.zeros(1, dtype=torch.int64, device=dev)

        def launch(capacity: int, out_l, out_r, count_flag: bool, phase: str = "join") -> int:
            self.launch_join(L, Rt, r, has_hi, capacity, out_l, out_r, counter, count_flag)
            mark(phase)
            return int(counter.item())

        if count_only:
            dummy = torch.empty(1, dtype=torch.int32, device=dev)
            return JoinResult(launch(0, dummy, dummy, True))
        capacity = max(nl, nr)  # exact bound whenever one side's keys are unique
        out_l = torch.empty(capacity, dtype=torch.int32, device=dev)
        out_r = torch.empty(capacity, dtype=torch.int32, device=dev)
        total = launch(capacity, out_l, out_r, False)
        if total > capacity:
            self.retries += 1
            _check_pairs_fit(total, dev)
            capacity = total
            out_l = torch.empty(capacity, dtype=torch.int32, device=dev)
            out_r = torch.empty(capacity, dtype=torch.int32, device=dev)
            total = launch(capacity, out_l, out_r, False, "join_retry")
        return JoinResult(total, out_l[:total], out_r[:total])

    def phase_times_ms(self, left_key, right_key, count_only: bool = False, reps: int = 10) -> dict[str, float]:
        """Median GPU time (ms) of each phase of :meth:`join` over ``reps`` calls (after one untimed call): a
        CUDA event on the current stream after each phase, so a phase also carries the host's launch gaps
        before it (the partitions are several launches each); "join_retry" also waits for the host to read
        the first count. {} off CUDA or for reps < 1."""
        import torch

        from gpulab.core.timing import marked_times

        if not left_key.is_cuda or reps < 1:
            return {}

        def event():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        split = marked_times(lambda mark: self.join(left_key, right_key, count_only, mark=mark), event,
                             lambda a, b: a.elapsed_time(b), torch.cuda.synchronize, reps)
        return {p: v["ms"] for p, v in split.items()}
