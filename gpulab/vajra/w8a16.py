"""Weight-only FP8 GEMM/GEMV (W8A16) in Triton: ``y[M, N] = x[M, K] @ (q[N, K] * scale)^T``.

Built for decode (small M): the FP8 weights are streamed once and dequantized in registers; the
work is split over N tiles and, when there are too few of them to fill the GPU, over K (split-K
partial sums in fp32, summed by torch). Per-tensor and per-channel scales are applied to the
accumulator once at the end; block scales once per K tile (BK divides the scale block).
"""

import torch
import triton
import triton.language as tl

from gpulab.core.device import sm_count
from gpulab.core.triton_compat import patch_interpreter
from gpulab.vajra.fp8_kernels import FORMATS, _load_fp8, interpreted, native_fp8
from gpulab.vajra.fp8_ptx import e4m3_to_bf16_ptx, ptx_usable

patch_interpreter()  # Triton 3.0-3.6's interpreter with NumPy >= 2.4 (see gpulab.core.triton_compat)

SCALE_MODES = {"tensor": 0, "channel": 1, "block": 2}
BK_MAX = 128


def block_k_tile(block) -> int | None:
    """The K tile for block scales: the largest power of two <= BK_MAX dividing the block's K size
    (one scale per K tile); None when that is below 16 (tl.dot's smallest K): no W8A16 for such blocks."""
    if block is None:
        return BK_MAX
    bk = min(BK_MAX, block[1] & -block[1])
    return bk if bk >= 16 else None


# M (the tokens of the step) is not specialized: one compile per tiling serves every batch size of the CUDA
# graphs (Triton would otherwise build separate kernels for M == 1, M % 16 == 0 and the rest: ~2x the JIT time of
# an engine's warm-up, for masks that cost nothing)
@triton.jit(do_not_specialize=["M"])
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, o_ptr, M, N, K, s_xm, s_wn, s_om, s_ss, k_per_split,
                  SBR: tl.constexpr, SBC: tl.constexpr, SCALE_MODE: tl.constexpr, PARTIAL: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NATIVE: tl.constexpr,
                  EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, IEEE: tl.constexpr,
                  PTX_BF16: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < k_hi
        x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        w_ptrs = w_ptr + rn[None, :] * s_wn + rk[:, None]
        wmask = (rn[None, :] < N) & kmask[:, None]
        if PTX_BF16:  # e4m3 -> bf16 by integer ops and a bf16 multiply (fp8_ptx): no conversion instruction
            w = e4m3_to_bf16_ptx(tl.load(w_ptrs, mask=wmask, other=0.0))
        elif NATIVE:  # Triton's cast, straight to x's dtype (exact): on sm_90 e4m3 -> bf16 is 1.5 conversions a
            # weight (e4m3 -> fp16 -> bf16), conversions issue at 16 a clock per SM: a bound near the copy rate
            w = tl.load(w_ptrs, mask=wmask, other=0.0).to(x.dtype)
        else:
            w = _load_fp8(w_ptrs, wmask, NATIVE, EBITS, MBITS, BIAS).to(x.dtype)
        if IEEE:
            part = tl.dot(x, w, input_precision="ieee")
        else:
            part = tl.dot(x, w)
        if SCALE_MODE == 2:
            s = tl.load(s_ptr + (rn // SBR) * s_ss + k0 // SBC, mask=rn < N, other=0.0)
            acc += part * s[None, :]
        else:
            acc += part
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_ptr)
    elif SCALE_MODE == 1:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    if not PARTIAL:
        tl.store(o_ptr + rm[:, None] * s_om + rn[None, :], acc.to(o_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(o_ptr + pid_k * M * N + rm[:, None] * s_om + rn[None, :], acc, mask=omask)


@triton.jit
def _sum_splits_kernel(p_ptr, o_ptr, MN, SPLIT, BLOCK: tl.constexpr):
    """o = sum over the split-K partials p [SPLIT, MN] (fp32), in o's dtype: one kernel instead of sum + cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, SPLIT):
        acc += tl.load(p_ptr + i * MN + offs, mask=m, other=0.0)
    tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=m)


def choose_config(m: int, n: int, k: int, device: torch.device, block=None) -> dict:
    """A heuristic tile configuration: BM 16/32/64 by M, BN 64 (32 for very small N), BK 128 (see block_k_tile),
    split-K until there are about two programs per SM (never below 4 K tiles per split)."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if n >= 2048 else 32
    bk = block_k_tile(block)
    if bk is None:
        raise ValueError(f"w8a16: block scales of K size {block[1]} need a power-of-two divisor >= 16 as the K tile")
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    sms = max(sm_count(device), 1)
    split = 1
    while tiles * split < 2 * sms and k // (bk * split * 2) >= 4:
        split *= 2
    return {"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split, "num_warps": 4, "num_stages": 4}


def split_count(k: int, split: int, bk: int) -> int:
    """The K splits a launch really has: ``split`` asked, each a whole number of BK tiles (the last may be short)."""
    k_per = triton.cdiv(triton.cdiv(k, split), bk) * bk
    return triton.cdiv(k, k_per)


def partial_splits(n: int, k: int, device, block=None) -> int:
    """How many split-K partials a W8A16 call with at most W8A16's batch (M <= 64: one row of M tiles) hands a fused
    consumer for an [n, k] weight on ``device`` (1: none; larger M splits less)."""
    cfg = choose_config(1, n, k, device, block)
    return split_count(k, cfg["SPLIT_K"], cfg["BK"])


def w8a16_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, strategy: str, block=None,
                 config: dict | None = None, native: bool | None = None, reduce: bool = True,
                 ptx: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ dequant(q [N, K])^T -> [M, N] in x's dtype.

    ``ptx``: e4m3 weights with bf16 activations (natively loaded) convert by the PTX recipe of fp8_ptx where
    its probe passed (None), or as told; Triton's cast otherwise.

    ``reduce=False``: where the work is split over K, the fp32 partial sums [SPLIT, M, N] as they are, for a
    consumer that sums them itself (the fused kernels of fused_ops.py); [M, N] otherwise."""
    if strategy not in SCALE_MODES:
        raise ValueError(f"unknown scale strategy {strategy!r}")
    eb, mb, bias = FORMATS[q.dtype]
    m, k = x.shape
    n, k2 = q.shape
    if k != k2:
        raise ValueError(f"w8a16: x has {k} columns, the weight {k2}")
    x = x.contiguous()
    q = q.contiguous()
    native = native_fp8(q) if native is None else native
    ptx_bf16 = native and q.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16 and \
        (ptx_usable(x.device, "bf16") if ptx is None else bool(ptx))
    cfg = dict(choose_config(m, n, k, q.device, block))
    if config:
        cfg.update(config)
    bm, bn, bk, split = cfg["BM"], cfg["BN"], cfg["BK"], cfg["SPLIT_K"]
    sbr = sbc = 1
    s = scale.float().contiguous()
    s_ss = 0
    if strategy == "block":
        sbr, sbc = block
        want = (triton.cdiv(n, sbr), triton.cdiv(k, sbc))
        if s.dim() != 2 or tuple(s.shape) != want:  # the kernel would read past a smaller one
            raise ValueError(f"w8a16: block scales {list(s.shape)} for a {n}x{k} weight in {sbr}x{sbc} blocks, "
                             f"expected {list(want)}")
        if sbc % bk:
            raise ValueError(f"w8a16: BK {bk} must divide the scale block's K size {sbc}")
        s_ss = s.stride(0)
    elif strategy == "channel":
        s = s.reshape(n)
    else:
        s = s.reshape(1)
    k_per = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = split_count(k, split, bk)  # (= cdiv(k, k_per))
    out_dtype = x.dtype
    if split == 1:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    else:
        out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    extra = {} if interpreted() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    _w8a16_kernel[grid](x, q if native else q.view(torch.uint8), s, out, m, n, k, x.stride(0), q.stride(0), n,
                        s_ss, k_per, SBR=sbr, SBC=sbc, SCALE_MODE=SCALE_MODES[strategy], PARTIAL=split > 1,
                        BM=bm, BN=bn, BK=bk, NATIVE=native, EBITS=eb, MBITS=mb, BIAS=bias,
                        IEEE=x.dtype == torch.float32, PTX_BF16=ptx_bf16, **extra)
    if split == 1 or not reduce:
        return out
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(m * n, block),)](out, y, m * n, split, BLOCK=block)
    return y
