"""Triton paged attention over the NHD cache ``[num_blocks, 2, block_size, Hkv, D]`` (varlen batch).

One program per (sequence, query head, tile of BM query rows): flash-attention style online softmax
over the sequence's keys, which are gathered page by page through its block table (any page
size: each key position looks up its page). Query row r of a sequence with ``q`` new tokens and
``c`` cached tokens sits at position ``c - q + r`` and attends to keys at positions <= its own, so
prefill chunks, decodes and mixed batches are one kernel. FP8 caches enter the products as their stored
values (exactly in fp16 for 16-bit queries, fp32 otherwise), the k scale folded into the scores' scale and
the v scale applied to the output. GQA: query head h reads KV head ``h // (Hq / Hkv)``.

Decode-only batches (one new token per sequence) go to :func:`paged_decode_attention` instead, a
flash-decoding kernel: one program per (sequence, KV head, KV split) whose rows are the query heads
sharing that KV head, plus a log-sum-exp merge of the splits (see the section below). The general
kernel stays for prefill chunks and mixed batches.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpulab.core.device import sm_count
from gpulab.core.triton_compat import patch_interpreter
from gpulab.vajra.fp8_kernels import FORMATS, _load_fp8, interpreted, native_fp8
from gpulab.vajra.fp8_ptx import (GPU_LACKS, PTX_OFF, conversion_problem, device_key, e4m3_to_f16_ptx, ptx_disabled,
                                   ptx_usable)

patch_interpreter()  # Triton 3.0-3.6's interpreter with NumPy >= 2.4 (see gpulab.core.triton_compat)


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
def _fp8_math_q(q, F16: tl.constexpr):
    """The query in the dtype of an FP8 tile's math: fp16 for 16-bit queries (F16), else unchanged (fp32, IEEE).
    A bf16 query converts exactly within fp16's normal range (2^-14 <= |q| <= 65504; below it fp16 subnormals
    keep fewer bits); a finite one beyond is clamped to +-65504, NaN and infinities stay what they are."""
    if F16:
        if q.dtype == tl.bfloat16:
            x = q.to(tl.float32)
            big = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
            return tl.where(tl.abs(x) < float("inf"), big, x).to(tl.float16)
        else:
            return q.to(tl.float16)
    else:
        return q


@triton.jit
def _tile_query(q, sm_scale_log2, k_scale, FP8: tl.constexpr, F16: tl.constexpr):
    """A kernel's query and scores' scale for _attend_tile: over an FP8 cache the query in its math dtype
    (_fp8_math_q) and k_scale folded into the scale; over a 16-bit cache both as they are."""
    s_scale = sm_scale_log2
    if FP8:
        q = _fp8_math_q(q, F16)
        s_scale = sm_scale_log2 * k_scale
    return q, s_scale


@triton.jit
def _attend_tile(q, c_ptr, bt_ptr, seq, kvh, kpos, kmask, ok, d, m_i, l_i, acc,
                 s_cb, s_ckv, s_cs, s_ch, s_bt, s_scale,
                 PAGE: tl.constexpr, FP8: tl.constexpr, NATIVE: tl.constexpr, EBITS: tl.constexpr,
                 MBITS: tl.constexpr, BIAS: tl.constexpr, IEEE: tl.constexpr, V_PTX: tl.constexpr):
    """One online-softmax step over a tile of key positions ``kpos`` of sequence ``seq`` (KV head ``kvh``):
    gather K/V through the block table, scores ``q . k * s_scale`` masked by ``ok``, updated (m_i, l_i, acc)
    in base 2. FP8 K/V enter the products as their stored values, converted exactly to q's dtype (fp16 or
    fp32, see _fp8_math_q): the caller folds k_scale into ``s_scale`` and multiplies the output by v_scale,
    so a tile costs one conversion per value and no multiply."""
    blk = tl.load(bt_ptr + seq * s_bt + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
    kp = (c_ptr + blk * s_cb + (kpos % PAGE) * s_cs + kvh * s_ch)[:, None] + d[None, :]
    if FP8 and not NATIVE:  # raw bytes decoded by integer arithmetic (exact)
        k = _load_fp8(kp, kmask[:, None], NATIVE, EBITS, MBITS, BIAS).to(q.dtype)
        v = _load_fp8(kp + s_ckv, kmask[:, None], NATIVE, EBITS, MBITS, BIAS).to(q.dtype)
    else:  # a 16-bit cache, or FP8 loaded natively: straight to q's dtype; V by PTX where it serves (e4m3)
        k = tl.load(kp, mask=kmask[:, None], other=0.0).to(q.dtype)
        if V_PTX:
            v = e4m3_to_f16_ptx(tl.load(kp + s_ckv, mask=kmask[:, None], other=0.0))
        else:
            v = tl.load(kp + s_ckv, mask=kmask[:, None], other=0.0).to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(ok, s * s_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _paged_attn_kernel(q_ptr, o_ptr, c_ptr, bt_ptr, qs_ptr, ql_ptr, cl_ptr,
                       s_qt, s_qh, s_ot, s_oh, s_cb, s_ckv, s_cs, s_ch, s_bt,
                       sm_scale_log2, k_scale, v_scale,
                       GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, FP8: tl.constexpr, NATIVE: tl.constexpr,
                       EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, IEEE: tl.constexpr,
                       F16: tl.constexpr, V_PTX: tl.constexpr):
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
        q, s_scale = _tile_query(q, sm_scale_log2, k_scale, FP8, F16)
        m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, D], dtype=tl.float32)
        kv_end = tl.minimum(cl, cl - ql + (mb + 1) * BM)
        for start in range(0, kv_end, BN):
            kpos = start + tl.arange(0, BN)
            kmask = kpos < kv_end
            ok = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
            m_i, l_i, acc = _attend_tile(q, c_ptr, bt_ptr, seq, kvh, kpos, kmask, ok, d, m_i, l_i, acc,
                                         s_cb, s_ckv, s_cs, s_ch, s_bt, s_scale,
                                         PAGE, FP8, NATIVE, EBITS, MBITS, BIAS, IEEE, V_PTX)
        if FP8:
            acc = acc * v_scale
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(o_ptr + (q_start + rows)[:, None] * s_ot + h * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rmask[:, None])


def _fp8_math_in_fp16(fp8: bool, q: torch.Tensor) -> bool:
    """Whether an FP8 cache's tiles multiply in fp16 (16-bit queries). e4m3 and e5m2 values are exact in fp16,
    and on sm_89+ a pair converts in one instruction. The bf16 math this replaced took e4m3 -> fp16 -> fp32, a
    multiply by the scale and a repack to bf16 for every value: in the sm_90 SASS of the decode tile, 903
    instructions per 64-key step, against 444 for a bf16 cache (twice the bytes); now 430 with V's PTX
    conversion (scripts/sass_counts.py, Triton 3.8)."""
    return fp8 and q.dtype in (torch.float16, torch.bfloat16)


def _check_shapes(what: str, q: torch.Tensor, cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    """q [T, Hq, D] against cache [num_blocks, 2, page, Hkv, D] -> (T, Hq, D, page, Hkv); ValueError otherwise."""
    t, hq, d = q.shape
    nb, two, page, hkv, d2 = cache.shape
    if d2 != d or two != 2 or hq % hkv:
        raise ValueError(f"{what}: q {list(q.shape)} does not fit the cache {list(cache.shape)}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"{what}: head_dim must be a power of two >= 16, got {d}")
    if cache.stride(-1) != 1:
        raise ValueError(f"{what}: the cache's last dimension must be contiguous (strides {list(cache.stride())})")
    return t, hq, d, page, hkv


def _check_tables(what: str, block_tables: torch.Tensor, n_seqs: int) -> None:
    """One block-table row per sequence (a shape check: no host sync, so CUDA graphs stay capturable)."""
    if block_tables.dim() != 2 or block_tables.shape[0] < n_seqs:
        raise ValueError(f"{what}: block tables {list(block_tables.shape)} for {n_seqs} sequences")


def paged_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, meta: AttnMetadata,
                    scale: float, k_scale: float = 1.0, v_scale: float = 1.0, BM: int | None = None,
                    BN: int = 32, native: bool | None = None, v_ptx: bool | None = None) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]; cache [num_blocks, 2, page, Hkv, D]; block_tables int32 [B, max_blocks]."""
    t, hq, d, page, hkv = _check_shapes("paged attention", q, cache)
    if q.stride(2) != 1:  # the kernel steps over D with stride 1 (q and out)
        q = q.contiguous()
    out = torch.empty_like(q)
    b = meta.query_lens.shape[0]
    _check_tables("paged attention", block_tables, b)
    if b == 0 or meta.max_query_len == 0:
        return out
    fp8 = cache.dtype in FORMATS
    eb, mb_, bias = FORMATS.get(cache.dtype, (4, 3, 7))
    native = (fp8 and native_fp8(cache)) if native is None else native
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
                             EBITS=eb, MBITS=mb_, BIAS=bias, IEEE=q.dtype == torch.float32,
                             F16=_fp8_math_in_fp16(fp8, q), V_PTX=_v_ptx(q, cache, native, v_ptx))
    return out


# ------------------------------------------------------------------------------------------- decode
#
# Flash-decoding for decode-only batches (one new token per sequence, token i of the step belongs to
# sequence i). One program per (sequence, KV head, KV split): its rows are the GROUP query heads that
# share the KV head (padded to BH >= 16, the smallest tl.dot), so each K/V page is read once per KV
# head, not GROUP times. The split's keys: the sequence's pages are cut into ``num_splits`` chunks of
# ``_split_pages`` pages each, computed ON THE DEVICE from the sequence's own context length. The grid
# (B, Hkv, num_splits) depends only on the batch size and the model, never on context lengths, so the
# step is capturable in a CUDA graph and replays correctly after the lengths change, while every split
# of a long sequence gets an equal share of its keys (a chunk fixed by the block-table width would
# leave most splits idle when the table is as wide as max_model_len: 8192 pages for Llama-3.1).
# A split past the context writes an empty partial (m = -inf, l = 0). The merge kernel combines the
# partials of the non-empty splits with log-sum-exp weights; with one split the kernel writes the
# output itself.

DECODE_MAX_SPLITS = 32
DECODE_CPU_SPLITS = 2  # interpreter / CPU: a fixed small value (tests pass num_splits themselves)


@triton.jit
def _split_pages(cl, NUM_SPLITS, PAGE: tl.constexpr, UNIT: tl.constexpr):
    """Pages per split for a sequence of ``cl`` tokens: an equal share, rounded up to UNIT pages
    (UNIT pages = one BN tile of keys when BN >= PAGE), at least UNIT."""
    npages = (cl + PAGE - 1) // PAGE
    per = (npages + NUM_SPLITS - 1) // NUM_SPLITS
    per = (per + UNIT - 1) // UNIT * UNIT
    return tl.maximum(per, UNIT)


@triton.jit
def _paged_decode_kernel(q_ptr, o_ptr, c_ptr, bt_ptr, cl_ptr, po_ptr, pml_ptr,
                         s_qt, s_qh, s_ot, s_oh, s_cb, s_ckv, s_cs, s_ch, s_bt,
                         s_pb, s_ph, s_ps, NUM_SPLITS,
                         sm_scale_log2, k_scale, v_scale,
                         GROUP: tl.constexpr, BH: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
                         BN: tl.constexpr, UNIT: tl.constexpr, DIRECT: tl.constexpr, FP8: tl.constexpr,
                         NATIVE: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
                         IEEE: tl.constexpr, F16: tl.constexpr, V_PTX: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    cl = tl.load(cl_ptr + seq)
    per = _split_pages(cl, NUM_SPLITS, PAGE, UNIT)
    k_lo = split * per * PAGE
    k_hi = tl.minimum(cl, k_lo + per * PAGE)
    r = tl.arange(0, BH)
    rmask = r < GROUP
    h = kvh * GROUP + r
    d = tl.arange(0, D)
    if k_lo < k_hi:
        q = tl.load(q_ptr + seq * s_qt + h[:, None] * s_qh + d[None, :], mask=rmask[:, None], other=0.0)
        q, s_scale = _tile_query(q, sm_scale_log2, k_scale, FP8, F16)
        m_i = tl.full([BH], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BH], dtype=tl.float32)
        acc = tl.zeros([BH, D], dtype=tl.float32)
        for start in range(k_lo, k_hi, BN):
            kpos = start + tl.arange(0, BN)
            kmask = kpos < k_hi
            m_i, l_i, acc = _attend_tile(q, c_ptr, bt_ptr, seq, kvh, kpos, kmask, kmask[None, :], d, m_i, l_i, acc,
                                         s_cb, s_ckv, s_cs, s_ch, s_bt, s_scale,
                                         PAGE, FP8, NATIVE, EBITS, MBITS, BIAS, IEEE, V_PTX)
        if FP8:
            acc = acc * v_scale
        if DIRECT:
            out = acc / tl.maximum(l_i, 1e-30)[:, None]
            tl.store(o_ptr + seq * s_ot + h[:, None] * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=rmask[:, None])
        else:
            pbase = seq * s_pb + h * s_ph + split * s_ps  # [BH]
            tl.store(po_ptr + pbase[:, None] * D + d[None, :], acc, mask=rmask[:, None])
            tl.store(pml_ptr + pbase * 2, m_i, mask=rmask)
            tl.store(pml_ptr + pbase * 2 + 1, l_i, mask=rmask)
    else:  # past the context: an empty partial (the merge reads only the non-empty splits)
        if DIRECT:
            tl.store(o_ptr + seq * s_ot + h[:, None] * s_oh + d[None, :],
                     tl.zeros([BH, D], dtype=o_ptr.dtype.element_ty), mask=rmask[:, None])
        else:
            pbase = seq * s_pb + h * s_ph + split * s_ps
            tl.store(pml_ptr + pbase * 2, tl.full([BH], float("-inf"), tl.float32), mask=rmask)
            tl.store(pml_ptr + pbase * 2 + 1, tl.zeros([BH], dtype=tl.float32), mask=rmask)


@triton.jit
def _decode_merge_kernel(o_ptr, cl_ptr, po_ptr, pml_ptr, s_ot, s_oh, s_pb, s_ph, s_ps, NUM_SPLITS,
                         PAGE: tl.constexpr, D: tl.constexpr, UNIT: tl.constexpr, SP: tl.constexpr):
    """One program per (sequence, query head): log-sum-exp merge of its non-empty split partials."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    cl = tl.load(cl_ptr + seq)
    per = _split_pages(cl, NUM_SPLITS, PAGE, UNIT)
    n_active = (cl + per * PAGE - 1) // (per * PAGE)  # splits whose chunk starts inside the context
    sp = tl.arange(0, SP)
    smask = sp < n_active
    d = tl.arange(0, D)
    pbase = seq * s_pb + h * s_ph + sp * s_ps
    m = tl.load(pml_ptr + pbase * 2, mask=smask, other=float("-inf"))
    l_s = tl.load(pml_ptr + pbase * 2 + 1, mask=smask, other=0.0)
    acc = tl.load(po_ptr + pbase[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    m_max = tl.maximum(tl.max(m, axis=0), -1.0e30)  # finite even with no split (cl = 0)
    w = tl.where(smask, tl.exp2(m - m_max), 0.0)
    l_tot = tl.sum(l_s * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.maximum(l_tot, 1e-30)
    tl.store(o_ptr + seq * s_ot + h * s_oh + d, out.to(o_ptr.dtype.element_ty))


def _decode_bn(device: torch.device) -> int:
    return 64 if (device.type == "cuda" and not interpreted()) else 32


def decode_num_splits(batch: int, num_kv_heads: int, max_blocks: int, page: int, device: torch.device,
                      BN: int | None = None) -> int:
    """KV splits per (sequence, KV head): enough programs for about two per SM when batch x Hkv is
    small, a power of two up to DECODE_MAX_SPLITS, at most one split per BN tile of the block table;
    1 (no merge pass) once batch x Hkv alone fills the GPU. A fixed small value on the CPU/interpreter.
    Depends only on the batch size, the model and the block-table width: graph-capturable."""
    unit_pages = max(1, (BN or _decode_bn(device)) // page)
    cap = max(1, min(DECODE_MAX_SPLITS, -(-max_blocks // unit_pages)))
    if device.type != "cuda" or interpreted():
        return max(1, min(DECODE_CPU_SPLITS, cap))
    want = -(-2 * sm_count(device) // max(1, batch * num_kv_heads))
    s = 1
    while s * 2 <= min(want, cap):
        s *= 2
    return s


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                           num_splits: int | None = None, BN: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, native: bool | None = None,
                           v_ptx: bool | None = None) -> torch.Tensor:
    """Decode-only batch: q [B, Hq, D] (token i = the one new token of sequence i, whose K/V is already
    in the cache at position context_lens[i] - 1) -> out [B, Hq, D]. cache [num_blocks, 2, page, Hkv, D];
    block_tables int32 [B, max_blocks]; context_lens int32 [B] (on the device; never read on the host)."""
    b, hq, d, page, hkv = _check_shapes("paged decode attention", q, cache)
    if context_lens.shape[0] != b or block_tables.shape[0] != b:
        raise ValueError(f"paged decode attention: {b} queries but {context_lens.shape[0]} context lengths and "
                         f"{block_tables.shape[0]} block-table rows (one new token per sequence)")
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if b == 0:
        return out
    if BN is None:
        BN = _decode_bn(q.device)
    if BN & (BN - 1) or BN < 16:
        raise ValueError(f"paged decode attention: BN must be a power of two >= 16, got {BN}")
    fp8 = cache.dtype in FORMATS
    eb, mb_, bias = FORMATS.get(cache.dtype, (4, 3, 7))
    native = (fp8 and native_fp8(cache)) if native is None else native
    c = cache.view(torch.uint8) if (fp8 and not native) else cache
    bt = block_tables if (block_tables.dtype == torch.int32 and block_tables.is_contiguous()) \
        else block_tables.to(torch.int32).contiguous()
    cl = context_lens if (context_lens.dtype == torch.int32 and context_lens.is_contiguous()) \
        else context_lens.to(torch.int32).contiguous()
    group = hq // hkv
    bh = max(16, triton.next_power_of_2(group))
    unit = max(1, BN // page)
    if num_splits is None:
        num_splits = decode_num_splits(b, hkv, bt.shape[1], page, q.device, BN)
    num_splits = int(num_splits)
    if num_splits < 1:
        raise ValueError(f"paged decode attention: num_splits must be >= 1, got {num_splits}")
    direct = num_splits == 1
    if direct:
        po = pml = out  # unused
        s_pb = s_ph = s_ps = 0
    else:
        po = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
        pml = torch.empty(b, hq, num_splits, 2, dtype=torch.float32, device=q.device)
        s_pb, s_ph, s_ps = hq * num_splits, num_splits, 1  # in partial rows (D floats; 2 floats in pml)
    kw = {}
    if num_warps is not None:
        kw["num_warps"] = num_warps
    if num_stages is not None:
        kw["num_stages"] = num_stages
    _paged_decode_kernel[(b, hkv, num_splits)](
        q, out, c, bt, cl, po, pml,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        c.stride(0), c.stride(1), c.stride(2), c.stride(3), bt.stride(0),
        s_pb, s_ph, s_ps, num_splits,
        float(scale) * 1.4426950408889634, float(k_scale), float(v_scale),
        GROUP=group, BH=bh, PAGE=page, D=d, BN=BN, UNIT=unit, DIRECT=direct, FP8=fp8, NATIVE=native,
        EBITS=eb, MBITS=mb_, BIAS=bias, IEEE=q.dtype == torch.float32, F16=_fp8_math_in_fp16(fp8, q),
        V_PTX=_v_ptx(q, cache, native, v_ptx), **kw)
    if not direct:
        _decode_merge_kernel[(b, hq)](out, cl, po, pml, out.stride(0), out.stride(1), s_pb, s_ph, s_ps,
                                      num_splits, PAGE=page, D=d, UNIT=unit,
                                      SP=triton.next_power_of_2(num_splits))
    return out


# ---------------------------------------------------------------------------- the V conversion's probe
#
# V's e4m3 -> fp16 conversion by inline PTX (fp8_ptx.e4m3_to_f16_ptx) relies on how Triton packs four bytes into
# one register for inline assembly. A GPU checks it once per (device, dtype, heads, head_dim, page), outside any
# CUDA-graph capture: the recipe over every code (fp8_ptx.conversion_problem), then both kernels at the tiles
# they serve with (the decode kernel with one split and with two and the merge), on a few short sequences (a
# 1-token one, and each prompt's first row, sees one key: a misplaced byte moves whole output values), against
# the SDPA reference in fp32. Where a check fails, or has not run when a capture starts, or GPULAB_FP8_PTX=0,
# the kernels convert V with Triton's own cast (correct, more instructions).

_V_PTX_PROBLEMS: dict[tuple, str | None] = {}


def _v_ptx(q: torch.Tensor, cache: torch.Tensor, native: bool, v_ptx: bool | None) -> bool:
    if not (native and cache.dtype == torch.float8_e4m3fn and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    if v_ptx is not None:
        return bool(v_ptx)
    if not ptx_usable(q.device, "f16"):
        return False
    # (a tensor's device string carries its index, as device_key makes the probe's)
    key = (str(q.device), q.dtype, q.shape[1], cache.shape[3], q.shape[2], cache.shape[2])
    if key not in _V_PTX_PROBLEMS:
        if torch.cuda.is_current_stream_capturing():
            return False
        fp8_v_ptx_problem(*key)
    return _V_PTX_PROBLEMS[key] is None


def fp8_v_ptx_problem(device: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                      page: int = 16) -> str | None:
    """Why V's inline-PTX conversion must not serve an e4m3 cache on ``device`` with ``dtype`` queries of this
    head layout and page size (None: it serves), checked once and remembered; fp8_ptx.gpu_lacks(why) where the GPU
    has no native e4m3."""
    if ptx_disabled():
        return PTX_OFF
    key = (device_key(device), dtype, num_heads, num_kv_heads, head_dim, page)
    if key in _V_PTX_PROBLEMS:
        return _V_PTX_PROBLEMS[key]
    from gpulab.vajra import reference as ref

    why = None
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        lens = [1, 3, 37]
        blocks = [(n + page - 1) // page for n in lens]
        cache = (torch.randn(sum(blocks), 2, page, num_kv_heads, head_dim, generator=g) * 40).to(
            torch.float8_e4m3fn).to(device)
        if not native_fp8(cache):
            why = f"{GPU_LACKS} native e4m3"
        elif recipe := conversion_problem(device, "f16"):  # the recipe itself, every code (what ptx_usable asks)
            why = f"the e4m3 -> fp16 recipe: {recipe}"
        else:
            bt = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
            first = 0
            for i, nb in enumerate(blocks):  # each sequence's pages in reverse order
                bt[i, :nb] = torch.arange(first + nb - 1, first - 1, -1)
                first += nb
            bt, cl = bt.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
            # the 1-token sequence's output, and each prompt's first row, is one key's V: a misplaced byte shows whole
            q = (torch.randn(len(lens), num_heads, head_dim, generator=g) * 2).to(device=device, dtype=dtype)
            scale, ks, vs = head_dim ** -0.5, 0.05, 0.02

            def problem(got, qq, qlens, what):
                want = ref.paged_attention(qq.float(), cache, qlens, cl, bt, scale, ks, vs)
                err = float((got.float() - want).abs().max())
                return None if err <= 0.05 * float(want.abs().max()) else \
                    f"{what}: max error {err:.3g} against the reference"

            for splits in (1, 2):  # the kernel writing the output itself, and partials with the merge
                why = why or problem(paged_decode_attention(q, cache, bt, cl, scale, ks, vs, num_splits=splits,
                                                            v_ptx=True), q, torch.ones_like(cl),
                                     f"decode kernel ({splits} split{'s' if splits > 1 else ''})")
            meta = make_metadata(cl, cl)  # prefill: every sequence's whole prompt
            for bm in (16, 64):  # the prefill kernel's two query tiles
                qs = (torch.randn(sum(lens), num_heads, head_dim, generator=g) * 2).to(device=device, dtype=dtype)
                why = why or problem(paged_attention(qs, cache, bt, meta, scale, ks, vs, BM=bm, v_ptx=True), qs, cl,
                                     f"prefill kernel (BM {bm})")
    except Exception as e:  # noqa: BLE001 - a compiler or launch error: Triton's own conversion serves
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    _V_PTX_PROBLEMS[key] = why
    return why
