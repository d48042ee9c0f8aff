"""The fused decoder-layer kernels (fused_ops.py) against the torch ops they replace (reference.py): under
TRITON_INTERPRET=1 in fp32 on the CPU, natively in bf16 on a GPU; and a model serving with them gives the
unfused model's logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpulab.vajra import fused_ops as FO
from gpulab.vajra import reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEV == "cuda" else [])


def close(got, want, dt):
    tol = 1e-5 if dt == torch.float32 else 1e-2
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def rnd(g, *shape, dt=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("t,n", [(1, 64), (5, 96), (3, 4096), (0, 64)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(dt, t, n, with_delta):
    g = torch.Generator().manual_seed(t * 7 + n)
    x, d, w = rnd(g, t, n, dt=dt, scale=3.0), rnd(g, t, n, dt=dt), rnd(g, n, dt=dt)
    got = FO.add_rms_norm(x, d if with_delta else None, w, 1e-6)
    want = R.add_rms_norm(x, d if with_delta else None, w, 1e-6)
    for a, b in zip(got, want):
        close(a, b, dt)
    if not with_delta:
        assert got[0] is x  # the residual stream is passed through, not copied


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("t,heads,kv_heads,d", [(1, 4, 2, 16), (6, 8, 2, 32), (3, 32, 8, 128), (2, 3, 3, 8),
                                                (0, 4, 2, 16)])
def test_rope_split(dt, t, heads, kv_heads, d):
    g = torch.Generator().manual_seed(t + heads + d)
    qkv = rnd(g, t, (heads + 2 * kv_heads) * d, dt=dt)
    pos = torch.randint(0, 5000, (t,), generator=g).float()
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(DEV, dt)[:, None, :], emb.sin().to(DEV, dt)[:, None, :]
    got = FO.rope_split(qkv, cos, sin, heads, kv_heads, d)
    want = R.rope_split(qkv, cos, sin, heads, kv_heads, d)
    for a, b in zip(got, want):
        assert a.is_contiguous()
        close(a, b, dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 80), (4, 1500), (2, 14336), (0, 8)])
def test_silu_mul(dt, t, inter):
    g = torch.Generator().manual_seed(t + inter)
    gu = rnd(g, t, 2 * inter, dt=dt, scale=4.0)
    close(FO.silu_mul(gu), R.silu_mul(gu), dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_consumers_sum_split_k_partials(dt):
    """add_rms_norm and rope_split take W8A16's fp32 split-K partials [SPLIT, T, N] in place of the reduced output:
    the same result as reducing (sum, round to the activation dtype) first."""
    g = torch.Generator().manual_seed(5)
    t, n = 3, 96
    x, w = rnd(g, t, n, dt=dt), rnd(g, n, dt=dt)
    parts = rnd(g, 3, t, n)
    for a, b in zip(FO.add_rms_norm(x, parts, w, 1e-6), R.add_rms_norm(x, parts.sum(0).to(dt), w, 1e-6)):
        close(a, b, dt)
    heads, kvh, d = 4, 2, 16
    qparts = rnd(g, 4, t, (heads + 2 * kvh) * d)
    ang = torch.rand(t, 1, d // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(DEV, dt), torch.cat([ang.sin()] * 2, -1).to(DEV, dt)
    got = FO.rope_split(qparts, cos, sin, heads, kvh, d)
    for a, b in zip(got, R.rope_split(qparts.sum(0).to(dt), cos, sin, heads, kvh, d)):
        close(a, b, dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("t,n,split", [(1, 128, 8), (2, 128, 5), (3, 96, 1), (1, 4096, 8), (2, 100, 2)])
def test_add_rms_norm_sums_partials_of_any_split(dt, t, n, split):
    """The norm's one-load sum over the partials (unmasked where the row is a power of two wide and the split a power
    of two; masked otherwise): the residual x + sum(partials) and its norm, as reducing first."""
    g = torch.Generator().manual_seed(t * 1000 + n + split)
    x, w = rnd(g, t, n, dt=dt), rnd(g, n, dt=dt)
    parts = rnd(g, split, t, n)
    xo, h = FO.add_rms_norm(x, parts, w, 1e-6)
    want_xo, want_h = R.add_rms_norm(x, parts.sum(0).to(dt), w, 1e-6)
    close(xo, want_xo, dt)
    close(h, want_h, dt)
    assert not torch.equal(xo, x)  # the partials were added


def test_w8a16_partials_feed_the_fused_norm():
    """The W8A16 kernel with reduce=False hands its split-K partials over; summed by add_rms_norm they give what
    the reduced GEMM output gives."""
    from gpulab.vajra import fp8_kernels as K
    from gpulab.vajra.w8a16 import w8a16_matmul

    g = torch.Generator().manual_seed(6)
    xin, wq = rnd(g, 2, 256), rnd(g, 64, 256, scale=0.05)
    q, s = K.quantize(wq, "channel")
    cfg = {"SPLIT_K": 4, "BK": 32, "BN": 32}
    parts = w8a16_matmul(xin, q, s, "channel", config=cfg, native=False, reduce=False)
    full = w8a16_matmul(xin, q, s, "channel", config=cfg, native=False)
    assert parts.shape == (4, 2, 64) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.sum(0), full)
    x, w = rnd(g, 2, 64), rnd(g, 64)
    for a, b in zip(FO.add_rms_norm(x, parts, w, 1e-6), FO.add_rms_norm(x, full, w, 1e-6)):
        close(a, b, torch.float32)


@pytest.mark.parametrize("cache", ["act", torch.float8_e4m3fn, torch.float8_e5m2])
def test_store_kv_bitwise_equals_write_kv(cache):
    """The one-kernel K/V store writes exactly the bytes reference.write_kv writes (FP8: scaled, clamped, rounded to
    nearest even), at slots across blocks, and nothing else."""
    g = torch.Generator().manual_seed(9)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    t, hkv, d, bs, blocks = 7, 2, 16, 4, 6
    k, v = rnd(g, t, hkv, d, dt=dt, scale=300.0), rnd(g, t, hkv, d, dt=dt, scale=0.01)
    k[0, 0, :3] = torch.tensor([float("nan"), -float("nan"), float("inf")], dtype=dt)  # NaN kept, inf clamped
    slots = torch.randperm(blocks * bs, generator=g)[:t].to(DEV)
    cdt = dt if cache == "act" else cache
    a = torch.full((blocks, 2, bs, hkv, d), 7, dtype=torch.uint8, device=DEV)
    a = a.view(cdt) if cache != "act" else rnd(g, blocks, 2, bs, hkv, d, dt=dt)
    b = a.view(torch.uint8).clone().view(cdt) if cache != "act" else a.clone()
    for ks, vs in ((0.75, 0.001), (0.3, 1.7)):  # 0.3: x / s and x * (1 / s) round differently
        FO.store_kv(a, k, v, slots, ks, vs)
        R.write_kv(b, k, v, slots, ks, vs)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (ks, vs)


def test_store_kv_divides_truly_on_every_device():
    """store_kv and reference.write_kv divide by the scale (correctly rounded, as vLLM's cache write), not multiply
    by its fp32 reciprocal, which torch does on a GPU for a Python-scalar divisor and which rounds some values to
    other FP8 bytes. On an H200 (2026-11-27) the reciprocal form made the model's probe find store_kv != write_kv
    and serve the unfused ops."""
    g = torch.Generator().manual_seed(3)
    inv = float(np.float32(1) / np.float32(0.3))
    # values a few fp32 ulps around 0.3 x (the midpoints between e4m3 neighbours): where x / s lands on the tie and
    # x * (1 / s) an ulp beside it, the two forms round to different bytes
    codes = torch.arange(8, 120, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    ties = ((codes[:-1] + codes[1:]) / 2 * 0.3).numpy().astype(np.float32)
    near = np.concatenate([ties + np.float32(d) * np.spacing(ties) for d in range(-2, 3)])
    true_q = torch.from_numpy(near / np.float32(0.3)).to(torch.float8_e4m3fn).view(torch.uint8)
    recip_q = torch.from_numpy(near * np.float32(inv)).to(torch.float8_e4m3fn).view(torch.uint8)
    split = true_q != recip_q
    assert int(split.sum()) >= 8
    vals = torch.from_numpy(np.concatenate([near[split.numpy()], near[~split.numpy()]])[:160])
    want = torch.cat([true_q[split], true_q[~split]])[:160].reshape(5, 2, 16)
    k, v = vals.reshape(5, 2, 16).to(DEV), rnd(g, 5, 2, 16, scale=100.0)
    slots = torch.arange(5, device=DEV) * 3
    for write in (FO.store_kv, R.write_kv):
        layer = torch.zeros(2, 2, 8, 2, 16, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
        write(layer, k, v, slots, 0.3, 0.3)
        got = layer.view(torch.uint8)[slots // 8, 0, slots % 8]
        assert torch.equal(got.cpu(), want), write.__name__
    assert not torch.equal(want, torch.cat([recip_q[split], recip_q[~split]])[:160].reshape(5, 2, 16))


def test_bad_shapes_are_value_errors():
    x = torch.zeros(2, 8, device=DEV)
    with pytest.raises(ValueError, match="differ"):
        FO.add_rms_norm(x, torch.zeros(2, 4, device=DEV), torch.ones(8, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="not \\(2 \\+ 2 x 1\\) x 4"):
        FO.rope_split(torch.zeros(2, 12, device=DEV), torch.zeros(2, 1, 4, device=DEV), torch.zeros(2, 1, 4, device=DEV),
                      2, 1, 4)
    with pytest.raises(ValueError, match="odd width"):
        FO.silu_mul(torch.zeros(2, 7, device=DEV))
    with pytest.raises(ValueError, match="contiguous rows"):
        FO.silu_mul(torch.zeros(8, 2, device=DEV).t())
    with pytest.raises(ValueError, match="do not fit the cache layer"):
        FO.store_kv(torch.zeros(2, 2, 4, 3, 8, device=DEV), torch.zeros(1, 3, 4, device=DEV),
                    torch.zeros(1, 3, 4, device=DEV), torch.zeros(1, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="split-K partials must be contiguous fp32"):
        FO.add_rms_norm(x, torch.zeros(2, 2, 8, device=DEV, dtype=torch.float64), torch.ones(8, device=DEV), 1e-6)


def test_probe_passes_here():
    assert FO.fused_ops_problem(DEV, torch.float32) is None


@pytest.mark.gpu
def test_fused_ops_on_gpu_at_llama8b_shapes():
    """The GPU's activation dtype (bf16 from sm_80 on, else fp16; the other one's builds are left to the CPU-run
    tests above when run on a GPU), 8B shapes (hidden 4096, 32/8 heads of 128, intermediate 14336), batch 1 and 64:
    each kernel rounds where the torch ops round, so every output is within bf16 rounding of them and the norm's
    nearly always bit-identical; the K/V store is exact. RoPE's q/k were bit-identical in only 77% of elements on
    an H200 in bf16 (2026-11-27; 100% under the CPU interpreter in fp16); the likely cause, seen in its sm_90 PTX:
    Triton contracted its products and adds into FMAs. Launched without FP fusion now (fused_ops.ROUND_AS_TORCH),
    RoPE must match to the bit; so must SiLU, which now runs the instructions of torch's expf and IEEE division
    (fused_ops.SILU_AS_TORCH; it ran Triton's approximate exp and division before). Neither yet run on a GPU."""
    from gpulab.core.device import bf16_native

    dt = torch.bfloat16 if bf16_native(torch.device("cuda")) else torch.float16
    g = torch.Generator().manual_seed(0)
    assert FO.fused_ops_problem("cuda", dt) is None
    for t in (1, 64):
        x, d, w = (torch.randn(t, 4096, generator=g) * 3).cuda().to(dt), torch.randn(t, 4096, generator=g).cuda().to(dt), \
            torch.randn(4096, generator=g).cuda().to(dt)
        pairs = list(zip(FO.add_rms_norm(x, d, w, 1e-5), R.add_rms_norm(x, d, w, 1e-5)))
        n_norm = len(pairs)  # pairs[n_norm:n_norm + 3]: RoPE's q, k, v; the last: SiLU
        qkv = torch.randn(t, 48 * 128, generator=g).cuda().to(dt)
        ang = torch.rand(t, 1, 64, generator=g) * 100
        cos, sin = torch.cat([ang.cos()] * 2, -1).cuda().to(dt), torch.cat([ang.sin()] * 2, -1).cuda().to(dt)
        pairs += zip(FO.rope_split(qkv, cos, sin, 32, 8, 128), R.rope_split(qkv, cos, sin, 32, 8, 128))
        gu = (torch.randn(t, 2 * 14336, generator=g) * 4).cuda().to(dt)
        pairs.append((FO.silu_mul(gu), R.silu_mul(gu)))
        for i, (got, want) in enumerate(pairs):
            close(got, want, dt)
            same = float((got == want).float().mean())
            assert same > 0.99 and (same == 1.0 or i < n_norm), (i, t, dt, same)  # RoPE's q/k/v and SiLU: all
        k, v = FO.rope_split(qkv, cos, sin, 32, 8, 128)[1:]
        slots = torch.randperm(64 * 16, generator=g)[:t].cuda()
        for cdt in (dt, torch.float8_e4m3fn):
            a = torch.zeros(64, 2, 16, 8, 128, dtype=torch.uint8, device="cuda").view(cdt) if cdt != dt else \
                torch.zeros(64, 2, 16, 8, 128, dtype=dt, device="cuda")
            b = a.clone() if cdt == dt else a.view(torch.uint8).clone().view(cdt)
            FO.store_kv(a, k, v, slots, 0.3, 1.7)  # torch on a GPU multiplies by the reciprocal: so must the kernel
            R.write_kv(b, k, v, slots, 0.3, 1.7)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (t, dt, cdt)


def test_probe_at_model_sizes():
    """The probe at a model's own sizes (Llama-3.2-1B-like heads) and KV dtype: the kernels the model will run."""
    FO.fused_ops_problem.cache_clear()
    assert FO.fused_ops_problem(DEV, torch.float32, 256, 8, 2, 64, torch.float8_e5m2) is None


def test_probe_reports_a_wrong_or_failing_kernel(monkeypatch):
    FO.fused_ops_problem.cache_clear()
    monkeypatch.setattr(FO, "silu_mul", lambda gu: R.silu_mul(gu) * 1.01)
    assert FO.fused_ops_problem(DEV, torch.float32) == "silu_mul differs from the torch ops"
    FO.fused_ops_problem.cache_clear()

    def broken(*a, **kw):
        raise RuntimeError("PassManager::run failed\nmore")

    monkeypatch.setattr(FO, "store_kv", broken)
    monkeypatch.setattr(FO, "silu_mul", R.silu_mul)
    assert FO.fused_ops_problem(DEV, torch.float32) == "RuntimeError: PassManager::run failed"
    FO.fused_ops_problem.cache_clear()


@pytest.mark.parametrize("cache", ["act", torch.float8_e4m3fn])
def test_store_kv_with_a_non_power_of_two_row_touches_only_its_slots(cache):
    g = torch.Generator().manual_seed(5)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    t, hkv, d, bs, blocks = 5, 3, 16, 4, 4
    k = (torch.randn(t, hkv, d, generator=g) * 3).to(dt).to(DEV)
    v = (torch.randn(t, hkv, d, generator=g) * 3).to(dt).to(DEV)
    slots = torch.tensor([0, 5, 3, 10, 14], device=DEV)  # within blocks and at a block's last slot
    cdt = dt if cache == "act" else cache
    a = torch.full((blocks, 2, bs, hkv, d), 7, dtype=torch.uint8, device=DEV).view(cdt) if cache != "act" \
        else torch.full((blocks, 2, bs, hkv, d), 7.0, dtype=dt, device=DEV)
    b = a.view(torch.uint8).clone().view(cdt) if cache != "act" else a.clone()
    FO.store_kv(a, k, v, slots, 0.5, 0.25)
    R.write_kv(b, k, v, slots, 0.5, 0.25)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("n,k", [(64, 256), (96, 1024), (32, 4096)])
def test_partial_splits_is_what_w8a16_hands_over(n, k):
    """w8a16.partial_splits (what the fused-ops probe builds norm variants for) is the number of partials
    w8a16_matmul(reduce=False) returns at W8A16's batch sizes."""
    from gpulab.vajra import fp8_kernels as K
    from gpulab.vajra.w8a16 import partial_splits, w8a16_matmul

    g = torch.Generator().manual_seed(n + k)
    q, s = K.quantize(rnd(g, n, k, scale=0.05), "channel")
    for m in (1, 64):
        parts = w8a16_matmul(rnd(g, m, k), q, s, "channel", native=False, reduce=False)
        got = parts.shape[0] if parts.dim() == 3 else 1
        assert got == partial_splits(n, k, q.device)


def test_fused_ops_probe_runs_every_split_it_is_given(monkeypatch):
    """The probe sums partials at each split the model may hand the norm (each a kernel variant), and the model asks
    for its o/down projections' split and the powers of two below it."""
    from types import SimpleNamespace

    from gpulab.vajra import model as M
    from gpulab.vajra import w8a16 as W

    seen = []
    real = FO.add_rms_norm
    monkeypatch.setattr(FO, "add_rms_norm", lambda x, d, w, eps: seen.append(None if d is None else tuple(d.shape))
                        or real(x, d, w, eps))
    assert FO.fused_ops_problem(DEV, torch.float32, hidden=128, splits=(2, 3, 8)) is None
    assert [s for s in seen if s and len(s) == 3] == [(2, 3, 128), (3, 3, 128), (8, 3, 128)]

    class Lin:
        def __init__(self, n, k, backend="auto"):
            self.out_features, self.in_features, self.backend = n, k, backend
            self.qw = SimpleNamespace(strategy="channel", block=None)

    monkeypatch.setattr(W, "partial_splits", lambda n, k, device, block=None: {(64, 64): 4, (64, 256): 8}[(n, k)])
    fake = SimpleNamespace(layers=[SimpleNamespace(o=Lin(64, 64), down=Lin(64, 256))])
    assert M.LlamaModel._norm_partial_splits(fake, torch.device("cpu")) == (2, 4, 8)
    fake.layers[0].down.backend = "w8a8"  # never split by W8A16
    assert M.LlamaModel._norm_partial_splits(fake, torch.device("cpu")) == (2, 4)
    fake.layers = []
    assert M.LlamaModel._norm_partial_splits(fake, torch.device("cpu")) == (2,)
