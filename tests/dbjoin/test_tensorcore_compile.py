"""The Triton tensor-core join compiles for sm_90 (its bf16/int8 codes for sm_80, its largest tiles for sm_89 within
the 99 KB of shared memory of sm_86/sm_89) without a GPU (AOT, in a child without TRITON_INTERPRET).

Covers the tile sizes and code types that the device script does not run on a GPU (block 128, 16; bf16/int8
with 64-bit keys), so front-end and lowering errors show up here instead of on scarce GPU time.
"""
from tests.triton_aot import run_aot_script

SCRIPT = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpulab.dbjoin.tensorcore_kernel import tc_hist_kernel, tc_join_kernel, tc_scatter_kernel

DT = {"fp16": tl.float16, "bf16": tl.bfloat16, "int8": tl.int8, "fp32": tl.float32}
sig = {n: "*i32" for n in ("l_lo", "l_hi", "l_row", "l_start", "l_cnt", "r_lo", "r_hi", "r_row", "r_start", "r_cnt",
                           "out_l", "out_r")}
sig.update(capacity="i64", counter="*i64", R="i32", KUSED="i32")
target = GPUTarget("cuda", 90, 32)
for code, has_hi, block, count_only in [("fp16", False, 64, False), ("fp16", False, 128, False),
                                        ("fp16", False, 16, False), ("bf16", True, 32, False),
                                        ("int8", True, 16, False), ("fp32", True, 64, True)]:
    consts = {"HAS_HI": has_hi, "BM": block, "BN": block, "DT": DT[code],
              "COUNT_ONLY": count_only}
    s = dict(sig, **{k: "constexpr" for k in consts})
    triton.compile(ASTSource(tc_join_kernel, s, consts), target=target)
    print("ok", code, has_hi, block, count_only, flush=True)
for code, block in (("bf16", 32), ("int8", 16)):  # A100 (sm_80): bf16 and int8 tensor-core dots
    consts = {"HAS_HI": True, "BM": block, "BN": block, "DT": DT[code], "COUNT_ONLY": False}
    triton.compile(ASTSource(tc_join_kernel, dict(sig, **{k: "constexpr" for k in consts}), consts),
                   target=GPUTarget("cuda", 80, 32))
    print("ok sm_80", code, flush=True)
# the counting-sort partition: histogram and scatter passes (atomics on int32 counters), both key widths
hsig = {"key": "*i64", "counts": "*i32", "n": "i32", "PMASK": "i32", "HAS_HI": "constexpr", "BLOCK": "constexpr"}
ssig = {"key": "*i64", "cursor": "*i32", "lo_out": "*i32", "hi_out": "*i32", "row_out": "*i32", "n": "i32",
        "PMASK": "i32", "HAS_HI": "constexpr", "BLOCK": "constexpr"}
for cc in (80, 90):
    for kt, hh in (("*i32", False), ("*i64", True)):
        for kern, ksig in ((tc_hist_kernel, hsig), (tc_scatter_kernel, ssig)):
            triton.compile(ASTSource(kern, dict(ksig, key=kt), {"HAS_HI": hh, "BLOCK": 1024}),
                           target=GPUTarget("cuda", cc, 32))
print("ok mix")
"""


def test_triton_kernels_compile_for_sm90():
    run_aot_script(SCRIPT, "ok mix")


DESKTOP_SCRIPT = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpulab.dbjoin.tensorcore_aggregate_kernel import tc_agg_kernel
from gpulab.dbjoin.tensorcore_kernel import tc_join_kernel

DESKTOP_SMEM = 101376  # sm_86 / sm_89 (RTX 30xx/40xx, L40S): 99 KB per block; A100 163 KB, H100 227 KB
sig = {n: "*i32" for n in ("l_lo", "l_hi", "l_row", "l_start", "l_cnt", "r_lo", "r_hi", "r_row", "r_start", "r_cnt",
                           "out_l", "out_r")}
sig.update(capacity="i64", counter="*i64", R="i32", KUSED="i32")
consts = {"HAS_HI": True, "BM": 128, "BN": 128, "DT": tl.float32, "COUNT_ONLY": False}
k = triton.compile(ASTSource(tc_join_kernel, dict(sig, **{c: "constexpr" for c in consts}), consts),
                   target=GPUTarget("cuda", 89, 32))
assert k.metadata.shared <= DESKTOP_SMEM, ("tc_join", k.metadata.shared)
asig = {n: "*i32" for n in ("l_lo", "l_hi", "l_pay", "l_start", "l_cnt", "r_lo", "r_hi", "r_pay", "r_start", "r_cnt")}
asig.update({n: "*i64" for n in ("out_key", "out_count", "out_suml", "out_sumr", "counter")}, R="i32", KUSED="i32")
consts = {"HAS_HI": True, "BM": 128, "DT": tl.float32, "ADT": tl.float32, "WITH_SUMS": True,
          "AGG_DOT": False}  # as TensorCoreAggregate("fp32", 128).agg_dot
asig = dict(asig, l_key="*i64", **{c: "constexpr" for c in consts})
asig = {a: asig[a] for a in tc_agg_kernel.arg_names}  # in parameter order: Triton 3.2 reads it by position
k = triton.compile(ASTSource(tc_agg_kernel, asig, consts),
                   target=GPUTarget("cuda", 89, 32))
assert k.metadata.shared <= DESKTOP_SMEM, ("tc_agg", k.metadata.shared)
print("ok desktop")
"""


def test_largest_tiles_fit_desktop_shared_memory():
    """The largest tiles (--tc-block 128, fp32 codes, 64-bit keys: the most shared memory) compile for sm_89 within
    the 99 KB per block of sm_86/sm_89 GPUs (Triton lowers sm_86 and sm_89 alike, fp8 aside)."""
    run_aot_script(DESKTOP_SCRIPT, "ok desktop")
