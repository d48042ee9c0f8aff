"""Triton FP8 kernels (quantize, dequantize, requantize), W8A16 GEMM and paged attention against
the torch references: under TRITON_INTERPRET=1 in fp32 on the CPU, natively (bf16, fp8 loads) on a GPU."""
from __future__ import annotations

import pytest
import torch

from gpulab.vajra import reference as R

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _bytes(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("dt", [E4, E5])
def test_decode_every_fp8_byte(dt):
    from gpulab.vajra import fp8_kernels as K

    allb = torch.arange(256, dtype=torch.uint8).view(dt).reshape(2, 128).to(DEV)
    got = K.dequantize(allb, torch.tensor(1.0, device=DEV), native=False)
    want = allb.float()
    # every byte, NaN and infinity codes included (a checkpoint holding them must not load as finite numbers)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(want).any())
    fin = ~torch.isnan(want)
    assert torch.equal(got[fin], want[fin])


@pytest.mark.parametrize("dt", [E4, E5])
def test_cast_keeps_nan_and_saturates_infinities(dt):
    from gpulab.vajra import fp8_kernels as K

    x = torch.tensor([[float("nan"), float("inf"), float("-inf"), 1.0, -float("nan"), 3e38]], device=DEV)
    got = K.cast(x, torch.tensor(1.0, device=DEV), dtype=dt).float()
    fmax = torch.finfo(dt).max
    want = torch.clamp(x, -fmax, fmax).to(dt).float()  # torch.clamp keeps NaN
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and int(torch.isnan(got).sum()) == 2
    assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])


@pytest.mark.parametrize("dt", [E4, E5])
@pytest.mark.parametrize("strategy,block", [("tensor", None), ("channel", None), ("block", (16, 64)), ("block", (5, 7))])
def test_quantize_bitwise_equals_reference(dt, strategy, block):
    from gpulab.vajra import fp8_kernels as K

    g = torch.Generator().manual_seed(0)
    # values over 8 decades: subnormals, ties, saturation-free maxima
    x = (torch.randn(37, 150, generator=g) * torch.logspace(-6, 2, 150)).to(DEV)
    x[3] = 0.0  # an all-zero row gets the minimum scale, not NaN
    q, s = K.quantize(x, strategy, block, dt)
    qr, sr = R.quantize(x, strategy, block, dt)
    assert torch.equal(s.reshape(sr.shape), sr)
    assert torch.equal(_bytes(q), _bytes(qr))
    assert torch.equal(K.dequantize(q, s, block), R.dequantize(qr, sr, block))


def test_cast_with_static_scale_saturates():
    from gpulab.vajra import fp8_kernels as K

    x = torch.tensor([[0.0, 1.0, -1.0, 1e6, -1e6, 3.3e-3, 447.9, 449.0]], device=DEV)
    s = torch.tensor(1.0, device=DEV)
    assert torch.equal(_bytes(K.cast(x, s)), _bytes(R.cast_fp8(x, s)))
    assert float(K.cast(x, s).float().abs().max()) == 448.0


def test_requantize_onto_common_scale_bounded():
    """Shards with different per-tensor scales -> the largest scale: bitwise equal to the reference,
    and within half an FP8 step (at the new scale) of the original values."""
    from gpulab.vajra import fp8_kernels as K

    g = torch.Generator().manual_seed(1)
    shards = [torch.randn(16, 96, generator=g) * a for a in (0.5, 2.0, 0.05)]
    qs = [R.quantize_tensor(w) for w in shards]
    q = torch.cat([a for a, _ in qs]).to(DEV)
    rows = torch.cat([s.expand(16) for _, s in qs]).to(DEV)
    new = rows.max()
    out = K.requantize_rows(q, rows, new, native=False)
    assert torch.equal(_bytes(out), _bytes(R.requantize_rows(q, rows, new)))
    orig = q.float() * rows[:, None]
    err = (out.float() * new - orig).abs()
    bound = orig.abs() * 2.0 ** -4 + new * 2.0 ** -10
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert float(err.max()) > 0  # it did have to round


@pytest.mark.parametrize("strategy,block", [("tensor", None), ("channel", None), ("block", (32, 64))])
@pytest.mark.parametrize("m", [1, 5, 20])
def test_w8a16_matches_reference(strategy, block, m):
    from gpulab.vajra.w8a16 import w8a16_matmul

    g = torch.Generator().manual_seed(m)
    w = torch.randn(96, 192, generator=g)
    q, s = R.quantize(w, strategy, block)
    x = torch.randn(m, 192, generator=g)
    want = R.linear_w8a16(x, q, s, block)
    for split in (1, 3):
        got = w8a16_matmul(x.to(DEV), q.to(DEV), s.to(DEV), strategy, block,
                           config={"SPLIT_K": split, "BK": 32, "BN": 32}, native=False)
        assert float((got.cpu() - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_w8a16_block_scales_of_any_k_size():
    """Block K sizes that are not powers of two: the K tile is their largest power-of-two divisor (48 -> 16),
    not the block (an arange of 48 does not compile); without one >= 16 (K size 40 -> 8) the auto linear
    leaves W8A16 for dequant-jit and an explicit --linear-backend w8a16 is a one-line InputError."""
    from gpulab.core.errors import InputError
    from gpulab.vajra.checkpoint import QuantWeight
    from gpulab.vajra.linear import Linear, w8a16_fits
    from gpulab.vajra.w8a16 import block_k_tile, choose_config, w8a16_matmul

    assert [block_k_tile(b) for b in (None, (1, 128), (1, 256), (1, 48), (1, 40))] == [128, 128, 128, 16, None]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=g)
    q, s = R.quantize(w, "block", (16, 48))
    x = torch.randn(3, 96, generator=g)
    assert choose_config(3, 40, 96, torch.device("cpu"), (16, 48))["BK"] == 16
    got = w8a16_matmul(x.to(DEV), q.to(DEV), s.to(DEV), "block", (16, 48), native=False)
    want = R.linear_w8a16(x, q, s, (16, 48))
    assert float((got.cpu() - want).abs().max()) <= 1e-4 * float(want.abs().max())
    q2, s2 = R.quantize(w, "block", (16, 40))
    qw = QuantWeight(q2.to(DEV), s2.to(DEV), "block", (16, 40), "dynamic")
    assert w8a16_fits(qw) is False and w8a16_fits(QuantWeight(q, s, "block", (16, 48))) is True
    with pytest.raises(ValueError, match="power-of-two divisor"):
        choose_config(1, 40, 96, torch.device("cpu"), (16, 40))
    with pytest.raises(InputError, match="w8a16.*power-of-two divisor"):
        Linear(qw, None, torch.float32, "w8a16")
    lin = Linear(qw, None, torch.float32, "dequant-jit")
    lin.backend = "auto"  # what auto picks on a GPU at decode sizes
    assert lin.choose(1) == "dequant-jit"


def _attention_case(dt, page, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ql = torch.tensor([5, 1, 20, 1], dtype=torch.int32)
    cl = torch.tensor([5, 13, 30, 1], dtype=torch.int32)
    nblocks = 40
    cache = torch.zeros(nblocks, 2, page, hkv, d, dtype=torch.uint8).view(dt) if dt.itemsize == 1 else \
        torch.zeros(nblocks, 2, page, hkv, d, dtype=dt)  # torch 2.4 cannot fill fp8 on the CPU
    perm = torch.randperm(nblocks, generator=g).to(torch.int32)
    need = [(int(c) + page - 1) // page for c in cl]
    bt = torch.zeros(len(cl), max(need) + 1, dtype=torch.int32)
    used = 0
    ks, vs = (0.5, 0.25) if dt in (E4, E5) else (1.0, 1.0)
    for i, n in enumerate(need):
        bt[i, :n] = perm[used:used + n]
        used += n
        L = int(cl[i])
        pos = torch.arange(L)
        slots = bt[i, pos // page].long() * page + pos % page
        R.write_kv(cache, torch.randn(L, hkv, d, generator=g), torch.randn(L, hkv, d, generator=g), slots, ks, vs)
    q = torch.randn(int(ql.sum()), hq, d, generator=g)
    return q, cache, ql, cl, bt, ks, vs


@pytest.mark.parametrize("dt,page", [(torch.float32, 8), (torch.float32, 6), (E4, 16)])
def test_triton_paged_attention_matches_sdpa(dt, page):
    from gpulab.vajra.paged_attention import make_metadata, paged_attention

    q, cache, ql, cl, bt, ks, vs = _attention_case(dt, page)
    want = R.paged_attention(q, cache, ql, cl, bt, 16 ** -0.5, ks, vs)
    got = paged_attention(q.to(DEV), cache.to(DEV), bt.to(DEV), make_metadata(ql.to(DEV), cl.to(DEV)),
                          16 ** -0.5, ks, vs, native=False)
    assert float((got.cpu() - want).abs().max()) < 1e-5


# ---------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("strategy,block", [("tensor", None), ("channel", None), ("block", (128, 128))])
@pytest.mark.parametrize("m", [1, 64])  # BM 16 (with the M == 1 specialization) and BM 64: few Triton builds
def test_gpu_w8a16_native_bf16(strategy, block, m):
    from gpulab.vajra.w8a16 import w8a16_matmul

    w = torch.randn(1024, 2048, device="cuda")
    q, s = R.quantize(w, strategy, block)
    x = torch.randn(m, 2048, device="cuda").to(torch.bfloat16)
    want = R.linear_w8a16(x.float(), q, s, block)
    for native in (True, False):
        got = w8a16_matmul(x, q, s, strategy, block, native=native).float()
        assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
def test_gpu_fp8_kernels_native_paths():
    from gpulab.vajra import fp8_kernels as K

    w = torch.randn(512, 768, device="cuda")
    for strategy, block in [("tensor", None), ("channel", None), ("block", (128, 128))]:
        q, s = K.quantize(w, strategy, block)
        qr, sr = R.quantize(w, strategy, block)
        # correctly rounded divisions on both sides (div.rn; reference.true_div): bitwise on the GPU too. (With
        # torch's reciprocal form of amax / 448.0 the scales were an ulp apart on an H200, 2026-11-27.)
        assert torch.equal(_bytes(q), _bytes(qr)) and torch.equal(s.reshape(sr.shape), sr)
        for native in (True, False):
            assert torch.equal(K.dequantize(q, s, block, native=native), R.dequantize(q, s, block))
            d16 = K.dequantize(q, s, block, out_dtype=torch.bfloat16, native=native)
            assert torch.equal(d16, R.dequantize(q, s, block).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_gpu_triton_attention_bf16(kv):
    from gpulab.vajra.paged_attention import make_metadata, paged_attention

    dt = E4 if kv == "fp8" else torch.bfloat16
    q, cache, ql, cl, bt, ks, vs = _attention_case(dt if dt == E4 else torch.float32, 16, hq=8, hkv=2, d=128)
    cache = cache.to(dt).cuda() if dt != E4 else cache.cuda()
    want = R.paged_attention(q.cuda().float(), cache, ql, cl, bt, 128 ** -0.5, ks, vs)
    got = paged_attention(q.cuda().to(torch.bfloat16), cache, bt.cuda(), make_metadata(ql.cuda(), cl.cuda()),
                          128 ** -0.5, ks, vs).float()
    assert float((got - want).abs().max()) < 3e-2


def _flashinfer_vs_sdpa(kv, decode):
    pytest.importorskip("flashinfer")
    from gpulab.vajra.attention import FlashInferAttention
    from gpulab.vajra.interface import ForwardBatch, KVCache

    dt = E4 if kv == "fp8" else torch.bfloat16
    q, cache, ql, cl, bt, ks, vs = _attention_case(torch.float32, 16, hq=8, hkv=2, d=128)
    if dt == E4:
        ks, vs = 0.5, 0.25  # scales other than 1, so that a dropped or swapped scale shows
    if decode:  # one new token per sequence (the last cached one): the decode wrapper
        ql = torch.ones_like(ql)
        q = torch.randn(len(ql), 8, 128, generator=torch.Generator().manual_seed(1))
    cache = cache.cuda()
    be = FlashInferAttention(8, 2, 128, scale=128 ** -0.5, device=torch.device("cuda"), act_dtype=torch.bfloat16)
    # the kernel call writes this step's K/V: rewrite the last query_len positions with their own values
    pos = [torch.arange(int(c) - int(n), int(c)) for n, c in zip(ql, cl)]
    slots = torch.cat([bt[i, p // 16].long() * 16 + p % 16 for i, p in enumerate(pos)]).cuda()
    blk, off = slots // 16, slots % 16
    k_step, v_step = cache[blk, 0, off].clone(), cache[blk, 1, off].clone()
    layer = cache.to(dt) if dt != E4 else (cache / torch.tensor([ks, vs], device="cuda").view(1, 2, 1, 1, 1)).to(E4)
    kvc = KVCache([layer], 16, layer.shape[0], layer.dtype, k_scale=ks if dt == E4 else 1.0, v_scale=vs if dt == E4 else 1.0)
    batch = ForwardBatch(torch.zeros(int(ql.sum()), dtype=torch.long, device="cuda"), torch.cat(pos).cuda(),
                         ql.cuda(), cl.cuda(), slots, bt.cuda(), is_decode_only=decode)
    qb = q.cuda().to(torch.bfloat16)
    # the reference reads the cache as the backend leaves it: this step's K/V written from bf16 (in fp8 that
    # rounds fp32 -> bf16 -> fp8, one fp8 step off the direct rounding for ~3% of the values)
    after = layer.clone()
    R.write_kv(after, k_step.to(torch.bfloat16), v_step.to(torch.bfloat16), slots, kvc.k_scale, kvc.v_scale)
    want = R.paged_attention(qb.float(), after, ql, cl, bt, 128 ** -0.5, kvc.k_scale, kvc.v_scale)
    state = be.begin(batch, kvc)
    assert state is (be.decode if decode else be.prefill)
    got = be(qb, k_step.to(torch.bfloat16), v_step.to(torch.bfloat16), layer, batch, kvc, state, 0).float()
    torch.cuda.synchronize()
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 5e-2


@pytest.mark.gpu
def test_gpu_w8a8_probe_and_native_fp8_rule():
    """On this GPU: the _scaled_mm probe answers in one line (and runs on Hopper, where auto relies on it),
    and the fp8 loads of the Triton kernels take the native path exactly where the rule says."""
    from gpulab.vajra import fp8_kernels as K
    from gpulab.vajra.linear import w8a8_unavailable

    dev = torch.device("cuda")
    cc = torch.cuda.get_device_capability()
    for rowwise in (False, True):
        why = w8a8_unavailable(dev, rowwise)
        assert why is None or "\n" not in why
        if cc >= (9, 0):
            assert why is None, why
    x = torch.randn(8, 64, device=dev)
    q = x.to(E4)
    assert K.native_fp8(q) == (cc >= (8, 9))
    got = K.dequantize(q, torch.tensor(1.0, device=dev))  # native where the rule allows, raw bytes elsewhere
    assert torch.equal(got, q.float())


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_gpu_flashinfer_decode_matches_sdpa(kv):
    """Decode wrapper (its JIT module builds in ~16 s per KV dtype on first use)."""
    _flashinfer_vs_sdpa(kv, decode=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_gpu_flashinfer_prefill_matches_sdpa(kv):
    """Prefill wrapper on a mixed batch. Its JIT module takes ~75 s per KV dtype to build on first use,
    so it runs only with VAJRA_FLASHINFER_PREFILL=1 (the device scripts' time budget leaves no room)."""
    import os

    if os.environ.get("VAJRA_FLASHINFER_PREFILL", "") != "1":
        pytest.skip("flashinfer prefill JIT build (~75 s): set VAJRA_FLASHINFER_PREFILL=1 to run")
    _flashinfer_vs_sdpa(kv, decode=False)


def test_w8a8_probe_decides_dispatch(monkeypatch):
    """W8A8 is picked by auto only where torch._scaled_mm runs with the weight's scales (probed at load); an
    explicit w8a8 there is a one-line DeviceError naming the reason."""
    from gpulab.core.errors import DeviceError
    from gpulab.vajra import linear as L
    from gpulab.vajra.checkpoint import QuantWeight

    g = torch.Generator().manual_seed(0)
    q, s = R.quantize(torch.randn(32, 64, generator=g), "channel")
    asked = []

    def unavailable(device, rowwise):
        asked.append(rowwise)
        return "torch._scaled_mm with row-wise scales fails here (not supported on sm_89)" if rowwise else None

    monkeypatch.setattr(L, "w8a8_unavailable", unavailable)
    with pytest.raises(DeviceError, match="'w8a8' cannot run here: .*row-wise") as e:
        L.Linear(QuantWeight(q, s, "channel", None, "dynamic"), None, torch.float32, "w8a8")
    assert "\n" not in str(e.value)
    # static per-tensor activations with a per-tensor weight need only tensor-wise scales
    qt, st = R.quantize(torch.randn(32, 64, generator=g), "tensor")
    lin = L.Linear(QuantWeight(qt, st, "tensor", None, "static", torch.tensor(0.01)), None, torch.float32, "w8a8")
    assert asked == [True, False] and lin.w8a8_ok
    auto = L.Linear(QuantWeight(q, s, "channel", None, "dynamic"), None, torch.float32, "dequant-jit")
    auto.backend = "auto"  # as on a GPU at prefill sizes
    assert auto.choose(512) == "dequant-jit"
    auto.w8a8_ok = True
    assert auto.choose(512) == "w8a8" and auto.choose(1) == "w8a16"
    weight_only = L.Linear(QuantWeight(q, s, "channel", None, None), None, torch.float32, "dequant-jit")
    weight_only.backend, weight_only.w8a8_ok = "auto", True  # no input_activations: never quantized unasked
    assert weight_only.choose(512) == "dequant-jit"
