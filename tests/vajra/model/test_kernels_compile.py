"""vajra's Triton kernels compile for A100 (sm_80), L40S (sm_89) and H100 (sm_90) without a GPU (AOT, in a
child without TRITON_INTERPRET).

The interpreter tests run them in fp32 on raw fp8 bytes only; this covers what a GPU runs: bf16/fp16
activations, fp8 loaded natively where :func:`native_fp8_for` says the GPU has the type (e4m3fn from sm_89 on;
Triton refuses it on sm_80, where the kernels must take the raw-byte path), the decode and prefill tiles of the
paged attention with bf16 and fp8 caches, the W8A16 tilings the heuristics pick (scale modes, split-K), and
the fused decoder-layer kernels (RMSNorm with the residual add, RoPE + q/k/v split, SiLU * up, the K/V store).
"""
from tests.triton_aot import run_aot_script

SCRIPT = r"""
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpulab.vajra import fp8_kernels as F, paged_attention as A, w8a16 as W
from gpulab.vajra.fp8_kernels import FORMATS, native_fp8_for

FP8_PTR = {torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e5m2: "*fp8e5"}
t0 = time.time()
n_compiled = 0


def compile(fn, cc, types, consts, **options):
    # every argument not named in types or consts is an int32 (sizes, strides)
    global n_compiled
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    unset = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
    assert not unset, (fn.__name__, "constexprs not given", unset)
    missing = set(types) - set(fn.arg_names)
    assert not missing, (fn.__name__, missing)
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cc, 32), options=options or None)
    n_compiled += 1


def fmt(dt):
    eb, mb, bias = FORMATS[dt]
    return dict(EBITS=eb, MBITS=mb, BIAS=bias)


def attn_types(act, cache):
    t = {"q_ptr": act, "o_ptr": act, "c_ptr": cache, "bt_ptr": "*i32", "qs_ptr": "*i32", "ql_ptr": "*i32",
         "cl_ptr": "*i32", "sm_scale_log2": "fp32", "k_scale": "fp32", "v_scale": "fp32"}
    return t


def decode_types(act, cache):
    t = {k: v for k, v in attn_types(act, cache).items() if k not in ("qs_ptr", "ql_ptr")}
    t.update(po_ptr="*fp32", pml_ptr="*fp32")
    return t


# fp8 loads on every architecture, natively only where the rule says so
for cc in (80, 89, 90):
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        native = native_fp8_for((cc // 10, cc % 10), dt)
        qp = FP8_PTR[dt] if native else "*u8"
        compile(F._dequant_kernel, cc, {"q_ptr": qp, "s_ptr": "*fp32", "o_ptr": "*bf16"},
                dict(SBR=1, SBC=1, BR=32, BC=128, NATIVE=native, **fmt(dt)))
        compile(F._requant_rows_kernel, cc, {"q_ptr": qp, "rs_ptr": "*fp32", "ns_ptr": "*fp32", "o_ptr": "*u8"},
                dict(FMAX=float(torch.finfo(dt).max), BR=32, BC=128, NATIVE=native, **fmt(dt)))
        for ptx in ((False, True) if native and dt == torch.float8_e4m3fn else (False,)):  # Triton's cast, PTX
            compile(W._w8a16_kernel, cc, {"x_ptr": "*bf16", "w_ptr": qp, "s_ptr": "*fp32", "o_ptr": "*bf16"},
                    dict(SBR=1, SBC=1, SCALE_MODE=1, PARTIAL=False, BM=16, BN=64, BK=128, NATIVE=native, IEEE=False,
                         PTX_BF16=ptx, **fmt(dt)), num_warps=4, num_stages=4)
        v_ptx = native and dt == torch.float8_e4m3fn  # V's e4m3 -> fp16 by inline PTX where served
        compile(A._paged_decode_kernel, cc, decode_types("*bf16", qp),
                dict(GROUP=4, BH=16, PAGE=16, D=128, BN=64, UNIT=4, DIRECT=False, FP8=True, NATIVE=native,
                     IEEE=False, F16=True, V_PTX=v_ptx, **fmt(dt)))
        for bm in (16, 64):
            compile(A._paged_attn_kernel, cc, attn_types("*bf16", qp),
                    dict(GROUP=4, PAGE=16, D=128, BM=bm, BN=32, FP8=True, NATIVE=native, IEEE=False, F16=True,
                         V_PTX=v_ptx, **fmt(dt)))
        print("ok fp8", cc, dt, "native" if native else "raw bytes", flush=True)

E4 = fmt(torch.float8_e4m3fn)
FMAX = float(torch.finfo(torch.float8_e4m3fn).max)
MIN_SCALE = F._min_scale(torch.float8_e4m3fn)
# quantizers (always write raw bytes) at the tiles the wrappers use
for act in ("*bf16", "*fp16"):
    compile(F._cast_kernel, 90, {"x_ptr": act, "s_ptr": "*fp32", "o_ptr": "*u8"},
            dict(FMAX=FMAX, SBR=128, SBC=128, BR=32, BC=128, **E4))
    compile(F._quant_rows_kernel, 90, {"x_ptr": act, "o_ptr": "*u8", "s_ptr": "*fp32"},
            dict(FMAX=FMAX, MIN_SCALE=MIN_SCALE, BC=1024, **E4))
compile(F._quant_block_kernel, 90, {"x_ptr": "*bf16", "o_ptr": "*u8", "s_ptr": "*fp32"},
        dict(FMAX=FMAX, MIN_SCALE=MIN_SCALE, BN=128, BK=128, PBN=128, PBK=128, **E4), num_warps=16)
print("ok quantizers", flush=True)

# W8A16 at the tilings choose_config and the bench's sweep use: tensor / channel / block scales, split-K
# (fp32 partials), M tiles 16/32/64, N tiles 32/64/128, K tiles 128 and 16 (blocks of K 16)
for act, mode, bm, bn, bk, split, block in (("*bf16", 0, 32, 64, 128, 2, (1, 1)),
                                            ("*fp16", 2, 64, 32, 128, 1, (128, 128)),
                                            ("*bf16", 2, 16, 64, 16, 4, (64, 16)),
                                            ("*bf16", 1, 16, 128, 128, 1, (1, 1))):
    compile(W._w8a16_kernel, 90, {"x_ptr": act, "w_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                                  "o_ptr": act if split == 1 else "*fp32"},
            dict(SBR=block[0], SBC=block[1], SCALE_MODE=mode, PARTIAL=split > 1, BM=bm, BN=bn, BK=bk, NATIVE=True,
                 IEEE=False, PTX_BF16=act == "*bf16", **E4), num_warps=4, num_stages=4)
print("ok w8a16", flush=True)

# paged attention with 16-bit caches: prefill tiles (BM 16 and 64), Llama-3.2-1B's head_dim 64; decode
# direct (one split) and split with the merge
for act, d, bm in (("*bf16", 128, 16), ("*bf16", 128, 64), ("*fp16", 64, 64)):
    compile(A._paged_attn_kernel, 90, attn_types(act, act),
            dict(GROUP=4, PAGE=16, D=d, BM=bm, BN=32, FP8=False, NATIVE=False, IEEE=False, F16=False, V_PTX=False,
                 **E4))
for act, d, direct, group in (("*bf16", 128, True, 4), ("*bf16", 128, False, 8), ("*fp16", 64, False, 4)):
    compile(A._paged_decode_kernel, 90, decode_types(act, act),
            dict(GROUP=group, BH=16, PAGE=16, D=d, BN=64, UNIT=4, DIRECT=direct, FP8=False, NATIVE=False,
                 IEEE=False, F16=False, V_PTX=False, **E4))
compile(A._decode_merge_kernel, 90, {"o_ptr": "*bf16", "cl_ptr": "*i32", "po_ptr": "*fp32", "pml_ptr": "*fp32"},
        dict(PAGE=16, D=128, UNIT=4, SP=32))
# the fused decoder-layer kernels at Llama-3.1-8B (hidden 4096, head_dim 128) and 1B (head_dim 64) shapes, and
# the split-K reduction of W8A16, in bf16 (sm_80 on) and fp16
from gpulab.vajra import fused_ops as FO
for cc in (80, 89, 90):
    for act in ("*bf16", "*fp16"):
        for d_ptr, has, partial, block, even in ((act, True, False, 4096, False), ("*fp32", True, True, 4096, True),
                                                 ("*fp32", True, True, 4096, False), (act, False, False, 2048, False)):
            compile(FO._add_rms_norm_kernel, cc, {"x_ptr": act, "d_ptr": d_ptr, "w_ptr": act, "xo_ptr": act,
                                                  "h_ptr": act, "eps": "fp32"},
                    dict(HAS_DELTA=has, PARTIAL=partial, BLOCK=block, SPLIT_P2=8 if partial else 1, EVEN=even),
                    num_warps=(16 if partial else 8) if block > 2048 else 4,
                    **FO.ROUND_AS_TORCH)
        for half, partial in ((64, False), (64, True), (32, False)):
            compile(FO._rope_split_kernel, cc, {"qkv_ptr": "*fp32" if partial else act, "cos_ptr": act,
                                                "sin_ptr": act, "q_ptr": act, "k_ptr": act, "v_ptr": act},
                    dict(HALF=half, BH=4, PARTIAL=partial), **FO.ROUND_AS_TORCH)
        compile(FO._silu_mul_kernel, cc, {"gu_ptr": act, "o_ptr": act}, dict(BLOCK=1024, LIBDEVICE=True),
                **FO.SILU_AS_TORCH)
        for cache, fp8 in ((act, False), ("*u8", True)):
            compile(FO._store_kv_kernel, cc, {"k_ptr": act, "v_ptr": act, "slot_ptr": "*i64", "c_ptr": cache,
                                              "k_scale": "fp32", "v_scale": "fp32"},
                    dict(FP8=fp8, FMAX=448.0 if fp8 else 0.0, BLOCK=1024, **E4))
        compile(W._sum_splits_kernel, cc, {"p_ptr": "*fp32", "o_ptr": act}, dict(BLOCK=1024))
print("ok fused", flush=True)
print(f"ok all: {n_compiled} kernels in {time.time() - t0:.0f} s", flush=True)
"""


def test_vajra_triton_kernels_compile_for_sm80_sm89_sm90():
    run_aot_script(SCRIPT, "ok all", timeout=600)


ROPE_PTX = r"""
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpulab.vajra import fused_ops as FO

for act in ("bf16", "fp16"):
    ptr = "*" + act
    types = {"qkv_ptr": ptr, "cos_ptr": ptr, "sin_ptr": ptr, "q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr}
    sig = {a: ("constexpr" if a in ("HALF", "BH", "PARTIAL") else types.get(a, "i32"))
           for a in FO._rope_split_kernel.arg_names}
    for name, options in (("launched", FO.ROUND_AS_TORCH), ("default", {})):
        kernel = triton.compile(ASTSource(FO._rope_split_kernel, sig, dict(HALF=64, BH=4, PARTIAL=False)),
                                target=GPUTarget("cuda", 90, 32), options=options or None)
        fmas = re.findall(r"\bfma\.\w+\.(?:bf16|f16|f32)\w*", kernel.asm["ptx"])
        print(f"rope {act} {name}: {len(fmas)} fma", flush=True)
print("ok rope ptx", flush=True)
"""


def test_rope_kernel_rounds_each_product_as_torch_on_sm90():
    """The RoPE kernel as rope_split launches it (ROUND_AS_TORCH) has no floating-point FMA in its sm_90 PTX: each
    product is rounded before the add, as in torch's q * cos + rotate_half(q) * sin. (Triton's default fusion
    contracts them into fma.rn.bf16, the likely cause of the 77% bit-identical elements measured on an H200.)"""
    out = run_aot_script(ROPE_PTX, "ok rope ptx")
    for act in ("bf16", "fp16"):
        assert f"rope {act} launched: 0 fma" in out, out


def test_native_fp8_rule():
    import torch

    from gpulab.vajra.fp8_kernels import native_fp8, native_fp8_for

    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    assert not native_fp8_for((8, 0), e4) and native_fp8_for((8, 0), e5)
    assert native_fp8_for((8, 9), e4) and native_fp8_for((9, 0), e4) and native_fp8_for((10, 0), e4)
    assert not native_fp8_for((7, 5), e5)
    assert not native_fp8(torch.zeros(2, dtype=e4))  # a CPU tensor: raw bytes


W8A16_PTX = r"""
import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpulab.vajra import w8a16 as W
from gpulab.vajra.fp8_kernels import FORMATS

eb, mb, bias = FORMATS[torch.float8_e4m3fn]
fn = W._w8a16_kernel
types = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "o_ptr": "*fp32"}
for recipe in (False, True):  # Triton's cast; the PTX recipe of fp8_ptx
    consts = dict(SBR=1, SBC=1, SCALE_MODE=1, PARTIAL=True, BM=16, BN=64, BK=128, NATIVE=True, IEEE=False,
                  PTX_BF16=recipe, EBITS=eb, MBITS=mb, BIAS=bias)
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    # what the JIT sees at 8B shapes: 16-byte aligned pointers, sizes and strides multiples of 16 (M is not
    # specialized)
    aligned = [a for a in fn.arg_names if a.endswith("_ptr") or a in ("N", "K", "s_xm", "s_wn", "s_om", "s_ss",
                                                                     "k_per_split")]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    ptx = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "num_stages": 4}).asm["ptx"]
    for name in ("cvt.rn.f16x2.e4m3x2", "cvt.f32.f16", "cvt.rn.bf16x2.f32", "cvt.rn.bf16.f16", "cvt.bf16.f16",
                 "fma.rn.bf16x2", "cp.async.cg.shared.global", "ld.global.b8"):
        n = len(re.findall(re.escape(name) + r"(?![.\w])", ptx))
        print(f"{'ptx' if recipe else 'cast'} {name}: {n}", flush=True)
print("ok w8a16 ptx", flush=True)
"""


def test_w8a16_decode_tile_streams_fp8_without_an_fp32_detour_on_sm90():
    """The W8A16 decode tiling (BM 16, BN 64, BK 128, split-K partials) for bf16 activations on sm_90: the weights
    arrive by 16-byte cp.async (no byte loads). Triton's cast takes them e4m3 -> f16 -> bf16 in registers with
    no fp32 step (1.5 conversions a weight instead of 2; conversions issue at 16 a clock per SM, a bound close
    to the copy rate at batch 1); the PTX recipe (the default where its probe passes) uses no conversion at
    all: integer ops and one bf16 multiply per pair (sm_90 SASS of a 128 x 64 step, 2026-11-29,
    scripts/sass_counts.py: 287 instructions with 96 conversions, against 320 with none)."""
    out = run_aot_script(W8A16_PTX, "ok w8a16 ptx")
    counts = {k: int(v) for k, v in (line.split(": ") for line in out.splitlines() if ": " in line)}
    for recipe in ("cast", "ptx"):
        assert counts[f"{recipe} cp.async.cg.shared.global"] > 0 and counts[f"{recipe} ld.global.b8"] == 0, out
        assert counts[f"{recipe} cvt.f32.f16"] == 0 and counts[f"{recipe} cvt.rn.bf16x2.f32"] == 0, out
    assert counts["cast cvt.rn.f16x2.e4m3x2"] > 0 and counts["cast cvt.bf16.f16"] > 0, out
    assert counts["cast fma.rn.bf16x2"] == 0, out
    assert counts["ptx fma.rn.bf16x2"] > 0, out
    assert counts["ptx cvt.rn.f16x2.e4m3x2"] == counts["ptx cvt.rn.bf16.f16"] == counts["ptx cvt.bf16.f16"] == 0, out


FP8_ATTENTION_PTX = r"""
import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpulab.vajra import paged_attention as A
from gpulab.vajra.fp8_kernels import FORMATS

eb, mb, bias = FORMATS[torch.float8_e4m3fn]
common = {"q_ptr": "*bf16", "o_ptr": "*bf16", "c_ptr": "*fp8e4nv", "bt_ptr": "*i32", "cl_ptr": "*i32",
          "sm_scale_log2": "fp32", "k_scale": "fp32", "v_scale": "fp32"}
tiles = {"decode": (A._paged_decode_kernel, dict(common, po_ptr="*fp32", pml_ptr="*fp32"),
                    dict(GROUP=4, BH=16, PAGE=16, D=128, BN=64, UNIT=4, DIRECT=False)),
         "prefill16": (A._paged_attn_kernel, dict(common, qs_ptr="*i32", ql_ptr="*i32"),
                       dict(GROUP=4, PAGE=16, D=128, BM=16, BN=32)),
         "prefill64": (A._paged_attn_kernel, dict(common, qs_ptr="*i32", ql_ptr="*i32"),
                       dict(GROUP=4, PAGE=16, D=128, BM=64, BN=32))}
for name, (fn, types, consts) in tiles.items():
    consts = dict(consts, FP8=True, NATIVE=True, IEEE=False, F16=True, V_PTX=True, EBITS=eb, MBITS=mb, BIAS=bias)
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    aligned = [a for a in fn.arg_names if a.endswith("_ptr") or a.startswith("s_")]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    ptx = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4}).asm["ptx"]
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.{0}.{0}.f32"
    wgmma = "wgmma.mma_async.sync.aligned.m64n32k16.f32.{0}.{0}"
    for op in ("cvt.rn.f16x2.e4m3x2", "cvt.f32.f16", "cvt.rn.bf16x2.f32", "ld.shared.b8", mma.format("f16"),
               mma.format("bf16"), wgmma.format("f16"), wgmma.format("bf16")):
        n = len(re.findall(re.escape(op) + r"(?![.\w])", ptx))
        print(f"{name} {op}: {n}", flush=True)
print("ok fp8 attention ptx", flush=True)
"""


def test_fp8_attention_tiles_multiply_the_stored_values_in_fp16_on_sm90():
    """The decode and both prefill tiles over an e4m3 cache with bf16 queries, as sm_90 runs them: K and V
    go e4m3 -> fp16 by cvt.rn.f16x2.e4m3x2 and nothing else (no fp32 step, no repack to bf16: the scales are
    folded out of the tile), the MMAs take fp16, and V arrives without byte loads from shared memory (Triton's
    own cast of the transposed operand read each value with its own ld.shared.b8). In SASS (ptxas and
    nvdisasm of Triton 3.8, 2026-11-29; scripts/sass_counts.py) the decode tile's 64-key step went from 903
    instructions to 430, the bf16 cache's 444 for twice the bytes; the prefill tiles from 516 to 289 (BM 16) and
    556 to 400 (BM 64)."""
    out = run_aot_script(FP8_ATTENTION_PTX, "ok fp8 attention ptx")
    counts = {k: int(v) for k, v in (line.rsplit(": ", 1) for line in out.splitlines() if ": " in line)}
    # bf16 conversions: only the output rows' (prefill: BM x 128 values over 128 threads, two a conversion;
    # the decode tile writes fp32 partials)
    for tile, out_cvts in (("decode", 0), ("prefill16", 8), ("prefill64", 32)):
        assert counts[f"{tile} cvt.rn.f16x2.e4m3x2"] > 0, out
        assert counts[f"{tile} cvt.f32.f16"] == 0 and counts[f"{tile} ld.shared.b8"] == 0, (tile, out)
        assert counts[f"{tile} cvt.rn.bf16x2.f32"] == out_cvts, (tile, out)
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.{0}.{0}.f32"
    wgmma = "wgmma.mma_async.sync.aligned.m64n32k16.f32.{0}.{0}"
    for tile, op in (("decode", mma), ("prefill16", mma), ("prefill64", wgmma)):
        assert counts[f"{tile} {op.format('f16')}"] > 0 and counts[f"{tile} {op.format('bf16')}"] == 0, (tile, out)


SILU_PTX = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpulab.vajra import fused_ops as FO

fn = FO._silu_mul_kernel
for act in ("fp32", "bf16"):
    for name, libdevice, options in (("launched", True, FO.SILU_AS_TORCH), ("tl.exp", False, FO.ROUND_AS_TORCH)):
        consts = dict(BLOCK=1024, LIBDEVICE=libdevice)
        types = {"gu_ptr": "*" + act, "o_ptr": "*" + act}
        sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
        ptx = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        print(f"===== {act} {name}")
        print(ptx, flush=True)
print("ok silu ptx", flush=True)
"""

# torch's CUDA silu (aten/src/ATen/native/cuda/ActivationSiluKernel.cu: x_acc / (opmath_t(1) + exp(-x_acc)) in
# fp32, exp(float) being CUDA's expf), then torch's a * u, as nvcc builds them (no fast math, --fmad=true)
TORCH_SILU_CU = r"""
extern "C" __global__ void silu_mul(const float* __restrict__ gu, float* __restrict__ o, int inter) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < inter) {
    float x = gu[i];
    float a = x / (1.0f + expf(-x));
    o[i] = a * gu[inter + i];
  }
}
"""


def fp32_arithmetic(ptx: str) -> "collections.Counter":
    """The fp32 arithmetic instructions of a PTX listing, counted by opcode (ftz dropped: it acts on denormals,
    which expf's reduction sends to ex2.approx.ftz in both builds; a subtraction from +0 counted as the negation
    it is (Triton 3.6 spells -x so; the sign of a zero x does not reach expf's result); conversions between
    other types, moves, loads and stores left out)."""
    import collections
    import re

    zeros = set(re.findall(r"^\s*mov\.[bf]32\s+(%\w+),\s*0f00000000;", ptx, re.M))
    ops = collections.Counter()
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:@%p\d+\s+)?((neg|fma|add|sub|mul|div|ex2|rcp|cvt)\.[\w.]+)\s+([^;]*);", line)
        if m:
            operands = [o.strip() for o in m.group(3).split(",")]
            if m.group(1) == "sub.f32" and operands[1] in zeros | {"0f00000000"}:
                ops["neg.f32"] += 1
                continue
            parts = [p for p in m.group(1).split(".") if p != "ftz"]
            types = [p for p in parts if re.fullmatch(r"[fsub]\d+|bf16", p)]
            if types and all(t == "f32" for t in types):
                ops[".".join(parts)] += 1
    return ops


def test_silu_kernel_computes_torchs_cuda_silu_instruction_for_instruction_on_sm90(tmp_path):
    """SiLU * up as silu_mul launches it (libdevice's expf, div_rn, FP fusion on) has, per element, the fp32
    instructions of torch's silu and product compiled by nvcc for sm_90: CUDA's expf with its last product
    contracted into the + 1, an IEEE division (div.rn), and the product with up. The tl.exp build (the
    interpreter's branch, as launched before) does not: ex2.approx of a product and an approximate division.
    The same instructions on the same inputs give the same bits, so on a GPU SiLU matches torch to the bit
    (tests/vajra/model/test_fused_ops.py asks for it; not yet run on a GPU)."""
    import re
    import shutil
    import subprocess

    import pytest

    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc")
                                         if shutil.os.path.exists(p)), None)
    if nvcc is None:
        pytest.skip("no nvcc")
    (tmp_path / "silu.cu").write_text(TORCH_SILU_CU)
    subprocess.run([nvcc, "-arch=sm_90", "--ptx", "-O3", "silu.cu", "-o", "silu.ptx"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    torch_ops = fp32_arithmetic((tmp_path / "silu.ptx").read_text())
    assert torch_ops["div.rn.f32"] == 1 and torch_ops["ex2.approx.f32"] == 1, torch_ops
    out = run_aot_script(SILU_PTX, "ok silu ptx")
    builds = dict(chunk.split("\n", 1) for chunk in out.split("===== ")[1:])
    for act in ("fp32", "bf16"):
        for name in ("launched", "tl.exp"):
            ops = fp32_arithmetic(builds[f"{act} {name}"])
            if act == "bf16":  # LLVM narrows bf16(f32(a) * f32(u)) to mul.rn.bf16: the same bits, as the product
                # of two bf16 values is exact in fp32 and then rounded once either way
                ops["mul.f32"] += len(re.findall(r"^\s*mul(?:\.rn)?\.bf16\s", builds[f"{act} {name}"], re.M))
            per_thread = ops["div.rn.f32"] or ops["div.full.f32"]  # Triton gives each thread several elements
            same = per_thread > 0 and ops == collections_scaled(torch_ops, per_thread)
            assert same == (name == "launched"), (act, name, dict(ops), dict(torch_ops))


def collections_scaled(counter, k):
    import collections

    return collections.Counter({op: n * k for op, n in counter.items()})
