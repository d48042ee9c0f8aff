"""Tests that close gaps found by manual mutation testing of the FP8 / attention kernels and their loaders.

Each test names the kind of bug it catches. All run under TRITON_INTERPRET=1 in fp32 on the CPU (natively on a
GPU) against the torch references in :mod:`gpulab.vajra.reference`, over small shapes with non-power-of-two sizes
and tails.
"""
from __future__ import annotations

import pytest
import torch

from gpulab.vajra import reference as R

from .helpers import paged_cache

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _bytes(t):
    return t.view(torch.uint8)


def _rounding_boundaries(dt) -> torch.Tensor:
    """Every midpoint between two neighbouring finite fp8 values (subnormal and normal ties included), one fp32
    ulp either side of it, the largest finite value's neighbourhood beyond it, both signs."""
    codes = torch.arange(256, dtype=torch.uint8).view(dt).float()
    pos = torch.unique(codes[torch.isfinite(codes) & (codes >= 0)])  # sorted, 0 first
    mids = (pos[:-1] + pos[1:]) / 2  # exact in fp32
    top = pos[-1]
    over = torch.tensor([float(top) * 1.03, float(top) * 1.0625, float(top) * 2, 1e30])
    vals = torch.cat([mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9)),
                      pos, over])
    return torch.cat([vals, -vals])


# ---------------------------------------------------------------------------------------- fp8_kernels.py


@pytest.mark.parametrize("dt", [E4, E5])
def test_cast_rounds_every_tie_to_nearest_even(dt):
    """Rounding of every tie (subnormal ones too: half up instead of half to even there went unnoticed) and
    saturation beyond the largest finite value: bit for bit torch's .to(fp8) after the clamp."""
    from gpulab.vajra import fp8_kernels as K

    v = _rounding_boundaries(dt)
    k = 37  # rows of a non-power-of-two width: tails in both grid dimensions
    n = -(-v.numel() // k)
    x = torch.cat([v, torch.zeros(n * k - v.numel())]).reshape(n, k).to(DEV)
    one = torch.tensor(1.0, device=DEV)
    assert torch.equal(_bytes(K.cast(x, one, dtype=dt)), _bytes(R.cast_fp8(x, one, dt)))
    # the same bytes through a per-row scale of 2 on values doubled (the division is exact)
    s2 = torch.full((n,), 2.0, device=DEV)
    assert torch.equal(_bytes(K.cast(x * 2, s2, dtype=dt)), _bytes(R.cast_fp8(x * 2, s2[:, None], dt)))


@pytest.mark.parametrize("dt", [E4, E5])
def test_store_kv_rounds_every_tie_like_write_kv(dt):
    """The fused K/V store's encoder (shared with the cast kernels) on the same ties: bytes of write_kv."""
    from gpulab.vajra import fused_ops as FO

    v = _rounding_boundaries(dt)
    hkv, d, bs = 2, 16, 8
    t = -(-v.numel() // (hkv * d))
    k = torch.cat([v, torch.zeros(t * hkv * d - v.numel())]).reshape(t, hkv, d).to(DEV)
    blocks = -(-t // bs)
    slots = torch.randperm(blocks * bs, generator=torch.Generator().manual_seed(0))[:t].to(DEV)
    a = torch.zeros(blocks, 2, bs, hkv, d, dtype=torch.uint8, device=DEV).view(dt)
    b = a.view(torch.uint8).clone().view(dt)
    FO.store_kv(a, k, -k, slots, 1.0, 1.0)
    R.write_kv(b, k, -k, slots, 1.0, 1.0)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dt", [E4, E5])
def test_quantize_rows_amax_spans_every_column_chunk(dt):
    """Rows wider than one 1024-column chunk (every real hidden size): the kernel loops over chunks and a row's
    scale comes from its amax over all of them (a kernel that keeps only the last chunk's amax saturates the row)."""
    from gpulab.vajra import fp8_kernels as K

    x = torch.randn(3, 2500, generator=torch.Generator().manual_seed(0))
    x[0, 5], x[1, 1500], x[2, 2400] = 300.0, -80.0, 50.0  # each row's amax in the first, a middle, the last chunk
    q, s = K.quantize_rows(x.to(DEV), dt)
    qr, sr = R.quantize_rows(x, dt)
    assert torch.equal(s.cpu(), sr) and torch.equal(_bytes(q).cpu(), _bytes(qr))


@pytest.mark.parametrize("rows", [1, 7, 33])
def test_requantize_onto_a_smaller_scale_saturates(rows):
    """requantize_rows onto a scale below some rows' own: those rows saturate at +-448 exactly as the reference
    clamps (the kernel without the clamp passes whenever the new scale is the largest, as linear.fuse picks)."""
    from gpulab.vajra import fp8_kernels as K

    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, 45, generator=g) * torch.logspace(-1, 1, rows)[:, None]
    q, s = R.quantize_rows(w)
    new = s.median() * 0.5
    out = K.requantize_rows(q.to(DEV), s.to(DEV), new.to(DEV), native=False)
    want = R.requantize_rows(q, s, new)
    assert torch.equal(_bytes(out).cpu(), _bytes(want))
    assert float(out.float().abs().max()) == 448.0


# ------------------------------------------------------------------------------------------- fused_ops.py

CANARY = -1234.5


def _with_canaries(monkeypatch, fn):
    """Run fn with every torch.empty output allocated inside a larger buffer whose tail holds a canary value.
    A kernel's stray write past its output (a tail mask off by one) is overwritten by the next program under the
    interpreter (programs run in order) except past the last row: the canary catches that one.
    -> (fn's result, the canaries)."""
    real_empty = torch.empty
    canaries = []

    def empty_with_canary(*shape, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        n = 1
        for v in shape:
            n *= int(v)
        buf = real_empty(n + 64, **kw).fill_(CANARY)
        canaries.append(buf[n:])
        return buf[:n].view(*shape)

    monkeypatch.setattr(torch, "empty", empty_with_canary)
    try:
        return fn(), canaries
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("t,inter", [(1, 80), (3, 1500), (2, 1023)])
def test_silu_mul_writes_nothing_past_its_output(t, inter, monkeypatch):
    from gpulab.vajra import fused_ops as FO

    g = torch.Generator().manual_seed(inter)
    gu = (torch.randn(t, 2 * inter, generator=g) * 4).to(DEV)
    got, canaries = _with_canaries(monkeypatch, lambda: FO.silu_mul(gu))
    torch.testing.assert_close(got, R.silu_mul(gu), atol=1e-5, rtol=1e-5)
    assert canaries and all(bool((c == CANARY).all()) for c in canaries)


@pytest.mark.parametrize("t,heads,kv_heads", [(1, 3, 1), (2, 5, 1), (3, 6, 3)])  # head counts not multiples of 4
def test_rope_split_writes_nothing_past_its_outputs(t, heads, kv_heads, monkeypatch):
    """The padded head tile (BH = 4) must store nothing for heads past q + k + v."""
    from gpulab.vajra import fused_ops as FO

    d = 16
    g = torch.Generator().manual_seed(heads)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(DEV)
    ang = torch.rand(t, 1, d // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(DEV), torch.cat([ang.sin()] * 2, -1).to(DEV)
    got, canaries = _with_canaries(monkeypatch, lambda: FO.rope_split(qkv, cos, sin, heads, kv_heads, d))
    for a, b in zip(got, R.rope_split(qkv, cos, sin, heads, kv_heads, d)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(canaries) == 3 and all(bool((c == CANARY).all()) for c in canaries)


# ------------------------------------------------------------------------------------- paged_attention.py


def _paged_case(ql, cl, page, hkv, group, d, dt=torch.float32, seed=0):
    """A scattered paged cache holding cl[i] tokens of sequence i, and q for its last ql[i] tokens."""
    cache, clt, bt, ks, vs, g = paged_cache(cl, page, hkv, d, dt, extra_cols=1, seed=seed)
    q = torch.randn(sum(ql), hkv * group, d, generator=g)
    return q, cache, torch.tensor(ql, dtype=torch.int32), clt, bt, ks, vs


# (query lens, context lens, page, group, head_dim, BM): chunked prefill after long cached contexts, several query
# tiles per sequence (mb > 0), pages that are not powers of two, a last page holding a single token
PREFILL = [
    ([3, 16, 1, 7], [40, 16, 70, 23], 5, 4, 16, 16),
    ([40, 2, 17], [101, 2, 50], 6, 2, 32, 16),
    ([20, 5, 1], [150, 90, 33], 16, 1, 16, None),
    ([33, 1], [97, 65], 8, 4, 16, 64),
]


@pytest.mark.parametrize("ql,cl,page,group,d,bm", PREFILL, ids=[f"case{i}" for i in range(len(PREFILL))])
def test_paged_prefill_chunks_after_long_contexts(ql, cl, page, group, d, bm):
    from gpulab.vajra.paged_attention import make_metadata, paged_attention

    q, cache, qlt, clt, bt, ks, vs = _paged_case(ql, cl, page, 2, group, d)
    want = R.paged_attention(q, cache, qlt, clt, bt, d ** -0.5, ks, vs)
    got = paged_attention(q.to(DEV), cache.to(DEV), bt.to(DEV), make_metadata(qlt.to(DEV), clt.to(DEV)),
                          d ** -0.5, ks, vs, BM=bm, native=False)
    assert float((got.cpu() - want).abs().max()) < 2e-5


# (page, BN): pages that do not divide BN (and one larger than BN): a split's last key tile then runs past the
# split's end into the next split's keys, which it must mask out
DECODE = [(5, 16), (6, 32), (12, 16), (48, 32)]


@pytest.mark.parametrize("page,bn", DECODE, ids=[f"p{p}-bn{b}" for p, b in DECODE])
@pytest.mark.parametrize("splits", [2, 3])
def test_decode_pages_that_do_not_divide_the_key_tile(page, bn, splits):
    from gpulab.vajra.paged_attention import paged_decode_attention

    lens = [1, page, 2 * page + 1, 61, 130]
    q, cache, _, cl, bt, ks, vs = _paged_case([1] * len(lens), lens, page, 2, 2, 16)
    want = R.paged_attention(q, cache, torch.ones_like(cl), cl, bt, 16 ** -0.5, ks, vs)
    got = paged_decode_attention(q.to(DEV), cache.to(DEV), bt.to(DEV), cl.to(DEV), 16 ** -0.5, ks, vs,
                                 num_splits=splits, BN=bn, native=False)
    assert float((got.cpu() - want).abs().max()) < 2e-5


def test_decode_fp8_cache_pages_that_do_not_divide_the_key_tile():
    from gpulab.vajra.paged_attention import paged_decode_attention

    lens = [7, 44, 81]
    q, cache, _, cl, bt, ks, vs = _paged_case([1] * len(lens), lens, 6, 2, 4, 16, dt=E4)
    want = R.paged_attention(q, cache, torch.ones_like(cl), cl, bt, 16 ** -0.5, ks, vs)
    got = paged_decode_attention(q.to(DEV), cache.to(DEV), bt.to(DEV), cl.to(DEV), 16 ** -0.5, ks, vs,
                                 num_splits=3, BN=16, native=False)
    assert float((got.cpu() - want).abs().max()) < 2e-5


def test_paged_prefill_takes_a_query_with_strided_head_dim():
    """The kernel steps over D with stride 1; a query whose head dimension is strided is made contiguous first
    (it gave wrong numbers, no error)."""
    from gpulab.vajra.paged_attention import make_metadata, paged_attention

    q, cache, ql, cl, bt, ks, vs = _paged_case([3, 2], [9, 5], 4, 2, 2, 16)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # the same values with strides (64, 1, 4)
    want = R.paged_attention(q, cache, ql, cl, bt, 0.25, ks, vs)
    got = paged_attention(qt.to(DEV), cache.to(DEV), bt.to(DEV), make_metadata(ql.to(DEV), cl.to(DEV)), 0.25, ks, vs,
                          native=False)
    assert float((got.cpu() - want).abs().max()) < 2e-5


# ---------------------------------------------------------------------------------------------- w8a16.py


# (N, K, strategy, block): K not a multiple of the K tile (a tail read past the row), split sizes K / SPLIT that are
# not multiples of the tile (must be rounded up to it, or a tile straddles two scale blocks), N not a multiple of BN
W8A16 = [(90, 150, "tensor", None), (90, 150, "channel", None), (40, 160, "block", (16, 64)),
         (37, 200, "block", (24, 32)), (33, 100, "channel", None)]


@pytest.mark.parametrize("n,k,strategy,block", W8A16, ids=[f"{n}x{k}-{s}" for n, k, s, _ in W8A16])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m", [1, 5])
def test_w8a16_k_and_n_tails(n, k, strategy, block, split, m):
    from gpulab.vajra.w8a16 import w8a16_matmul

    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g) * torch.logspace(-1, 1, k)  # column blocks with very different scales
    q, s = R.quantize(w, strategy, block)
    x = torch.randn(m, k, generator=g)
    want = R.linear_w8a16(x, q, s, block)
    got = w8a16_matmul(x.to(DEV), q.to(DEV), s.to(DEV), strategy, block,
                       config={"SPLIT_K": split, "BK": 32, "BN": 32}, native=False)
    assert got.shape == (m, n)
    assert float((got.cpu() - want).abs().max()) <= 1e-4 * float(want.abs().max())


# --------------------------------------------------------------------------------------------- linear.py


def test_linear_with_bias_never_hands_back_split_k_partials():
    """partials=True may return W8A16's unreduced [SPLIT, M, N] only without a bias (a consumer summing them
    would drop it): a layer with a bias returns y + b."""
    from gpulab.vajra.checkpoint import QuantWeight
    from gpulab.vajra.linear import Linear

    g = torch.Generator().manual_seed(0)
    n, k = 32, 2048  # K long enough that the CPU heuristic splits it (2 splits)
    q, s = R.quantize(torch.randn(n, k, generator=g) * 0.05, "channel")
    b = torch.randn(n, generator=g)
    lin = Linear(QuantWeight(q.to(DEV), s.to(DEV), "channel", None, "dynamic"), b.to(DEV), torch.float32, "w8a16")
    x = torch.randn(1, k, generator=g)
    got = lin(x.to(DEV), partials=True)
    want = R.linear_w8a16(x, q, s) + b
    assert got.shape == (1, n)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- load.py


class _FakeReader:
    def __init__(self, tensors):
        self.t = tensors

    def has(self, name):
        return name in self.t

    def get(self, name, device="cpu"):
        return self.t[name]


def test_per_head_kv_cache_scales_become_their_maximum():
    """Per-head K/V scales [num_kv_heads] -> one per layer: the largest (a coarser step), never a smaller one
    that would clip the heads calibrated larger; k and v kept apart."""
    from gpulab.vajra.load import read_kv_scales

    p = "model.layers.{}.self_attn."
    t = {}
    for i in range(2):
        t[p.format(i) + "k_scale"] = torch.tensor([0.1, 0.4 + i, 0.2])
        t[p.format(i) + "v_scale"] = torch.tensor([[0.03], [0.01]]) * (i + 1)
    got = read_kv_scales(_FakeReader(t), 2)
    assert got == [(pytest.approx(0.4), pytest.approx(0.03)), (pytest.approx(1.4), pytest.approx(0.06))]
    one = {p.format(i) + "kv_scale": torch.tensor([0.5, 0.7]) for i in range(2)}
    assert read_kv_scales(_FakeReader(one), 2) == [(pytest.approx(0.7), pytest.approx(0.7))] * 2


def test_fused_static_input_scale_is_the_largest_shards():
    """q/k/v (gate/up) shards calibrated to different static input scales share one after fusion: the largest,
    so that no shard's activations clip (the smallest would saturate the others' largest activations)."""
    from gpulab.vajra.checkpoint import QuantWeight
    from gpulab.vajra.linear import fuse

    g = torch.Generator().manual_seed(0)
    parts = []
    for i, a in enumerate((0.02, 0.07, 0.03)):
        q, s = R.quantize(torch.randn(16, 32, generator=g), "channel")
        parts.append(QuantWeight(q, s, "channel", None, "static", torch.tensor(a)))
    fused = fuse(parts, ["q.weight", "k.weight", "v.weight"])
    assert fused.act == "static" and float(fused.input_scale) == pytest.approx(0.07)


@pytest.mark.parametrize("rows", [(20, 24, 24), (24, 20, 24), (24, 24, 20), (48, 16, 16)])
def test_fuse_block_shards_with_ragged_rows(rows):
    """Block-scaled shards fuse by concatenating their scales only when every shard but the last fills its last row
    block; otherwise they are re-blocked. Either way the fused weight dequantizes to the shards' weights (exactly
    when concatenated, within half an FP8 step at the new block scale when re-blocked)."""
    from gpulab.vajra.checkpoint import QuantWeight
    from gpulab.vajra.linear import fuse

    block = (8, 16)
    g = torch.Generator().manual_seed(sum(rows))
    parts = [QuantWeight(*R.quantize(torch.randn(n, 40, generator=g) * (i + 1), "block", block), "block", block,
                         "dynamic") for i, n in enumerate(rows)]
    fused = fuse(parts, ["q.weight", "k.weight", "v.weight"])
    assert fused.q.shape == (sum(rows), 40) and fused.scale.shape == (-(-sum(rows) // 8), 3)
    want = torch.cat([R.dequantize(p.q, p.scale, block) for p in parts])
    got = R.dequantize(fused.q, fused.scale, block)
    if all(n % 8 == 0 for n in rows[:-1]):
        assert torch.equal(got, want)
    else:
        # half an e4m3 step at the top of the range (448 - 416 = 32) of each element's new block scale
        half_step = R.expand_block_scale(fused.scale, tuple(want.shape), block) * 16
        assert bool(((got - want).abs() <= half_step * (1 + 1e-6)).all())


@pytest.mark.parametrize("strategy,act", [("tensor", "static"), ("channel", "static"), ("channel", "dynamic")])
def test_w8a8_static_activations_use_the_input_scale(strategy, act):
    """Static per-tensor activation scales: x / input_scale is what gets cast to FP8 (ignoring the scale clips large
    activations at 448 and flushes small ones); dynamic ones: per token (serve-bench's FP8 path above 64 tokens).
    Against the fake-quant reference, tightly. Runs where _scaled_mm does (a GPU of compute capability >= 8.9)."""
    from gpulab.vajra.checkpoint import QuantWeight
    from gpulab.vajra.linear import Linear, w8a8_unavailable

    why = w8a8_unavailable(torch.device(DEV), rowwise=strategy == "channel")
    if why:
        pytest.skip(why)
    g = torch.Generator().manual_seed(1)
    q, s = R.quantize(torch.randn(48, 64, generator=g) * 0.05, strategy)
    x = torch.randn(5, 64, generator=g) * torch.logspace(-3, 3, 64)  # 1e-3 .. 1e3: both ends matter
    xs = torch.tensor(float(x.abs().max()) / 448) if act == "static" else None
    lin = Linear(QuantWeight(q.to(DEV), s.to(DEV), strategy, None, act, None if xs is None else xs.to(DEV)), None,
                 torch.float32, "w8a8")
    want = R.linear_w8a8(x, q, s, act, xs)
    got = lin(x.to(DEV)).cpu()
    tol = 1e-5 if DEV == "cpu" else 1e-2  # a GPU's _scaled_mm writes bf16 for fp32 activations
    assert float((got.float() - want).norm() / want.norm()) < tol


class _CkptReader:
    """The part of CheckpointReader that read_linear uses, over a dict of tensors."""

    def __init__(self, tensors):
        self.t = tensors

    def has(self, name):
        return name in self.t

    def shape(self, name):
        return tuple(self.t[name].shape)

    def dtype_name(self, name):
        return {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16"}[self.t[name].dtype]

    def get(self, name, device="cpu"):
        return self.t[name]


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_read_linear_refuses_non_positive_or_non_finite_scales(bad, strategy):
    """A zero weight scale would silently zero a channel (a negative one flip it): a one-line InputError naming the
    scale tensor, while the same layer with good scales loads (channel scales as [N, 1] too)."""
    from gpulab.core.errors import InputError
    from gpulab.vajra.checkpoint import QuantScheme, read_linear

    block = (16, 16) if strategy == "block" else None
    q, s = R.quantize(torch.randn(24, 40, generator=torch.Generator().manual_seed(0)), strategy, block)
    if strategy == "channel":
        s = s.reshape(-1, 1)
    scheme = QuantScheme("compressed-tensors", strategy, block, "dynamic")
    good = read_linear(_CkptReader({"m.weight": q, "m.weight_scale": s}), "m", scheme, "cpu", torch.float32)
    assert good.scale.shape == ((24,) if strategy == "channel" else s.shape)
    s_bad = s.clone()
    s_bad.view(-1)[-1] = bad
    with pytest.raises(InputError, match="m.weight_scale.*finite and > 0"):
        read_linear(_CkptReader({"m.weight": q, "m.weight_scale": s_bad}), "m", scheme, "cpu", torch.float32)


@pytest.mark.parametrize("module,ignore,want", [
    ("lm_head", ["lm_head"], True),
    ("model.layers.0.mlp.down_proj", ["down_proj"], True),  # a bare name matches the module's last parts
    ("model.layers.0.mlp.down_proj", ["mlp.down_proj"], True),
    ("model.layers.0.mlp.down_proj", ["model.layers.0.mlp.down_proj"], True),
    ("model.layers.1.mlp.down_proj", ["model.layers.0.mlp.down_proj"], False),
    ("model.layers.0.self_attn.q_proj", ["proj"], False),  # a suffix of the name, not of a part
    ("model.layers.0.self_attn.q_proj", ["re:.*self_attn.*"], True),
    ("model.layers.0.mlp.up_proj", ["re:.*self_attn.*"], False),
])
def test_quant_scheme_ignore_list(module, ignore, want):
    from gpulab.vajra.checkpoint import QuantScheme

    assert QuantScheme("compressed-tensors", "channel", ignore=ignore).is_ignored(module) is want


def test_head_dims_the_triton_kernels_do_not_tile():
    """auto takes the torch reference for head_dim 80/96/100; an explicit triton is a one-line error at load."""
    import torch

    from gpulab.core.errors import InputError
    from gpulab.vajra.attention import TorchAttention, make_backend

    kw = dict(num_heads=4, num_kv_heads=2, scale=0.1, act_dtype=torch.float32)
    for d in (80, 96, 100):
        b = make_backend("auto", device=torch.device("cuda"), head_dim=d, **kw)
        assert type(b) is TorchAttention
        with pytest.raises(InputError, match=f"power of two >= 16, this model's is {d}"):
            make_backend("triton", device=torch.device("cpu"), head_dim=d, **kw)


def test_w8a16_refuses_block_scales_of_the_wrong_shape():
    import torch

    from gpulab.vajra import w8a16

    x = torch.randn(4, 256)
    q = torch.randn(64, 256).to(torch.float8_e4m3fn)
    for shape in ((2, 1), (1, 2)):
        with pytest.raises(ValueError, match="block scales"):
            w8a16.w8a16_matmul(x, q, torch.ones(shape), "block", (32, 128))
