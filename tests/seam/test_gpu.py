"""CUDA paths (bf16 autocast, channels_last, CUDA-event latency, training on the GPU), each checked
against the fp32 CPU reference. Skipped without a GPU; run with `pytest -m gpu tests/seam`."""
from __future__ import annotations

import pytest
import torch

from gpulab.seam.measure import autocast_for, family_flops, latency_ms
from gpulab.seam.models import MemberNet, StitchedFamily
from gpulab.seam.stitch import least_squares_init

from .helpers import tiny_spec

pytestmark = pytest.mark.gpu


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    cpu = StitchedFamily(tiny_spec(width=8, image_size=32, **kw)).eval()
    gpu = StitchedFamily(tiny_spec(width=8, image_size=32, **kw))
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda().to(memory_format=torch.channels_last).eval()


def test_bf16_channels_last_forward_matches_fp32_cpu():
    cpu, gpu = _pair(cuts="aligned")
    x = torch.randn(16, 3, 32, 32)
    xg = x.cuda().contiguous(memory_format=torch.channels_last)
    ac = autocast_for("cuda", True)
    with torch.no_grad():
        for m in cpu.members()[::3]:
            ref = cpu.forward_member(x, m)
            fp32 = gpu.forward_member(xg, m).float().cpu()
            with ac():
                low = gpu.forward_member(xg, m).float().cpu()
            scale = ref.std().clamp_min(1e-3)
            assert float((fp32 - ref).abs().max() / scale) < 2e-2, m.name  # TF32 convs allowed
            assert float((low - ref).abs().max() / scale) < 0.25, m.name


def test_lstsq_init_on_gpu_matches_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs: residual MSEs are sensitive
    cpu, gpu = _pair(seed=1, cuts="aligned")
    x = torch.randn(24, 3, 32, 32)
    rc = least_squares_init(cpu, x, batch_size=12)
    rg = least_squares_init(gpu, x.cuda().contiguous(memory_format=torch.channels_last), batch_size=12)
    for c in cpu.cuts:
        assert rg[c.key]["mse_lstsq"] == pytest.approx(rc[c.key]["mse_lstsq"], rel=2e-2, abs=1e-6), c.name
        assert rg[c.key]["mse_lstsq"] <= rg[c.key]["mse_init"], c.name


def test_flops_on_gpu_equal_cpu_counts_and_latency_is_measured():
    cpu, gpu = _pair(seed=2, cuts="aligned")
    assert family_flops(gpu, 32) == family_flops(cpu, 32)
    m = gpu.member(gpu.cuts[5].name)
    for b in (1, 64):
        lat = latency_ms(MemberNet(gpu, m).eval(), b, 32, "cuda", amp=True, reps=5)
        assert lat["median"] > 0 and lat["reps"] >= 3
        # captured as a CUDA graph whose output matched an eager forward; the eager time kept beside it
        assert lat["mode"] == "graph", lat.get("graph_error")
        assert lat["eager_median"] > 0
        assert latency_ms(MemberNet(gpu, m).eval(), b, 32, "cuda", amp=True, reps=3, graph=False)["mode"] == "eager"


def test_training_steps_on_gpu_with_amp(tmp_path):
    from gpulab.seam import data as sdata
    from gpulab.seam.train import TrainConfig, Trainer

    from .helpers import write_cifar

    d = write_cifar(tmp_path / "c", n_train=64, n_test=16)
    x, y = sdata.load_cifar10(d, "train")
    cfg = TrainConfig(spec=tiny_spec(width=8, image_size=32, cuts="aligned"), batch_size=16, anchor_steps=4,
                      stitch_steps=6, calib_images=16, amp=True)
    t = Trainer(cfg, tmp_path / "f", sdata.TensorSource(x, y, 16, 0, "cuda"), "cuda", log=lambda s: None)
    t.run()
    assert all(h.get("loss_finite", True) for h in t.history)
    assert all(r["mse_lstsq"] <= r["mse_init"] for r in t.lstsq.values())
    assert all(torch.isfinite(p).all() for p in t.family.parameters())
