"""Fused kernels of the decoder layer (Triton): residual add + RMSNorm, RoPE + q/k/v split, SiLU * up, and the
K/V store into the paged cache.

Eager torch runs about forty small kernels per Llama decoder layer around its four GEMMs (RMSNorm alone
is seven: cast, square, mean, add, rsqrt, multiply, cast and weight; RoPE five per tensor). At batch 1
each costs a few microseconds of launch and latency even inside a CUDA graph: at Llama-3.1-8B shapes
(32 layers) about 1,400 kernels per decode step, milliseconds against the ~2.7 ms the FP8 weights take
to stream. The K/V store into the paged cache was another five to ten (block and offset arithmetic, two
index_put scatters, FP8 scaling); ``store_kv`` is one. With these kernels a layer runs about eleven.

Each kernel rounds where the unfused torch ops round (bf16 / fp16 after every op), so the two paths
agree to the last bit in most elements (under the CPU interpreter in fp32 RoPE and the K/V store in all, the
norm and SiLU within an ulp: their sums and exp are not in torch's order (about 15% of elements differ by one
ulp); on an H200 in bf16 the norm's nearly
all, RoPE's 77%: the likely cause, Triton's contraction of its multiply-adds into FMAs, is now off (see
ROUND_AS_TORCH), and SiLU computes torch's expf and division (see SILU_AS_TORCH); neither rerun on a GPU yet;
the probe and tests compare within bf16 rounding); the torch ops in
``reference.py`` are the reference, and the CPU tests run these kernels under ``TRITON_INTERPRET=1`` in fp32
against them. Where the W8A16 GEMM splits K,
the norm and RoPE kernels also sum its fp32 partials (``Linear(x, partials=True)``), which saves the
separate reduction kernel of the o, down and qkv projections. ``fused_ops_problem`` probes
them once per device, dtype and model size; the model falls back to the unfused ops where they fail.
"""
import functools

import torch
import triton
import triton.language as tl

from gpulab.core.triton_compat import patch_interpreter
from gpulab.vajra.fp8_kernels import FORMATS, encode_fp8, interpreted

try:  # the backend-dispatching module (Triton >= 3.0); the CUDA one by its own path otherwise
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

patch_interpreter()  # Triton 3.0-3.6's interpreter with NumPy >= 2.4 (see gpulab.core.triton_compat)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, xo_ptr, h_ptr, N, s_x, s_d, s_xo, s_h, eps, SPLIT, s_split,
                         HAS_DELTA: tl.constexpr, PARTIAL: tl.constexpr, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr,
                         EVEN: tl.constexpr = False):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(x_ptr + row * s_x + cols, mask=m, other=0.0)
    if HAS_DELTA:  # the residual stream in its own dtype, as x + delta in torch
        if PARTIAL:  # delta as split-K partial sums (fp32): summed, then rounded as the separate reduction would
            # (one [SPLIT, BLOCK] load: its PTX issues every partial's loads before the first add; ptxas then
            # interleaves them with the adds, keeping ~3 loads in flight a thread against ~1.6 for a loop over the
            # partials (sm_90 SASS). At batch 1 one program does the whole row, and these round trips to the L2 are
            # the likely cause of the 5 us an 8B norm took on an H200; unmeasured since. The sum is a tree, not the
            # sequential order of the separate reduction: within fp32 rounding of it)
            sp = tl.arange(0, SPLIT_P2)
            if EVEN:
                parts = tl.load(d_ptr + sp[:, None] * s_split + row * s_d + cols[None, :])
            else:
                parts = tl.load(d_ptr + sp[:, None] * s_split + row * s_d + cols[None, :],
                                mask=(sp[:, None] < SPLIT) & m[None, :], other=0.0)
            d = tl.sum(parts, axis=0).to(xo_ptr.dtype.element_ty)
        else:
            d = tl.load(d_ptr + row * s_d + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * s_xo + cols, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    h = (xf * tl.rsqrt(var + eps)).to(h_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    tl.store(h_ptr + row * s_h + cols, (w.to(tl.float32) * h.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_split_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, s_qkv, s_cs, NQ, NKV, SPLIT, s_split,
                       HALF: tl.constexpr, BH: tl.constexpr, PARTIAL: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    d = tl.arange(0, HALF)
    D = 2 * HALF
    total = NQ + 2 * NKV
    hm = heads < total
    dt = q_ptr.dtype.element_ty
    src = qkv_ptr + t * s_qkv + heads[:, None] * D + d[None, :]
    if PARTIAL:  # qkv as split-K partial sums (fp32): summed, then rounded as the separate reduction would
        x1 = tl.zeros([BH, HALF], dtype=tl.float32)
        x2 = tl.zeros([BH, HALF], dtype=tl.float32)
        for i in range(0, SPLIT):
            x1 += tl.load(src + i * s_split, mask=hm[:, None], other=0.0)
            x2 += tl.load(src + i * s_split + HALF, mask=hm[:, None], other=0.0)
        x1 = x1.to(dt)
        x2 = x2.to(dt)
    else:
        x1 = tl.load(src, mask=hm[:, None], other=0.0)
        x2 = tl.load(src + HALF, mask=hm[:, None], other=0.0)
    # cos/sin hold cat(freqs, freqs): both halves of a head share the first half's values
    c = tl.load(cos_ptr + t * s_cs + d)[None, :].to(tl.float32)
    s = tl.load(sin_ptr + t * s_cs + d)[None, :].to(tl.float32)
    # q * cos + rotate_half(q) * sin with torch's rounding after each op; rotate_half(x) = cat(-x2, x1)
    a1 = (x1.to(tl.float32) * c).to(dt).to(tl.float32)
    b1 = (-x2.to(tl.float32) * s).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s).to(dt).to(tl.float32)
    rotate = heads < NQ + NKV  # q and k heads; v heads pass through
    o1 = tl.where(rotate[:, None], (a1 + b1).to(dt), x1)
    o2 = tl.where(rotate[:, None], (a2 + b2).to(dt), x2)
    is_q = heads < NQ
    is_k = (heads >= NQ) & rotate
    is_v = (heads >= NQ + NKV) & hm
    qh = tl.where(is_q, heads, 0)
    kh = tl.where(is_k, heads - NQ, 0)
    vh = tl.where(is_v, heads - NQ - NKV, 0)
    qd = q_ptr + (t * NQ + qh)[:, None] * D + d[None, :]
    kd = k_ptr + (t * NKV + kh)[:, None] * D + d[None, :]
    vd = v_ptr + (t * NKV + vh)[:, None] * D + d[None, :]
    tl.store(qd, o1, mask=is_q[:, None])
    tl.store(qd + HALF, o2, mask=is_q[:, None])
    tl.store(kd, o1, mask=is_k[:, None])
    tl.store(kd + HALF, o2, mask=is_k[:, None])
    tl.store(vd, o1, mask=is_v[:, None])
    tl.store(vd + HALF, o2, mask=is_v[:, None])


@triton.jit
def _silu_mul_kernel(gu_ptr, o_ptr, INTER, s_gu, s_o, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < INTER
    g = tl.load(gu_ptr + row * s_gu + cols, mask=m, other=0.0)
    u = tl.load(gu_ptr + row * s_gu + INTER + cols, mask=m, other=0.0)
    gf = g.to(tl.float32)
    if LIBDEVICE:  # compiled: torch's CUDA silu, x / (1 + expf(-x)) with CUDA's expf and an IEEE division
        a = tl.math.div_rn(gf, 1.0 + libdevice.exp(-gf))
    else:  # the interpreter (no libdevice there): NumPy's exp and division, as torch's CPU silu
        a = gf / (1.0 + tl.exp(-gf))
    a = a.to(g.dtype)  # F.silu's output, rounded as torch rounds it
    tl.store(o_ptr + row * s_o + cols, (a.to(tl.float32) * u.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fp8_store_bytes(x, scale, FMAX: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """reference.write_kv's FP8 bytes of x: x / scale (a correctly rounded division, as reference.true_div),
    clamped (NaN kept), rounded to nearest even."""
    xf = x.to(tl.float32)
    y = tl.math.div_rn(xf, scale)
    y = tl.minimum(tl.maximum(y, -FMAX, propagate_nan=tl.PropagateNan.ALL), FMAX, propagate_nan=tl.PropagateNan.ALL)
    nan = ((y.to(tl.int32, bitcast=True) >> 24) & 0x80) | 0x7F
    return tl.where(y != y, nan, encode_fp8(tl.where(y != y, 0.0, y), EBITS, MBITS, BIAS)).to(tl.uint8)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, slot_ptr, c_ptr, s_kt, s_vt, s_cb, s_cv, s_cs, BS, HD, k_scale, v_scale,
                     FP8: tl.constexpr, FMAX: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
                     BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """One token's K and V [Hkv * D] into its slot of the paged cache layer [blocks, 2, bs, Hkv, D]."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BS
    off = slot - blk * BS
    cols = tl.arange(0, BLOCK)
    m = cols < HD
    dst = c_ptr + blk * s_cb + off * s_cs + cols
    k = tl.load(k_ptr + t * s_kt + cols, mask=m, other=0.0)
    v = tl.load(v_ptr + t * s_vt + cols, mask=m, other=0.0)
    if FP8:  # as reference.write_kv: scale, clamp, round to nearest even; stored as raw bytes
        tl.store(dst, _fp8_store_bytes(k, k_scale, FMAX, EBITS, MBITS, BIAS), mask=m)
        tl.store(dst + s_cv, _fp8_store_bytes(v, v_scale, FMAX, EBITS, MBITS, BIAS), mask=m)
    else:
        tl.store(dst, k.to(c_ptr.dtype.element_ty), mask=m)
        tl.store(dst + s_cv, v.to(c_ptr.dtype.element_ty), mask=m)


# Launch options of the kernels that round where the torch ops round. Triton's default FP fusion lets the compiler
# contract a product and the add after it into one FMA, one rounding where torch has two: RoPE's
# q * cos + rotate_half(q) * sin became fma.rn.bf16 in its sm_90 PTX, the likely reason why only 77% of its
# elements matched the torch ops to the bit on an H200 (2026-11-27). Without fusion its PTX rounds each product
# (mul.rn.bf16, add.rn.bf16; tests/vajra/model/test_kernels_compile.py checks). The interpreter takes no options.
ROUND_AS_TORCH = {"enable_fp_fusion": False}

# SiLU's launch options. torch's CUDA silu is x / (1 + expf(-x)) in fp32, built by nvcc: CUDA's expf (a range
# reduction by FMAs around ex2.approx), whose last product nvcc contracts with the + 1 into one FMA (its default
# --fmad=true), then an IEEE division. Triton's tl.exp is ex2.approx of x * log2(e), and its "/" an approximate
# division (div.full.f32). The kernel calls libdevice's expf (CUDA's expf, the same code) and div_rn, launched
# with FP fusion on so that the same contraction happens: its sm_90 PTX then has the instruction sequence that
# nvcc gives torch's expression (tests/vajra/model/test_kernels_compile.py compares the two; not yet run on a GPU).
SILU_AS_TORCH = {"enable_fp_fusion": True}


def _launch_options(**options) -> dict:
    return {} if interpreted() else {**ROUND_AS_TORCH, **options}


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{what}: expected a 2-D tensor with contiguous rows, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    return x


def _maybe_partials(y: torch.Tensor, what: str) -> tuple[torch.Tensor, int, int]:
    """(the [T, N] view of one split, number of splits, stride between splits) of a 2-D tensor or of W8A16's
    contiguous fp32 split-K partials [SPLIT, T, N]."""
    if y.dim() == 3:
        if y.dtype != torch.float32 or not y.is_contiguous():
            raise ValueError(f"{what}: split-K partials must be contiguous fp32 [SPLIT, T, N], got {y.dtype} "
                             f"{tuple(y.shape)}")
        return y[0], y.shape[0], y.stride(0)
    return _rows(y, what), 1, 0


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * w) in one kernel; without delta, (x, rms_norm(x) * w). ``delta`` may be
    W8A16's split-K partials [SPLIT, T, N] (fp32): summed and rounded to x's dtype first."""
    _rows(x, "add_rms_norm x")
    t, n = x.shape
    h = torch.empty_like(x)
    xo, d, split, s_split = x, x, 1, 0
    if delta is not None:
        d, split, s_split = _maybe_partials(delta, "add_rms_norm delta")
        if d.shape != x.shape:
            raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and delta {tuple(delta.shape)} differ")
        xo = torch.empty_like(x)
    if t:
        block = triton.next_power_of_2(n)
        partial = delta is not None and delta.dim() == 3
        # split-K partials of a wide row: 16 warps, so that each thread has half the loads to wait for (unmeasured)
        warps = 4 if block <= 2048 else 16 if partial else 8
        _add_rms_norm_kernel[(t,)](x, delta if delta is not None else x, w, xo, h, n, x.stride(0), d.stride(0),
                                   xo.stride(0), h.stride(0), float(eps), split, s_split,
                                   HAS_DELTA=delta is not None, PARTIAL=partial, BLOCK=block,
                                   SPLIT_P2=triton.next_power_of_2(split),
                                   EVEN=partial and n == block and split & (split - 1) == 0,
                                   **_launch_options(num_warps=warps))
    return xo, h


def rope_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE on the q and k heads of a fused qkv [T, (H + 2 KVH) * D] and the three split out contiguous:
    q [T, H, D], k [T, KVH, D], v [T, KVH, D] in cos's dtype. cos/sin: [T, 1, D] (or [T, D]) holding
    cat(freqs, freqs). ``qkv`` may be W8A16's split-K partials [SPLIT, T, ...] (fp32): summed and rounded first."""
    one, split, s_split = _maybe_partials(qkv, "rope_split qkv")
    t = one.shape[0]
    if one.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"rope_split: qkv has {one.shape[1]} columns, not ({num_heads} + 2 x {num_kv_heads}) "
                         f"x {head_dim}")
    cos2, sin2 = cos.reshape(t, head_dim), sin.reshape(t, head_dim)
    if cos2.stride(1) != 1 or sin2.stride() != cos2.stride():
        raise ValueError(f"rope_split: cos/sin must be [T, 1, {head_dim}] with contiguous rows")
    q = torch.empty((t, num_heads, head_dim), dtype=cos.dtype, device=qkv.device)
    k = torch.empty((t, num_kv_heads, head_dim), dtype=cos.dtype, device=qkv.device)
    v = torch.empty((t, num_kv_heads, head_dim), dtype=cos.dtype, device=qkv.device)
    half = head_dim // 2
    if t:
        if half & (half - 1):
            raise ValueError(f"rope_split: head_dim {head_dim} is not twice a power of two")
        bh = 4
        grid = (t, triton.cdiv(num_heads + 2 * num_kv_heads, bh))
        _rope_split_kernel[grid](qkv, cos2, sin2, q, k, v, one.stride(0), cos2.stride(0), num_heads, num_kv_heads,
                                 split, s_split, HALF=half, BH=bh, PARTIAL=qkv.dim() == 3, **_launch_options())
    return q, k, v


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gu[:, :I]) * gu[:, I:] for a fused gate_up output [T, 2 I]."""
    _rows(gu, "silu_mul")
    t, two_i = gu.shape
    if two_i % 2:
        raise ValueError(f"silu_mul: gate_up has an odd width {two_i}")
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=gu.dtype, device=gu.device)
    if t:
        block = 1024
        compiled = not interpreted()
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](gu, out, inter, gu.stride(0), out.stride(0), BLOCK=block,
                                                         LIBDEVICE=compiled, **(SILU_AS_TORCH if compiled else {}))
    return out


def store_kv(layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """reference.write_kv in one kernel: this step's K/V [T, Hkv, D] into their slots of the paged cache layer
    [blocks, 2, bs, Hkv, D] (an FP8 layer gets K / k_scale and V / v_scale, clamped and rounded as there)."""
    t = k.shape[0]
    if k.shape != v.shape or k.dim() != 3 or layer.dim() != 5 or layer.shape[3:] != k.shape[1:]:
        raise ValueError(f"store_kv: K {tuple(k.shape)} / V {tuple(v.shape)} do not fit the cache layer "
                         f"{tuple(layer.shape)}")
    if slot_mapping.shape[0] != t or not layer.is_contiguous():
        raise ValueError(f"store_kv: {slot_mapping.shape[0]} slots for {t} tokens (or a non-contiguous layer)")
    if not t:
        return
    k2, v2 = k.reshape(t, -1), v.reshape(t, -1)
    if k2.stride(1) != 1 or v2.stride(1) != 1:
        k2, v2 = k2.contiguous(), v2.contiguous()
    fp8 = layer.dtype in FORMATS
    eb, mb, bias = FORMATS[layer.dtype] if fp8 else (4, 3, 7)
    fmax = float(torch.finfo(layer.dtype).max) if fp8 else 0.0
    c = layer.view(torch.uint8) if fp8 else layer
    hd = k2.shape[1]
    _store_kv_kernel[(t,)](k2, v2, slot_mapping, c, k2.stride(0), v2.stride(0), c.stride(0), c.stride(1), c.stride(2),
                           layer.shape[2], hd, float(k_scale), float(v_scale), FP8=fp8, FMAX=fmax, EBITS=eb, MBITS=mb,
                           BIAS=bias, BLOCK=triton.next_power_of_2(hd))


# ----------------------------------------------------------------------------------- reference and probe


@functools.lru_cache(maxsize=8)
def fused_ops_problem(device: str, dtype: torch.dtype, hidden: int = 96, heads: int = 4, kv_heads: int = 2,
                      head_dim: int = 16, kv_dtype: torch.dtype | None = None,
                      splits: tuple[int, ...] = (2,)) -> str | None:
    """Why the fused kernels cannot serve on ``device`` in ``dtype`` (None: they can): each runs once on three
    tokens and is compared with the unfused torch ops. With the model's sizes (and KV-cache dtype) the probe
    builds the very kernels the model then runs, not extra ones; ``splits``: the numbers of W8A16 split-K partials
    the residual add + norm will sum (each a kernel variant of its own)."""
    from gpulab.vajra import reference as ref

    try:
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        def differ(got, want) -> bool:
            return not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)

        tol = 1e-5 if dtype == torch.float32 else 2e-2
        x, d, w = rnd(3, hidden), rnd(3, hidden), rnd(hidden)
        cases = [(d, d), (None, None)]
        for split in splits:
            parts = torch.randn(split, 3, hidden, generator=g).to(device)
            cases.append((parts, parts.sum(0).to(dtype)))
        for delta, want_delta in cases:
            if any(map(differ, add_rms_norm(x, delta, w, 1e-5), ref.add_rms_norm(x, want_delta, w, 1e-5))):
                return "add_rms_norm differs from the torch ops"
        width = (heads + 2 * kv_heads) * head_dim
        qkv = rnd(3, width)
        ang = torch.rand(3, 1, head_dim // 2, generator=g) * 6
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(device=device, dtype=dtype)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(device=device, dtype=dtype)
        qparts = torch.randn(2, 3, width, generator=g).to(device)
        for inp, want_inp in ((qkv, qkv), (qparts, qparts.sum(0).to(dtype))):
            got = rope_split(inp, cos, sin, heads, kv_heads, head_dim)
            if any(map(differ, got, ref.rope_split(want_inp, cos, sin, heads, kv_heads, head_dim))):
                return "rope_split differs from the torch ops"
        gu = rnd(3, 2 * 80)
        if differ(silu_mul(gu), ref.silu_mul(gu)):
            return "silu_mul differs from the torch ops"
        slots = torch.tensor([21, 0, 47], device=device)
        kk, vv = got[1], got[2]
        cdt = kv_dtype or dtype  # the model's cache: 16-token pages, as the engine's
        shape = (4, 2, 16, kv_heads, head_dim)
        a = torch.zeros(shape, dtype=torch.uint8, device=device).view(cdt) if cdt.itemsize == 1 else \
            torch.zeros(shape, dtype=cdt, device=device)
        b = a.view(torch.uint8).clone().view(cdt) if cdt.itemsize == 1 else a.clone()
        store_kv(a, kk, vv, slots, 0.3, 1.7)
        ref.write_kv(b, kk, vv, slots, 0.3, 1.7)
        if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            return "store_kv differs from reference.write_kv"
    except Exception as e:  # noqa: BLE001 - a compiler or launch error: serve with the unfused ops
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return None
