"""The Triton kernels of gpulab l2 compile for sm_90 (the bf16 tiles for sm_80; the largest tiles for sm_86/sm_89,
within their 99 KB of shared memory per block) without a GPU (AOT, in a child without TRITON_INTERPRET).

The interpreter tests run them in fp32 with small tiles only; this covers the GPU tiles of kernels._blocks and
conv2d (the small-batch and the large linear tiles, both conv channel tiles) in fp16/bf16 (tensor-core dots)
and fp32 (IEEE dots), and the touch/pollute kernels, so lowering errors show up here, not on GPU time.
"""
from tests.triton_aot import run_aot_script

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpulab.l2 import kernels as K


def compile(fn, sig, consts, cc=90):
    return triton.compile(ASTSource(fn, dict(sig, **{k: "constexpr" for k in consts}), consts),
                          target=GPUTarget("cuda", cc, 32))


def conv_ptrs(ptrs):  # the conv kernel has no added operand
    return {k: v for k, v in ptrs.items() if k != "a_ptr"}


for dt, ieee in (("fp16", False), ("bf16", False), ("fp32", True)):
    ptrs = {n: "*" + dt for n in ("x_ptr", "w_ptr", "b_ptr", "a_ptr", "y_ptr")}
    lin = dict(ptrs, **{n: "i32" for n in ("M", "N", "K", "sxm", "sxk", "swn", "swk", "sam", "san", "sym", "syn")})
    # kernels._blocks: BLOCK_M 16-64, BLOCK_N 128 down to 16 for small batches (e.g. 32 x 16, 64 x 64)
    # (the matformer workload's bands: no bias and an added residual or partial sum)
    for i, (bm, bn, bk) in enumerate(((16, 64, 32), (64, 128, 64), (16, 16, 64), (16, 32, 64), (32, 16, 64),
                                      (64, 64, 64))):
        compile(K._linear_kernel, lin, dict(HAS_BIAS=i % 2 == 0, RELU=i % 2 == 0, HAS_ADD=i % 2 == 1, IEEE=ieee,
                                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8))
    conv = dict(conv_ptrs(ptrs), **{n: "i32" for n in "NB C H W CO HO WO sxn sxc sxh sxw syn syc syh syw".split()})
    for bp, bc in ((128, 32), (128, 64), (64, 64), (32, 64), (32, 32)):  # kernels._conv_blocks: 128 pixels down to 32
        compile(K._conv2d_kernel, conv, dict(STRIDE=1, PAD=1, KH=3, KW=3, HAS_BIAS=True, RELU=True, IEEE=ieee,
                                             BLOCK_P=bp, BLOCK_CO=bc, BLOCK_K=32))
    print("ok", dt, flush=True)
# A100 (sm_80): the bf16 tensor-core tiles
ptrs = {n: "*bf16" for n in ("x_ptr", "w_ptr", "b_ptr", "a_ptr", "y_ptr")}
compile(K._linear_kernel, dict(ptrs, **{n: "i32" for n in ("M", "N", "K", "sxm", "sxk", "swn", "swk", "sam", "san", "sym",
                                                                "syn")}),
        dict(HAS_BIAS=True, RELU=True, HAS_ADD=False, IEEE=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        cc=80)
compile(K._conv2d_kernel, dict(conv_ptrs(ptrs), **{n: "i32" for n in "NB C H W CO HO WO sxn sxc sxh sxw syn syc syh syw".split()}),
        dict(STRIDE=1, PAD=1, KH=3, KW=3, HAS_BIAS=True, RELU=True, IEEE=False, BLOCK_P=128, BLOCK_CO=64,
             BLOCK_K=32), cc=80)
print("ok sm_80", flush=True)
# RTX 30xx (sm_86) and L40S / RTX 40xx (sm_89): at most 99 KB (101376 bytes) of shared memory per block, where
# A100 has 163 KB and H100 227 KB; Triton refuses a launch above it. The largest tiles are the fp32 ones.
DESKTOP_SMEM = 101376
for cc in (86, 89):
    for dt, ieee in (("fp32", True), ("fp16", False)):
        ptrs = {n: "*" + dt for n in ("x_ptr", "w_ptr", "b_ptr", "a_ptr", "y_ptr")}
        k = compile(K._linear_kernel, dict(ptrs, **{n: "i32" for n in ("M", "N", "K", "sxm", "sxk", "swn", "swk", "sam",
                                                                        "san", "sym", "syn")}),
                    dict(HAS_BIAS=True, RELU=True, HAS_ADD=True, IEEE=ieee, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64,
                         GROUP_M=8), cc=cc)
        assert k.metadata.shared <= DESKTOP_SMEM, ("linear", cc, dt, k.metadata.shared)
        k = compile(K._conv2d_kernel, dict(conv_ptrs(ptrs), **{n: "i32" for n in "NB C H W CO HO WO sxn sxc sxh sxw syn syc syh syw".split()}),
                    dict(STRIDE=1, PAD=1, KH=3, KW=3, HAS_BIAS=True, RELU=True, IEEE=ieee, BLOCK_P=128, BLOCK_CO=64,
                         BLOCK_K=32), cc=cc)
        assert k.metadata.shared <= DESKTOP_SMEM, ("conv2d", cc, dt, k.metadata.shared)
print("ok sm_86 sm_89", flush=True)
compile(K._touch_kernel, {"p_ptr": "*i32", "n_words": "i32", "out_ptr": "*i32"}, {"BLOCK": 1024})
compile(K._pollute_kernel, {"p_ptr": "*i32", "n_words": "i32"}, {"BLOCK": 4096})
print("ok all")
"""


def test_l2_triton_kernels_compile_for_sm90():
    run_aot_script(SCRIPT, "ok all")


def test_small_batch_linear_tiles_cover_the_sms(monkeypatch):
    """kernels._blocks: on a GPU of 132 SMs a batch-8 layer of width 1536 gets 16-wide N tiles (96 programs, not
    the 12 of 128-wide ones); N tiles halve only while the programs are fewer than the SMs; without an SM count as
    before; under the interpreter always the small tiles."""
    from gpulab.l2 import kernels as K

    monkeypatch.setattr(K, "INTERPRET", True)
    assert K._blocks(8, 1536, 1536, 132) == (16, 32, 32)
    monkeypatch.setattr(K, "INTERPRET", False)
    assert K._blocks(8, 1536, 1536, 132) == (16, 16, 64)
    assert K._blocks(8, 1536, 1536, 0) == (16, 128, 64)
    assert K._blocks(8, 1536, 1536, 40) == (16, 32, 64)  # 48 programs >= 40 SMs
    assert K._blocks(256, 4096, 4096, 132) == (64, 64, 64)  # 4 x 32 = 128 programs < 132: one halving
    assert K._blocks(512, 4096, 4096, 132) == (64, 128, 64)  # 8 x 32 = 256 programs: as they were
    assert K._conv_blocks(784, 256, 132) == (32, 64, 32)  # 28 x 28 at batch 1: 25 x 4 = 100 programs, the fewest
    assert K._conv_blocks(8 * 784, 256, 132) == (128, 64, 32)  # batch 8: 49 x 4 = 196 programs
    assert K._conv_blocks(784, 256, 0) == (128, 64, 32)
