"""Portability of vajra across the declared dependency range and GPU generations, checked on the CPU.

* torch 2.4/2.5 lack several fp8 kernels ("cat_cuda", "index_cuda", fill_ ... not implemented for
  'Float8_e4m3fn'): :class:`Fp8KernelsOfTorch24` makes those ops raise like there, and the FP8 paths (shard
  fusion, the KV-cache scatter/gather, cache allocation) must not use them.
* torch 2.4's ``torch._scaled_mm`` returns ``(out, amax)``; some releases (2.4, 2.7) have no CPU kernel for it.
* flashinfer's CUDA-core decode kernels exist for GQA groups 1, 2, 3, 4, 8 only.
* GPUs before Ampere (compute capability < 8.0) have no native bf16: auto activations are fp16 there.
* The kernel bench's 8B decode step must not run out of memory on 12 GB cards.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpulab.core.errors import DeviceError
from gpulab.vajra import reference as R
from gpulab.vajra.checkpoint import QuantWeight

from .helpers import cpu_w8a8_or_skip

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
E4 = torch.float8_e4m3fn


class Fp8KernelsOfTorch24(TorchDispatchMode):
    """Ops with no fp8 kernel in torch 2.4 raise NotImplementedError when a float8 tensor takes part."""

    MISSING = {"cat", "index", "index_put", "index_put_", "_index_put_impl_", "fill_", "zero_", "index_select",
               "where", "stack"}
    FILLS = {"zeros", "ones", "full", "zeros_like", "full_like"}  # fill_ (CPU) of a new fp8 tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.FILLS and kwargs.get("dtype") in FP8:
            raise NotImplementedError('"fill_" not implemented for \'Float8_e4m3fn\' (as in torch 2.4)')
        if name in self.MISSING:
            flat = []
            for a in (*args, *kwargs.values()):
                flat += list(a) if isinstance(a, (list, tuple)) else [a]
            if any(isinstance(t, torch.Tensor) and t.dtype in FP8 for t in flat):
                raise NotImplementedError(f'"{name}" not implemented for \'Float8_e4m3fn\' (as in torch 2.4)')
        return func(*args, **kwargs)


def test_strict_mode_rejects_fp8_cat():
    """The emulation itself: torch.cat of fp8 tensors fails under it, as on torch 2.4/2.5."""
    a = torch.zeros(2, 4).to(E4)
    with Fp8KernelsOfTorch24(), pytest.raises(NotImplementedError, match="cat"):
        torch.cat([a, a])


@pytest.mark.parametrize("strategy", ["channel", "tensor", "block"])
def test_fuse_fp8_shards_without_fp8_cat(strategy):
    """q/k/v fusion of FP8 shards works where torch has no fp8 cat, with the same bytes as a cat."""
    from gpulab.vajra.linear import fuse

    g = torch.Generator().manual_seed(0)
    block = (16, 16) if strategy == "block" else None
    parts = []
    for rows in (32, 16, 16):
        q, s = R.quantize(torch.randn(rows, 32, generator=g), strategy, block)
        if strategy == "tensor":  # equal scales: a plain concatenation
            q, s = R.cast_fp8(q.float() * s, torch.tensor(0.01)), torch.tensor(0.01)
        parts.append(QuantWeight(q, s, strategy, block, "dynamic"))
    with Fp8KernelsOfTorch24():
        fused = fuse(parts, ["q.weight", "k.weight", "v.weight"])
    want = torch.cat([p.q.view(torch.uint8) for p in parts])
    assert fused.q.dtype == E4 and torch.equal(fused.q.view(torch.uint8), want)


def test_fuse_fp8_tensor_shards_requantized_without_fp8_cat():
    from gpulab.vajra.linear import fuse

    g = torch.Generator().manual_seed(1)
    parts = [QuantWeight(*R.quantize(torch.randn(16, 32, generator=g) * (i + 1), "tensor"), "tensor", None, "dynamic")
             for i in range(3)]
    with Fp8KernelsOfTorch24():
        fused = fuse(parts, ["q.weight", "k.weight", "v.weight"])
    full = torch.cat([R.dequantize(p.q, p.scale) for p in parts])
    assert float((R.dequantize(fused.q, fused.scale) - full).abs().max()) <= float(fused.scale) * 32


@pytest.mark.parametrize("dt", FP8)
def test_fp8_kv_scatter_gather_without_fp8_indexing(dt):
    """write_kv / gather_kv on an fp8 cache (the torch attention backend, prefill hand-over) index raw bytes."""
    g = torch.Generator().manual_seed(0)
    layer = torch.zeros(6, 2, 4, 2, 8, dtype=torch.uint8).view(dt)
    ref = torch.zeros(6, 2, 4, 2, 8)
    k, v = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    slots = torch.tensor([4, 5, 6, 7, 8])
    with Fp8KernelsOfTorch24():
        R.write_kv(layer, k, v, slots, 0.5, 0.25)
        kg, vg = R.gather_kv(layer, torch.tensor([1, 2, 0]), 5, torch.float32, 0.5, 0.25)
    R.write_kv(ref, k, v, slots)
    kr, vr = R.gather_kv(ref, torch.tensor([1, 2, 0]), 5, torch.float32)
    # one fp8 rounding of k / 0.5 and v / 0.25
    assert torch.allclose(kg, kr, rtol=0.13, atol=0.02) and torch.allclose(vg, vr, rtol=0.13, atol=0.02)
    assert torch.equal(kg, ((k / 0.5).to(dt).float() * 0.5))


def test_fp8_kv_cache_allocation_without_fp8_fill(tmp_path):
    from gpulab.vajra.load import load_model

    from .helpers import make_tiny

    _, d = make_tiny(tmp_path / "m")
    m = load_model(d)
    with Fp8KernelsOfTorch24():
        kv = m.allocate_kv_cache(4, 4, "fp8")
    assert kv.dtype == E4 and all(t.dtype == E4 and not bool(t.float().any()) for t in kv.layers)


# ----------------------------------------------------------------------------------------------- _scaled_mm


def _old_scaled_mm(real):
    def fake(a, b, **kw):  # torch 2.4: (out, amax)
        return real(a, b, **kw), torch.zeros(())
    return fake


def test_scaled_mm_tuple_of_torch_2_4(monkeypatch):
    """torch 2.4 returns (out, amax): the W8A8 layer and its probe take the output."""
    from gpulab.vajra import linear as L

    cpu_w8a8_or_skip()

    g = torch.Generator().manual_seed(0)
    q, s = R.quantize(torch.randn(32, 64, generator=g), "channel")
    x = torch.randn(5, 64, generator=g)
    want = L.Linear(QuantWeight(q, s, "channel", None, "dynamic"), None, torch.float32, "w8a8")(x)
    monkeypatch.setattr(torch, "_scaled_mm", _old_scaled_mm(torch._scaled_mm))
    L._scaled_mm_probe.cache_clear()
    try:
        assert L.w8a8_unavailable(torch.device("cpu"), True) is None
        got = L.Linear(QuantWeight(q, s, "channel", None, "dynamic"), None, torch.float32, "w8a8")(x)
    finally:
        L._scaled_mm_probe.cache_clear()
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)


def test_scaled_mm_without_cpu_kernel_is_a_device_error(monkeypatch):
    """A torch without a CPU _scaled_mm (2.4, 2.7): an explicit w8a8 on the CPU is a one-line DeviceError at load."""
    from gpulab.vajra import linear as L

    def no_cpu(a, b, **kw):
        raise NotImplementedError("Could not run 'aten::_scaled_mm' with arguments from the 'CPU' backend.\nmore")

    q, s = R.quantize(torch.randn(32, 64), "channel")
    monkeypatch.setattr(torch, "_scaled_mm", no_cpu)
    L._scaled_mm_probe.cache_clear()
    try:
        why = L.w8a8_unavailable(torch.device("cpu"), True)
        assert why and "CPU" in why and "\n" not in why
        with pytest.raises(DeviceError, match="cannot run here"):
            L.Linear(QuantWeight(q, s, "channel", None, "dynamic"), None, torch.float32, "w8a8")
    finally:
        L._scaled_mm_probe.cache_clear()


def test_fast_accumulation_only_on_a_gpu_and_as_switched(monkeypatch):
    """W8A8 on a GPU asks _scaled_mm for fast accumulation (FAST_ACCUM, GPULAB_FP8_FAST_ACCUM=0 off), never on the
    CPU; an explicit fast_accum wins; a (device, scale kind) whose probe found it refused keeps plain accumulation."""
    from gpulab.vajra import linear as L

    cuda0, cpu = torch.device("cuda:0"), torch.device("cpu")
    monkeypatch.setattr(L, "_NO_FAST_ACCUM", set())
    monkeypatch.setattr(L, "FAST_ACCUM", True)
    assert L._fast_accum(cuda0, True, None) and not L._fast_accum(cpu, True, None) and not L._fast_accum(cpu, True, True)
    assert not L._fast_accum(cuda0, True, False)
    L._NO_FAST_ACCUM.add(("cuda:0", True))
    assert not L._fast_accum(cuda0, True, None) and L._fast_accum(cuda0, False, None)
    monkeypatch.setattr(L, "FAST_ACCUM", False)
    assert not L._fast_accum(cuda0, False, None) and L._fast_accum(cuda0, False, True)
    seen = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kw: seen.append(kw) or torch.zeros(a.shape[0], b.shape[1]))
    monkeypatch.setattr(L, "_fast_accum", lambda dev, rowwise, fast: seen.append(("rowwise", rowwise)) or True)
    a8 = torch.zeros(4, 16).to(torch.float8_e4m3fn)
    L.scaled_mm(a8, a8.t(), torch.ones(4, 1), torch.ones(1, 4), torch.float32)
    L.scaled_mm(a8, a8.t(), torch.ones(()), torch.ones(()), torch.float32)
    assert seen[0] == ("rowwise", True) and seen[1]["use_fast_accum"] is True and seen[2] == ("rowwise", False)


@pytest.mark.parametrize("refused", ["fast", "both", "switched-off"])
def test_probe_falls_back_to_plain_accumulation(monkeypatch, refused):
    """On a GPU the probe tries fast accumulation first; refused, plain accumulation, which then serves that device
    and scale kind; both refused: W8A8 is unavailable (the reason). With FAST_ACCUM off it tries plain only."""
    import types

    from gpulab.vajra import linear as L

    calls = []

    def fake_scaled_mm(a, b, sa, sb, out_dtype, fast_accum=None):
        calls.append(fast_accum)
        if fast_accum or refused == "both":
            raise RuntimeError("use_fast_accum is not supported for this scaling\nmore")
        return torch.zeros(16, 16)

    fake_torch = types.SimpleNamespace(
        device=torch.device, float8_e4m3fn=torch.float8_e4m3fn, bfloat16=torch.bfloat16, float32=torch.float32,
        zeros=lambda *a, device=None: torch.zeros(*a), ones=lambda *a, device=None: torch.ones(*a),
        cuda=types.SimpleNamespace(synchronize=lambda dev: None))
    monkeypatch.setattr(L, "torch", fake_torch)
    monkeypatch.setattr(L, "scaled_mm", fake_scaled_mm)
    monkeypatch.setattr(L, "_NO_FAST_ACCUM", set())
    monkeypatch.setattr(L, "FAST_ACCUM", refused != "switched-off")
    L._scaled_mm_probe.cache_clear()
    try:
        why = L._scaled_mm_probe("cuda:0", True)
    finally:
        L._scaled_mm_probe.cache_clear()
    if refused == "fast":
        assert why is None and calls == [True, False] and L._NO_FAST_ACCUM == {("cuda:0", True)}
    elif refused == "both":
        assert calls == [True, False] and why.startswith("torch._scaled_mm with row-wise scales fails here (use_fast")
        assert "\n" not in why and not L._NO_FAST_ACCUM
    else:
        assert why is None and calls == [None] and not L._NO_FAST_ACCUM


@pytest.mark.gpu
def test_gpu_w8a8_fast_accumulation_matches_the_reference():
    """Fast accumulation (the default on a GPU) and plain accumulation both match the fake-quant reference at a
    decode batch of 256 over K = 4096, and each other within bf16 rounding."""
    from gpulab.vajra import linear as L

    if L.w8a8_unavailable(torch.device("cuda"), True) is not None:
        pytest.skip("no W8A8 on this GPU")
    if (f"cuda:{torch.cuda.current_device()}", True) in L._NO_FAST_ACCUM:
        pytest.skip("this torch refuses fast accumulation with row-wise scales (the probe fell back)")
    g = torch.Generator().manual_seed(3)
    wq, ws = R.quantize(torch.randn(512, 4096, generator=g) * 0.02, "channel")
    xq, xs = R.quantize(torch.randn(256, 4096, generator=g), "token")
    want = (xq.float() * xs[:, None]) @ (wq.float() * ws.reshape(-1, 1)).t()
    ys = [L.scaled_mm(xq.cuda(), wq.cuda().t(), xs.cuda()[:, None], ws.cuda()[None, :], torch.bfloat16,
                      fast_accum=f).float().cpu() for f in (True, False)]
    for y in ys:
        assert float((y - want).norm() / want.norm()) < 1e-2
    assert float((ys[0] - ys[1]).norm() / ys[1].norm()) < 1e-2


# ----------------------------------------------------------------------------------------------- flashinfer


@pytest.mark.parametrize("hq,hkv,tc", [(32, 8, False), (8, 8, False), (24, 8, False), (64, 8, False),
                                       (28, 4, True), (40, 8, True), (48, 8, True), (32, 2, True)])
def test_flashinfer_decode_group_sizes(monkeypatch, hq, hkv, tc):
    """Groups other than 1, 2, 3, 4, 8 (Qwen2-7B: 28/4 = 7) take flashinfer's tensor-core decode, which has
    every group size; the CUDA-core kernels answer 'Unsupported group_size' for them."""
    from gpulab.vajra import attention as A

    assert A.flashinfer_decode_tensor_cores(hq, hkv) is tc
    seen = {}
    fake = types.ModuleType("flashinfer")
    fake.BatchPrefillWithPagedKVCacheWrapper = lambda *a, **kw: ("prefill", kw)
    fake.BatchDecodeWithPagedKVCacheWrapper = lambda *a, **kw: seen.update(kw) or ("decode", kw)
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **kw: real_empty(*a, **kw))  # no GPU here
    be = A.FlashInferAttention(hq, hkv, 128, scale=0.1, device=torch.device("cuda"), act_dtype=torch.bfloat16)
    assert seen["use_tensor_cores"] is tc and be.use_tensor_cores is tc


# ----------------------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("cc,ckpt,want", [((9, 0), "bfloat16", torch.bfloat16), ((8, 6), None, torch.bfloat16),
                                          ((7, 5), "bfloat16", torch.float16), ((7, 0), None, torch.float16),
                                          ((8, 9), "float16", torch.float16)])
def test_auto_activation_dtype_by_compute_capability(monkeypatch, cc, ckpt, want):
    """auto: bf16 where the GPU has it natively (Ampere on), fp16 on older GPUs (T4, RTX 20); explicit dtypes stay."""
    from gpulab.vajra.config import parse_config
    from gpulab.vajra.load import resolve_dtype

    cfg = parse_config({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 1, **({"torch_dtype": ckpt} if ckpt else {})})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    assert resolve_dtype("auto", torch.device("cuda"), cfg) == want
    assert resolve_dtype("bf16", torch.device("cuda"), cfg) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu"), cfg) == torch.float32


# ----------------------------------------------------------------------------------------------- kernel bench


def test_kernel_bench_decode_step_skips_when_the_8b_model_does_not_fit(monkeypatch):
    from gpulab.vajra import kernel_bench as KB
    from gpulab.vajra import load

    need = KB.decode_step_bytes()
    assert 10 * 2**30 < need < 14 * 2**30  # ~7 GB FP8 linears + 2 GB bf16 embed/lm_head + KV + margin
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (11 * 2**30, 12 * 2**30))
    monkeypatch.setattr(load, "load_model", lambda *a, **kw: pytest.fail("must not load the 8B model"))
    rec = types.SimpleNamespace(notes=[], metrics={})
    KB._decode_step(rec, None, 1, ("triton",))
    assert len(rec.notes) == 1 and "decode step skipped" in rec.notes[0] and "11.0 GiB" in rec.notes[0]


# ----------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_gpu_fp8_fusion_kv_reference_and_scaled_mm():
    """On this GPU and torch: FP8 shard fusion and the fp8 KV scatter/gather give the CPU's bytes, and where
    W8A8 runs, the _scaled_mm wrapper returns the output tensor."""
    from gpulab.vajra import linear as L

    g = torch.Generator().manual_seed(0)
    parts = [QuantWeight(*R.quantize(torch.randn(rows, 64, generator=g), "channel"), "channel", None, "dynamic")
             for rows in (32, 16, 16)]
    cpu = L.fuse(parts, ["q", "k", "v"])
    gpu = L.fuse([QuantWeight(p.q.cuda(), p.scale.cuda(), "channel", None, "dynamic") for p in parts], ["q", "k", "v"])
    assert torch.equal(gpu.q.cpu().view(torch.uint8), cpu.q.view(torch.uint8))
    k, v = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    slots, row = torch.tensor([4, 5, 6, 7, 8]), torch.tensor([1, 2, 0])
    out = []
    for dev in ("cpu", "cuda"):
        layer = torch.zeros(6, 2, 4, 2, 8, dtype=torch.uint8, device=dev).view(E4)
        R.write_kv(layer, k.to(dev), v.to(dev), slots.to(dev), 0.5, 0.25)
        out.append([t.cpu() for t in R.gather_kv(layer, row.to(dev), 5, torch.float32, 0.5, 0.25)])
    assert all(torch.equal(a, b) for a, b in zip(*out))
    if L.w8a8_unavailable(torch.device("cuda"), True) is None:
        xq, xs = R.quantize(torch.randn(16, 64, generator=g), "token")
        y = L.scaled_mm(xq.cuda(), gpu.q.t(), xs.cuda()[:, None], gpu.scale[None, :], torch.bfloat16)
        assert isinstance(y, torch.Tensor) and y.shape == (16, 64)
        want = (xq.float() * xs[:, None]) @ (cpu.q.float() * cpu.scale.reshape(-1, 1)).t()  # row-wise scales
        assert float((y.float().cpu() - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
def test_gpu_flashinfer_decode_group_size_7():
    """Qwen2-7B's layout (28 query heads on 4 KV heads): the decode wrapper must take the tensor-core path
    (its JIT module is the prefill one, ~75 s to build: runs only with VAJRA_FLASHINFER_PREFILL=1)."""
    import os

    pytest.importorskip("flashinfer")
    if os.environ.get("VAJRA_FLASHINFER_PREFILL", "") != "1":
        pytest.skip("flashinfer prefill JIT build (~75 s): set VAJRA_FLASHINFER_PREFILL=1 to run")
    from gpulab.vajra.attention import FlashInferAttention
    from gpulab.vajra.interface import ForwardBatch, KVCache

    hq, hkv, d, page, b, ctx = 28, 4, 128, 16, 3, 40
    g = torch.Generator().manual_seed(0)
    nb = b * 3 + 1
    cache = torch.randn(nb, 2, page, hkv, d, generator=g).to(torch.bfloat16).cuda()
    bt = (1 + torch.arange(b * 3)).view(b, 3).to(torch.int32)
    cl, ql = torch.full((b,), ctx, dtype=torch.int32), torch.ones(b, dtype=torch.int32)
    slots = (bt[:, (ctx - 1) // page].long() * page + (ctx - 1) % page).cuda()
    k_step, v_step = cache[slots // page, 0, slots % page].clone(), cache[slots // page, 1, slots % page].clone()
    q = torch.randn(b, hq, d, generator=g).to(torch.bfloat16).cuda()
    be = FlashInferAttention(hq, hkv, d, scale=d ** -0.5, device=torch.device("cuda"), act_dtype=torch.bfloat16)
    assert be.use_tensor_cores
    kvc = KVCache([cache], page, nb, cache.dtype)
    batch = ForwardBatch(torch.zeros(b, dtype=torch.long, device="cuda"), (cl - 1).long().cuda(), ql.cuda(), cl.cuda(),
                         slots, bt.cuda(), is_decode_only=True)
    got = be(q, k_step, v_step, cache, batch, kvc, be.begin(batch, kvc), 0).float()
    want = R.paged_attention(q.float(), cache, ql, cl, bt, d ** -0.5)
    assert float((got - want).abs().max()) < 5e-2


def test_kernel_bench_survives_a_flashinfer_plan_failure():
    """flashinfer's plan() JIT-builds its module (nvcc needed; no bf16 kernels before sm_80): when it fails, the
    attention row is a failed check, not the end of the bench."""
    from gpulab.vajra import kernel_bench as KB

    class Rec:
        def __init__(self):
            self.checks, self.metrics, self.rows, self.notes = [], {}, [], []

        def check(self, name, ok, detail=None):
            self.checks.append((name, ok, detail))

    class BrokenFlashInfer:
        def begin(self, batch, kv):
            raise RuntimeError("Ninja build failed: nvcc not found\nmore")

    rec = Rec()
    key, times = KB._attention_config(rec, "cpu", 1, 16, None, (4, 2, 16, 4), torch.float32, (), BrokenFlashInfer(), 1)
    assert times == {} and len(rec.checks) == 1
    name, ok, detail = rec.checks[0]
    assert "flashinfer" in name and not ok and detail == "RuntimeError: Ninja build failed: nvcc not found"


def test_installed_flashinfer_takes_the_calls_vajra_makes():
    """Where flashinfer is installed (the GPU machine carries 0.2.14), its wrappers accept the arguments of
    attention.FlashInferAttention (constructors, plan, run), checked by signature on any machine."""
    import inspect

    fi = pytest.importorskip("flashinfer")
    D, P = fi.BatchDecodeWithPagedKVCacheWrapper, fi.BatchPrefillWithPagedKVCacheWrapper
    w, a = object(), object()
    inspect.signature(D.__init__).bind(w, w, "NHD", use_tensor_cores=False)
    inspect.signature(P.__init__).bind(w, w, "NHD", backend="fa2")
    inspect.signature(D.plan).bind(w, a, a, a, 32, 8, 128, 16, pos_encoding_mode="NONE", sm_scale=0.1,
                                   q_data_type=a, kv_data_type=a)
    inspect.signature(P.plan).bind(w, a, a, a, a, 32, 8, 128, 16, causal=True, sm_scale=0.1, q_data_type=a,
                                   kv_data_type=a)
    for cls in (D, P):
        inspect.signature(cls.run).bind(w, a, a, k_scale=0.5, v_scale=0.5)
