"""Torch references for every vajra kernel: FP8 quantize/dequantize/requantize, the linear
layers' math, the decoder layer's pointwise steps (RMSNorm with the residual add, RoPE, SiLU * up;
the unfused path of model.py), and attention over the paged KV cache (SDPA, sequence by sequence).

Conventions: ``scale`` is the dequantization scale (``real = fp8 * scale``); quantizing divides
by it and saturates to the format's largest finite value. Scale shapes: per-tensor ``[]``,
per-channel/per-token ``[rows]``, block ``[ceil(rows/bn), ceil(cols/bk)]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_max(dtype: torch.dtype = torch.float8_e4m3fn) -> float:
    return float(torch.finfo(dtype).max)


def _min_scale(dtype: torch.dtype) -> float:
    # an all-zero row/tensor gets a tiny positive scale (never 0: 0/0 would be NaN)
    return 1.0 / (fp8_max(dtype) * 512.0)


def true_div(x: torch.Tensor, s: float) -> torch.Tensor:
    """x / s in fp32, correctly rounded on every device, as vLLM's cache write divides. (torch on a GPU turns a
    division by a Python scalar into a product with the scalar's fp32 reciprocal, which rounds some values
    differently; a divisor tensor on x's device is divided by.)"""
    return x.float() / torch.full((), float(s), dtype=torch.float32, device=x.device)


def cast_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """``clamp(x / scale)`` rounded to nearest-even fp8 (scale broadcast against x)."""
    m = fp8_max(dtype)
    return (x.float() / scale).clamp(-m, m).to(dtype)


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Block scales [ceil(N/bn), ceil(K/bk)] -> one scale per element [N, K]."""
    n, k = shape
    bn, bk = block
    return scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def scale_for(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None = None) -> torch.Tensor:
    """A scale of any supported shape -> broadcastable against [N, K]."""
    scale = scale.float()
    if block is not None:
        return expand_block_scale(scale, shape, block)
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(-1, 1)


def quantize_tensor(x: torch.Tensor, dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.float().abs().amax()
    s = torch.clamp(true_div(amax, fp8_max(dtype)), min=_min_scale(dtype))
    return cast_fp8(x, s, dtype), s.reshape(())


def quantize_rows(x: torch.Tensor, dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (weights [N, K]) or per-token (activations [M, K]) quantization: scale [rows]."""
    amax = x.float().abs().amax(dim=1)
    s = torch.clamp(true_div(amax, fp8_max(dtype)), min=_min_scale(dtype))
    return cast_fp8(x, s[:, None], dtype), s


def quantize_block(x: torch.Tensor, block: tuple[int, int], dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = x.shape
    bn, bk = block
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    pad = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=x.device)
    pad[:n, :k] = x.float().abs()
    amax = pad.view(nb, bn, kb, bk).amax(dim=(1, 3))
    s = torch.clamp(true_div(amax, fp8_max(dtype)), min=_min_scale(dtype))
    return cast_fp8(x, expand_block_scale(s, (n, k), block), dtype), s


def quantize(x: torch.Tensor, strategy: str, block: tuple[int, int] | None = None, dtype=torch.float8_e4m3fn):
    if strategy == "tensor":
        return quantize_tensor(x, dtype)
    if strategy in ("channel", "token"):
        return quantize_rows(x, dtype)
    if strategy == "block":
        assert block is not None
        return quantize_block(x, block, dtype)
    raise ValueError(f"unknown strategy {strategy!r}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale_for(scale, tuple(q.shape), block)).to(out_dtype)


def requantize_rows(q: torch.Tensor, row_scale: torch.Tensor, new_scale: torch.Tensor) -> torch.Tensor:
    """Rows quantized with per-row scales -> one common per-tensor scale ``new_scale``."""
    v = q.float() * row_scale.float().reshape(-1, 1)
    return cast_fp8(v, new_scale.float().reshape(()), q.dtype)


# ---------------------------------------------------------------------------------------------- linear


def linear_w8a8(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, act: str, input_scale=None,
                block=None) -> torch.Tensor:
    """Fake-quant reference of W8A8: activations quantized (per token, or static per tensor)."""
    if act == "static":
        xs = input_scale.float().reshape(())
        xq = cast_fp8(x, xs, q.dtype).float() * xs
    else:
        xq8, xs = quantize_rows(x.float(), q.dtype)
        xq = xq8.float() * xs[:, None]
    return xq @ dequantize(q, w_scale, block).t()


def linear_w8a16(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, block=None) -> torch.Tensor:
    return x.float() @ dequantize(q, w_scale, block).t()


# ------------------------------------------------------------------------------------------- attention


def write_kv(layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter this step's K/V [T, Hkv, D] into the paged cache layer [blocks, 2, bs, Hkv, D]."""
    bs = layer.shape[2]
    blk = torch.div(slot_mapping, bs, rounding_mode="floor")
    off = slot_mapping - blk * bs
    if layer.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        m = fp8_max(layer.dtype)
        k = true_div(k, k_scale).clamp(-m, m)
        v = true_div(v, v_scale).clamp(-m, m)
        # scattered as raw bytes: older torch (2.4/2.5) has no fp8 index_put/index kernels everywhere
        raw = layer.view(torch.uint8)
        raw[blk, 0, off] = k.to(layer.dtype).view(torch.uint8)
        raw[blk, 1, off] = v.to(layer.dtype).view(torch.uint8)
        return
    layer[blk, 0, off] = k.to(layer.dtype)
    layer[blk, 1, off] = v.to(layer.dtype)


def gather_kv(layer: torch.Tensor, block_row: torch.Tensor, ctx: int, dtype: torch.dtype,
              k_scale: float = 1.0, v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    bs = layer.shape[2]
    nblk = (ctx + bs - 1) // bs
    fp8 = layer.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    src = layer.view(torch.uint8) if fp8 else layer  # no fp8 index kernel before torch ~2.7 ("index_cuda")
    pages = src[block_row[:nblk].long()]  # [nblk, 2, bs, H, D]
    if fp8:
        pages = pages.view(layer.dtype)
    k = pages[:, 0].reshape(-1, *pages.shape[-2:])[:ctx]
    v = pages[:, 1].reshape(-1, *pages.shape[-2:])[:ctx]
    if fp8:
        return (k.float() * k_scale).to(dtype), (v.float() * v_scale).to(dtype)
    return k.to(dtype), v.to(dtype)


def paged_attention(q: torch.Tensor, layer: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                    query_start: list[int] | None = None) -> torch.Tensor:
    """SDPA over each sequence's cached K/V with a causal mask offset by its context.

    q: [T, Hq, D] flattened by sequence -> out [T, Hq, D]. Query token r of sequence i sits at
    position ``context_lens[i] - query_lens[i] + r`` and sees keys at positions <= its own.
    """
    out = torch.empty_like(q)
    hq = q.shape[1]
    hkv = layer.shape[3]
    qls = query_lens.tolist()
    cls = context_lens.tolist()
    start = 0
    for i, (ql, cl) in enumerate(zip(qls, cls)):
        if ql == 0:
            continue
        k, v = gather_kv(layer, block_tables[i], cl, q.dtype, k_scale, v_scale)
        qi = q[start:start + ql].transpose(0, 1)  # [Hq, ql, D]
        k = k.transpose(0, 1).repeat_interleave(hq // hkv, 0)
        v = v.transpose(0, 1).repeat_interleave(hq // hkv, 0)
        qpos = torch.arange(cl - ql, cl, device=q.device)[:, None]
        kpos = torch.arange(cl, device=q.device)[None, :]
        mask = kpos <= qpos
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[start:start + ql] = o.transpose(0, 1)
        start += ql
    return out


# ----------------------------------------------------------------- decoder-layer pointwise steps (fused_ops.py)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, round to x's dtype, then scale by w."""
    dt = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta, w)); delta None: (x, rms_norm(x, w))."""
    if delta is not None:
        x = x + delta
    return x, rms_norm(x, w, eps)


def rope_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE'd q [T, H, D], k [T, KVH, D] and v [T, KVH, D] (contiguous) of a fused qkv output [T, (H + 2 KVH) D]."""
    t = qkv.shape[0]
    qs, ks = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :qs].view(t, num_heads, head_dim)
    k = qkv[:, qs:qs + ks].view(t, num_kv_heads, head_dim)
    v = qkv[:, qs + ks:].view(t, num_kv_heads, head_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v.contiguous()


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused gate_up output [T, 2 I]."""
    inter = gu.shape[-1] // 2
    return F.silu(gu[:, :inter]) * gu[:, inter:]
