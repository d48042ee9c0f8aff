"""Triton kernels for FP8 (e4m3fn, e5m2) weights: dequantize, quantize, requantize.

FP8 bytes are decoded and encoded with integer arithmetic on the raw bits (``NATIVE=False``), which
runs on any GPU and under ``TRITON_INTERPRET=1`` (the interpreter has no fp8 type); encoding
rounds to nearest-even and saturates, exactly like ``torch.Tensor.to(float8)`` after a clamp, so the
kernels match :mod:`gpulab.vajra.reference` bit for bit. ``NATIVE=True`` (GPU only) loads fp8 through
Triton's own conversion instead, where the GPU has the type (:func:`native_fp8`).

Scales are dequantization scales (real = fp8 * scale) addressed as
``scale[(row // SBR) * s_sr + (col // SBC) * s_sc]``: per-tensor (strides 0), per-row/channel/token
(SBR=1, s_sr=1) and block (SBR, SBC = block shape).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from gpulab.core.triton_compat import patch_interpreter
from gpulab.vajra.reference import true_div

patch_interpreter()  # Triton 3.0-3.6's interpreter with NumPy >= 2.4 (see gpulab.core.triton_compat)

FORMATS = {torch.float8_e4m3fn: (4, 3, 7), torch.float8_e5m2: (5, 2, 15)}  # exponent bits, mantissa bits, bias


def _fmt(dtype: torch.dtype):
    if dtype not in FORMATS:
        raise ValueError(f"unsupported fp8 dtype {dtype}")
    return FORMATS[dtype]


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def decode_fp8(b, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """int32 bytes (0..255) -> float32 values."""
    sign = (b >> 7) & 1
    e = (b >> MBITS) & ((1 << EBITS) - 1)
    m = b & ((1 << MBITS) - 1)
    bits = (sign << 31) | ((e + (127 - BIAS)) << 23) | (m << (23 - MBITS))
    normal = bits.to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * (2.0 ** (1 - BIAS - MBITS))
    sub = tl.where(sign == 1, -sub, sub)
    out = tl.where(e == 0, sub, normal)
    if EBITS == 4:  # e4m3fn: S.1111.111 is NaN, the format's only special value (no infinities)
        out = tl.where((e == 15) & (m == 7), float("nan"), out)
    else:  # e5m2 (IEEE-like): an all-ones exponent is +-inf (m == 0) or NaN
        inf = tl.where(sign == 1, float("-inf"), float("inf"))
        out = tl.where(e == 31, tl.where(m == 0, inf, float("nan")), out)
    return out


@triton.jit
def clamp_fp8(v, FMAX: tl.constexpr):
    """v clamped to [-FMAX, FMAX], NaN kept NaN (as torch.clamp; a min/max pair may turn it into a bound)."""
    return tl.where(v != v, v, tl.minimum(tl.maximum(v, -FMAX), FMAX))


@triton.jit
def encode_fp8(x, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """float32 values already clamped to the finite range (or NaN) -> int32 bytes, round to nearest even."""
    u = x.to(tl.int32, bitcast=True)
    sign = (u >> 31) & 1
    a = u & 0x7FFFFFFF
    e32 = a >> 23
    r = a + ((1 << (22 - MBITS)) - 1) + ((a >> (23 - MBITS)) & 1)
    code_n = (r >> (23 - MBITS)) - ((127 - BIAS) << MBITS)
    mm = (a & 0x7FFFFF) | 0x800000
    shift = tl.minimum(tl.maximum((151 - BIAS - MBITS) - e32, 1), 25)
    q = mm >> shift
    rem = mm & ((tl.full(shift.shape, 1, tl.int32) << shift) - 1)
    half = tl.full(shift.shape, 1, tl.int32) << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    q = q + up.to(tl.int32)
    code = tl.where(e32 >= 128 - BIAS, code_n, q)
    code = tl.where(x != x, 0x7F, code)  # NaN: S.1111.111 in e4m3fn, a NaN in e5m2 too (torch writes 0x7F)
    return code | (sign << 7)


@triton.jit
def _load_fp8(ptrs, mask, NATIVE: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    if NATIVE:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.load(ptrs, mask=mask, other=0).to(tl.int32) & 0xFF
        return decode_fp8(b, EBITS, MBITS, BIAS)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, o_ptr, N, K, s_q, s_o, s_sr, s_sc,
                    SBR: tl.constexpr, SBC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                    NATIVE: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    cols = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]
    mask = (rows < N) & (cols < K)
    v = _load_fp8(q_ptr + rows * s_q + cols, mask, NATIVE, EBITS, MBITS, BIAS)
    s = tl.load(s_ptr + (rows // SBR) * s_sr + (cols // SBC) * s_sc, mask=mask, other=1.0)
    tl.store(o_ptr + rows * s_o + cols, (v * s).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cast_kernel(x_ptr, s_ptr, o_ptr, N, K, s_x, s_o, s_sr, s_sc, FMAX: tl.constexpr,
                 SBR: tl.constexpr, SBC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                 EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    cols = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]
    mask = (rows < N) & (cols < K)
    x = tl.load(x_ptr + rows * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + (rows // SBR) * s_sr + (cols // SBC) * s_sc, mask=mask, other=1.0)
    y = clamp_fp8(tl.math.div_rn(x, s), FMAX)
    tl.store(o_ptr + rows * s_o + cols, encode_fp8(y, EBITS, MBITS, BIAS).to(tl.uint8), mask=mask)


@triton.jit
def _quant_rows_kernel(x_ptr, o_ptr, s_ptr, K, s_x, s_o, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                       BC: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """One program per row: amax, scale = max(amax / FMAX, MIN_SCALE), then the cast (per token/channel)."""
    row = tl.program_id(0)
    amax = tl.zeros([BC], dtype=tl.float32)
    for c0 in range(0, K, BC):
        cols = c0 + tl.arange(0, BC)
        x = tl.load(x_ptr + row * s_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FMAX), MIN_SCALE)
    tl.store(s_ptr + row, s)
    for c0 in range(0, K, BC):
        cols = c0 + tl.arange(0, BC)
        x = tl.load(x_ptr + row * s_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        y = clamp_fp8(tl.math.div_rn(x, s), FMAX)
        tl.store(o_ptr + row * s_o + cols, encode_fp8(y, EBITS, MBITS, BIAS).to(tl.uint8), mask=cols < K)


@triton.jit
def _quant_block_kernel(x_ptr, o_ptr, s_ptr, N, K, s_x, s_o, s_s, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, PBN: tl.constexpr, PBK: tl.constexpr,
                        EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """One program per [BN, BK] block (PBN, PBK: the block padded to powers of two)."""
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    r = tl.arange(0, PBN)[:, None]
    c = tl.arange(0, PBK)[None, :]
    rows = bi * BN + r
    cols = bj * BK + c
    mask = (r < BN) & (c < BK) & (rows < N) & (cols < K)
    x = tl.load(x_ptr + rows * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.math.div_rn(tl.max(tl.max(tl.abs(x), axis=1), axis=0), FMAX), MIN_SCALE)
    tl.store(s_ptr + bi * s_s + bj, s)
    y = clamp_fp8(tl.math.div_rn(x, s), FMAX)
    tl.store(o_ptr + rows * s_o + cols, encode_fp8(y, EBITS, MBITS, BIAS).to(tl.uint8), mask=mask)


@triton.jit
def _requant_rows_kernel(q_ptr, rs_ptr, ns_ptr, o_ptr, N, K, s_q, s_o, FMAX: tl.constexpr,
                         BR: tl.constexpr, BC: tl.constexpr, NATIVE: tl.constexpr,
                         EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    cols = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]
    mask = (rows < N) & (cols < K)
    v = _load_fp8(q_ptr + rows * s_q + cols, mask, NATIVE, EBITS, MBITS, BIAS)
    rs = tl.load(rs_ptr + rows, mask=rows < N, other=1.0)
    ns = tl.load(ns_ptr)
    y = clamp_fp8(tl.math.div_rn(v * rs, ns), FMAX)
    tl.store(o_ptr + rows * s_o + cols, encode_fp8(y, EBITS, MBITS, BIAS).to(tl.uint8), mask=mask)


# ------------------------------------------------------------------------------------------ wrappers


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # a host-side query: safe during CUDA-graph capture


def native_fp8_for(capability: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether Triton has ``dtype`` as a native fp8 type on a GPU of this compute capability: e4m3fn
    ("fp8e4nv") from 8.9 on (Ada, Hopper; on an A100, 8.0, Triton refuses to compile it), e5m2 from 8.0 on."""
    return tuple(capability) >= ((8, 0) if dtype == torch.float8_e5m2 else (8, 9))


def native_fp8(t: torch.Tensor) -> bool:
    """Whether the kernels load ``t``'s fp8 bytes natively (``NATIVE=True``): a CUDA tensor, not under the
    interpreter, on a GPU that has the type (:func:`native_fp8_for`); elsewhere they decode the raw bytes
    (``NATIVE=False``: bit-exact, a few more integer ops)."""
    if not t.is_cuda or interpreted():
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return native_fp8_for(_capability(index), t.dtype)


def _raw(q: torch.Tensor, native: bool) -> torch.Tensor:
    return q if native else q.view(torch.uint8)


def _scale_addressing(scale: torch.Tensor, shape, block):
    n, k = shape
    scale = scale.float().contiguous()
    if block is not None:
        return scale, scale.stride(0), 1, block[0], block[1]
    if scale.numel() == 1:
        return scale.reshape(1), 0, 0, 1, 1
    if scale.numel() != n:
        raise ValueError(f"scale of {scale.numel()} values does not fit {n} rows")
    return scale.reshape(n), 1, 0, 1, 1


def dequantize(q: torch.Tensor, scale: torch.Tensor, block=None, out_dtype=torch.float32, native: bool | None = None):
    """FP8 [N, K] * scale -> out_dtype [N, K]."""
    eb, mb, bias = _fmt(q.dtype)
    native = native_fp8(q) if native is None else native
    q = q.contiguous()
    n, k = q.shape
    out = torch.empty((n, k), dtype=out_dtype, device=q.device)
    s, s_sr, s_sc, sbr, sbc = _scale_addressing(scale, (n, k), block)
    BR, BC = 32, 128
    grid = (triton.cdiv(n, BR), triton.cdiv(k, BC))
    _dequant_kernel[grid](_raw(q, native), s, out, n, k, q.stride(0), out.stride(0), s_sr, s_sc,
                          SBR=sbr, SBC=sbc, BR=BR, BC=BC, NATIVE=native, EBITS=eb, MBITS=mb, BIAS=bias)
    return out


def cast(x: torch.Tensor, scale: torch.Tensor, block=None, dtype=torch.float8_e4m3fn) -> torch.Tensor:
    """clamp(x / scale) -> fp8 with a given scale (per tensor, per row or per block)."""
    eb, mb, bias = _fmt(dtype)
    x = x.contiguous()
    n, k = x.shape
    out = torch.empty((n, k), dtype=dtype, device=x.device)
    s, s_sr, s_sc, sbr, sbc = _scale_addressing(scale, (n, k), block)
    BR, BC = 32, 128
    grid = (triton.cdiv(n, BR), triton.cdiv(k, BC))
    _cast_kernel[grid](x, s, out.view(torch.uint8), n, k, x.stride(0), k, s_sr, s_sc, FMAX=float(torch.finfo(dtype).max),
                       SBR=sbr, SBC=sbc, BR=BR, BC=BC, EBITS=eb, MBITS=mb, BIAS=bias)
    return out


def _min_scale(dtype) -> float:
    return 1.0 / (float(torch.finfo(dtype).max) * 512.0)


def quantize_rows(x: torch.Tensor, dtype=torch.float8_e4m3fn):
    """Per-row (channel or token) dynamic quantization -> (fp8 [N, K], scale fp32 [N])."""
    eb, mb, bias = _fmt(dtype)
    x = x.contiguous()
    n, k = x.shape
    out = torch.empty((n, k), dtype=dtype, device=x.device)
    s = torch.empty(n, dtype=torch.float32, device=x.device)
    BC = min(1024, triton.next_power_of_2(max(k, 16)))
    if n:
        _quant_rows_kernel[(n,)](x, out.view(torch.uint8), s, k, x.stride(0), k, FMAX=float(torch.finfo(dtype).max),
                                 MIN_SCALE=_min_scale(dtype), BC=BC, EBITS=eb, MBITS=mb, BIAS=bias)
    return out, s


def quantize_block(x: torch.Tensor, block, dtype=torch.float8_e4m3fn):
    eb, mb, bias = _fmt(dtype)
    x = x.contiguous()
    n, k = x.shape
    bn, bk = block
    nb, kb = triton.cdiv(n, bn), triton.cdiv(k, bk)
    out = torch.empty((n, k), dtype=dtype, device=x.device)
    s = torch.empty((nb, kb), dtype=torch.float32, device=x.device)
    pbn, pbk = triton.next_power_of_2(bn), triton.next_power_of_2(bk)
    # one program holds a whole block: ~1024 elements per warp (a 128x128 block at 4 warps spills registers
    # and takes ~14 s to compile; at 16 warps ~1 s)
    extra = {} if interpreted() else {"num_warps": max(4, min(16, pbn * pbk // 1024))}
    _quant_block_kernel[(nb, kb)](x, out.view(torch.uint8), s, n, k, x.stride(0), k, kb,
                                  FMAX=float(torch.finfo(dtype).max), MIN_SCALE=_min_scale(dtype), BN=bn, BK=bk,
                                  PBN=pbn, PBK=pbk, EBITS=eb, MBITS=mb, BIAS=bias, **extra)
    return out, s


def quantize_tensor(x: torch.Tensor, dtype=torch.float8_e4m3fn):
    amax = x.float().abs().amax()
    s = torch.clamp(true_div(amax, float(torch.finfo(dtype).max)), min=_min_scale(dtype)).reshape(())
    return cast(x, s, None, dtype), s


def quantize(x: torch.Tensor, strategy: str, block=None, dtype=torch.float8_e4m3fn):
    if strategy == "tensor":
        return quantize_tensor(x, dtype)
    if strategy in ("channel", "token"):
        return quantize_rows(x, dtype)
    if strategy == "block":
        return quantize_block(x, block, dtype)
    raise ValueError(f"unknown strategy {strategy!r}")


def requantize_rows(q: torch.Tensor, row_scale: torch.Tensor, new_scale: torch.Tensor, native: bool | None = None):
    """Rows of ``q`` carrying their own scales -> one common scale (fused q/k/v, gate/up shards)."""
    eb, mb, bias = _fmt(q.dtype)
    native = native_fp8(q) if native is None else native
    q = q.contiguous()
    n, k = q.shape
    out = torch.empty_like(q)
    BR, BC = 32, 128
    grid = (triton.cdiv(n, BR), triton.cdiv(k, BC))
    _requant_rows_kernel[grid](_raw(q, native), row_scale.float().contiguous().reshape(n),
                               new_scale.float().reshape(1), out.view(torch.uint8), n, k, q.stride(0), k,
                               FMAX=float(torch.finfo(q.dtype).max), BR=BR, BC=BC, NATIVE=native,
                               EBITS=eb, MBITS=mb, BIAS=bias)
    return out
