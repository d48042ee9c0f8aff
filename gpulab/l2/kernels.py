"""Hand-written Triton kernels of the MLP and conv-net workloads, and a read-prefetch kernel.

* :func:`linear`: ``y = act(x @ W^T + b)`` (W in torch's [out, in] layout, fp32 accumulation,
  grouped tile order so that neighbouring programs share W tiles in L2).
* :func:`conv2d`: NCHW convolution as an implicit GEMM (addresses computed, no gathers through
  index tensors) with fused bias and ReLU.
* :func:`touch`: reads a byte range (as int32 words) with a few programs and writes an XOR per
  lane: the portable "cheap read" prefetch when the PTX prefetch kernels are not available.

Tested on the CPU under ``TRITON_INTERPRET=1`` in fp32 against :mod:`gpulab.l2.reference`;
on a GPU in fp16/bf16 by the ``@pytest.mark.gpu`` tests.
"""
import os

import torch
import triton
import triton.language as tl

from gpulab.core.device import sm_count
from gpulab.core.triton_compat import patch_interpreter

patch_interpreter()  # Triton 3.0-3.6's interpreter with NumPy >= 2.4 (see gpulab.core.triton_compat)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, a_ptr, y_ptr, M, N, K,
                   sxm, sxk, swn, swk, sam, san, sym, syn,
                   HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_ADD: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(w_ptr + rn[None, :] * swn + kk[:, None] * swk, mask=(rn[None, :] < N) & (kk[:, None] < K),
                    other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0)
        acc += bias[None, :].to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if HAS_ADD:  # a residual, or the partial sum of earlier K bands (may be y itself: each program reads its tile first)
        acc += tl.load(a_ptr + rm[:, None] * sam + rn[None, :] * san, mask=(rm[:, None] < M) & (rn[None, :] < N),
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


# The tiles under the interpreter, where numpy runs one program at a time: its time follows the tile steps (each
# program's K loop iterations, summed), about 1.5-3 ms each on the 2-core CPU machine, not the MACs (batch 1
# costs a 16-row tile as batch 16 does)
INTERPRET_LINEAR_BLOCKS = (16, 32, 32)  # BLOCK_M, BLOCK_N, BLOCK_K
INTERPRET_CONV_BLOCKS = (32, 16, 16)  # BLOCK_P, BLOCK_CO, BLOCK_K


def interpreter_steps_linear(m: int, n: int, k: int) -> int:
    """Tile steps of :func:`linear` on [m, k] x [n, k] under the interpreter."""
    bm, bn, bk = INTERPRET_LINEAR_BLOCKS
    return triton.cdiv(m, bm) * triton.cdiv(n, bn) * triton.cdiv(k, bk)


def interpreter_steps_conv(pixels: int, co: int, k: int) -> int:
    """Tile steps of :func:`conv2d` under the interpreter: ``pixels`` output pixels (batch included), ``co``
    output channels, ``k`` = input channels x kernel height x width."""
    bp, bc, bk = INTERPRET_CONV_BLOCKS
    return triton.cdiv(pixels, bp) * triton.cdiv(co, bc) * triton.cdiv(k, bk)


def _blocks(m: int, n: int, k: int, sms: int = 0) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of a linear layer. With ``sms`` (the GPU's SM count), small batches get narrower
    N tiles, down to 16, until the programs cover the SMs: at batch 8 and width 1536, 128-wide tiles made 12
    programs, a GEMV on 12 of an H100's 132 SMs (16 wide: 96)."""
    if INTERPRET:  # small tiles: the interpreter is numpy, one program at a time
        return INTERPRET_LINEAR_BLOCKS
    bm = 64 if m >= 64 else max(16, triton.next_power_of_2(m))
    bn = 128 if n >= 128 else 64
    while bn > 16 and triton.cdiv(m, bm) * triton.cdiv(n, bn) < sms:
        bn //= 2
    return bm, bn, 64 if k >= 64 else 32


def _conv_blocks(pixels: int, co: int, sms: int = 0) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_CO, BLOCK_K) of a convolution: 128 output pixels a tile, fewer (down to 32) while the
    programs do not cover ``sms`` SMs (a 28 x 28 image at batch 1 and 256 channels: 28 programs at 128)."""
    if INTERPRET:
        return INTERPRET_CONV_BLOCKS
    bp, bc = 128, 64 if co >= 64 else 32
    while bp > 32 and triton.cdiv(pixels, bp) * triton.cdiv(co, bc) < sms:
        bp //= 2
    return bp, bc, 32


def _check_bias(b: torch.Tensor | None, n: int, what: str) -> None:
    """A bias of another length would be read past its end (or leave outputs without one): refused."""
    if b is not None and (b.dim() != 1 or b.shape[0] != n or not b.is_contiguous()):
        raise ValueError(f"{what}: bias {tuple(b.shape)} does not match {n} outputs (a contiguous [{n}] is needed)")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, relu: bool = False,
           out: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x @ w.T + b) + add`` for 2-D x [M, K] and w [N, K] (``add`` [M, N], added in fp32 after the activation;
    it may be ``out`` itself, to accumulate a product over K bands held apart)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} and w {tuple(w.shape)} do not match")
    m, k = x.shape
    n = w.shape[0]
    _check_bias(b, n, "linear")
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"linear: out is {tuple(out.shape)} {out.dtype} on {out.device}, expected ({m}, {n}) "
                         f"{x.dtype} on {x.device}")
    if add is not None and (tuple(add.shape) != (m, n) or add.device != x.device):
        raise ValueError(f"linear: add is {tuple(add.shape)} on {add.device}, expected ({m}, {n}) on {x.device}")
    y = out if out is not None else torch.empty((m, n), device=x.device, dtype=x.dtype)
    a = add if add is not None else y
    bm, bn, bk = _blocks(m, n, k, sm_count(x.device))
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_kernel[grid](x, w, b if b is not None else w, a, y, m, n, k,
                         x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
                         y.stride(0), y.stride(1),
                         HAS_BIAS=b is not None, RELU=relu, HAS_ADD=add is not None, IEEE=x.dtype == torch.float32,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    return y


@triton.jit
def _conv2d_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                   NB, C, H, W, CO, HO, WO,
                   sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                   STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   HAS_BIAS: tl.constexpr, RELU: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    P = NB * HO * WO
    K = C * KH * KW
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rc = pid_c * BLOCK_CO + tl.arange(0, BLOCK_CO)
    n = rp // (HO * WO)
    rem = rp % (HO * WO)
    oh = rem // WO
    ow = rem % WO
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ci = kk // (KH * KW)
        r = kk % (KH * KW)
        kh = r // KW
        kw = r % KW
        ih = oh[:, None] * STRIDE - PAD + kh[None, :]
        iw = ow[:, None] * STRIDE - PAD + kw[None, :]
        amask = (rp[:, None] < P) & (kk[None, :] < K) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + n[:, None] * sxn + ci[None, :] * sxc + ih * sxh + iw * sxw, mask=amask, other=0.0)
        b = tl.load(w_ptr + rc[None, :] * K + kk[:, None], mask=(rc[None, :] < CO) & (kk[:, None] < K), other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rc, mask=rc < CO, other=0.0)
        acc += bias[None, :].to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    yp = y_ptr + n[:, None] * syn + rc[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=(rp[:, None] < P) & (rc[None, :] < CO))


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, stride: int = 1, padding: int = 0,
           relu: bool = False) -> torch.Tensor:
    """NCHW conv2d (groups=1) with w [CO, C, KH, KW] contiguous; fused bias and ReLU."""
    if x.dim() != 4 or w.dim() != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"conv2d: x {tuple(x.shape)} and w {tuple(w.shape)} do not match")
    if not w.is_contiguous():
        raise ValueError("conv2d: the weight must be contiguous ([CO, C*KH*KW] rows)")
    nb, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    _check_bias(b, co, "conv2d")
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d: input {h}x{wd} is smaller than the kernel {kh}x{kw}")
    y = torch.empty((nb, co, ho, wo), device=x.device, dtype=x.dtype)
    bp, bc, bk = _conv_blocks(nb * ho * wo, co, sm_count(x.device))
    grid = (triton.cdiv(nb * ho * wo, bp), triton.cdiv(co, bc))
    _conv2d_kernel[grid](x, w, b if b is not None else w, y, nb, c, h, wd, co, ho, wo,
                         *x.stride(), *y.stride(), STRIDE=stride, PAD=padding, KH=kh, KW=kw,
                         HAS_BIAS=b is not None, RELU=relu, IEEE=x.dtype == torch.float32,
                         BLOCK_P=bp, BLOCK_CO=bc, BLOCK_K=bk)
    return y


@triton.jit
def _touch_kernel(p_ptr, n_words, out_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(pid * BLOCK, n_words, step):
        offs = start + lanes
        acc = acc ^ tl.load(p_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + pid * BLOCK + lanes, acc)


def touch(words: torch.Tensor, programs: int = 8, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read every int32 word of ``words`` (1-D) with ``programs`` programs; returns their per-lane XORs
    ([programs * BLOCK] int32, XOR-reduce it to get the XOR of all words)."""
    if words.dtype != torch.int32 or words.dim() != 1:
        raise ValueError("touch: expects a 1-D int32 view of the bytes to read")
    block = 256 if INTERPRET else 1024
    y = out if out is not None else torch.empty(programs * block, dtype=torch.int32, device=words.device)
    _touch_kernel[(programs,)](words, words.numel(), y, BLOCK=block)
    return y


@triton.jit
def _pollute_kernel(p_ptr, n_words, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_words
    tl.store(p_ptr + offs, tl.load(p_ptr + offs, mask=m, other=0) + 1, mask=m)


def pollute(words: torch.Tensor) -> torch.Tensor:
    """Read and rewrite every int32 word (+1): other tenants' traffic that evicts normal L2 lines
    between inferences (a named kernel, so ncu totals can leave it out)."""
    if words.dtype != torch.int32 or words.dim() != 1:
        raise ValueError("pollute: expects a 1-D int32 tensor")
    block = 256 if INTERPRET else 4096
    _pollute_kernel[(triton.cdiv(words.numel(), block),)](words, words.numel(), BLOCK=block)
    return words
