"""Triton paged attention over the NHD cache ``[num_blocks, 2, block_size, Hkv, D]`` (varlen batch).

One program per (sequence, query head, tile of BM query rows): flash-attention style online softmax
over the sequence's keys, which are gathered page by page through its block table (any page
size: each key position looks up its page). Query row r of a sequence with ``q`` new tokens and
``c`` cached tokens sits at position ``c - q + r`` and attends to keys at positions <= its own, so
prefill chunks, decodes and mixed batches are one kernel. FP8 caches are decoded in registers
(``stored * k_scale``). GQA: query head h reads KV head ``h // (Hq / Hkv)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpulab.vajra.fp8_kernels import FORMATS, _load_fp8, interpreted


@dataclass
class AttnMetadata:
    query_start: torch.Tensor  # int32 [B]
    query_lens: torch.Tensor  # int32 [B]
    context_lens: torch.Tensor  # int32 [B]
    max_query_len: int


def make_metadata(query_lens: torch.Tensor, context_lens: torch.Tensor,
                  max_query_len: int | None = None) -> AttnMetadata:
    """``max_query_len`` given (1 for a decode-only batch) avoids reading ``query_lens`` back to the host:
    no device sync, so a decode step stays capturable in a CUDA graph."""
    ql = query_lens.to(torch.int32)
    start = (torch.cumsum(ql, 0) - ql).to(torch.int32)
    if max_query_len is not None:
        mq = int(max_query_len) if ql.numel() else 0
    else:
        mq = int(ql.max()) if ql.numel() else 0
    return AttnMetadata(start.contiguous(), ql.contiguous(), context_lens.to(torch.int32).contiguous(), mq)


@triton.jit
def _paged_attn_kernel(q_ptr, o_ptr, c_ptr, bt_ptr, qs_ptr, ql_ptr, cl_ptr,
                       s_qt, s_qh, s_ot, s_oh, s_cb, s_ckv, s_cs, s_ch, s_bt,
                       sm_scale_log2, k_scale, v_scale,
                       GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, FP8: tl.constexpr, NATIVE: tl.constexpr,
                       EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_start = tl.load(qs_ptr + seq)
    ql = tl.load(ql_ptr + seq)
    cl = tl.load(cl_ptr + seq)
    if mb * BM < ql:
        rows = mb * BM + tl.arange(0, BM)
        rmask = rows < ql
        qpos = cl - ql + rows
        d = tl.arange(0, D)
        kvh = h // GROUP
        q = tl.load(q_ptr + (q_start + rows)[:, None] * s_qt + h * s_qh + d[None, :], mask=rmask[:, None], other=0.0)
        m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, D], dtype=tl.float32)
        kv_end = tl.minimum(cl, cl - ql + (mb + 1) * BM)
        for start in range(0, kv_end, BN):
            kpos = start + tl.arange(0, BN)
            kmask = kpos < kv_end
            blk = tl.load(bt_ptr + seq * s_bt + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
            base = c_ptr + blk * s_cb + (kpos % PAGE) * s_cs + kvh * s_ch
            kp = base[:, None] + d[None, :]
            if FP8:
                k = (_load_fp8(kp, kmask[:, None], NATIVE, EBITS, MBITS, BIAS) * k_scale).to(q.dtype)
                v = (_load_fp8(kp + s_ckv, kmask[:, None], NATIVE, EBITS, MBITS, BIAS) * v_scale).to(q.dtype)
            else:
                k = tl.load(kp, mask=kmask[:, None], other=0.0).to(q.dtype)
                v = tl.load(kp + s_ckv, mask=kmask[:, None], other=0.0).to(q.dtype)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * sm_scale_log2
            ok = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(o_ptr + (q_start + rows)[:, None] * s_ot + h * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rmask[:, None])


def paged_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, meta: AttnMetadata,
                    scale: float, k_scale: float = 1.0, v_scale: float = 1.0, BM: int | None = None,
                    BN: int = 32, native: bool | None = None) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]; cache [num_blocks, 2, page, Hkv, D]; block_tables int32 [B, max_blocks]."""
    t, hq, d = q.shape
    nb, two, page, hkv, d2 = cache.shape
    if d2 != d or two != 2 or hq % hkv:
        raise ValueError(f"paged attention: q {list(q.shape)} does not fit the cache {list(cache.shape)}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"paged attention: head_dim must be a power of two >= 16, got {d}")
    out = torch.empty_like(q)
    b = meta.query_lens.shape[0]
    if b == 0 or meta.max_query_len == 0:
        return out
    fp8 = cache.dtype in FORMATS
    eb, mb_, bias = FORMATS.get(cache.dtype, (4, 3, 7))
    native = (cache.is_cuda and not interpreted()) if native is None else native
    c = cache.view(torch.uint8) if (fp8 and not native) else cache
    if BM is None:
        BM = 16 if meta.max_query_len <= 16 else 64
    bt = block_tables.to(torch.int32).contiguous()
    grid = (b, hq, triton.cdiv(meta.max_query_len, BM))
    _paged_attn_kernel[grid](q, out, c, bt, meta.query_start, meta.query_lens, meta.context_lens,
                             q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                             c.stride(0), c.stride(1), c.stride(2), c.stride(3), bt.stride(0),
                             float(scale) * 1.4426950408889634, float(k_scale), float(v_scale),
                             GROUP=hq // hkv, PAGE=page, D=d, BM=BM, BN=BN, FP8=fp8, NATIVE=native,
                             EBITS=eb, MBITS=mb_, BIAS=bias, IEEE=q.dtype == torch.float32)
    return out
