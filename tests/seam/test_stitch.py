"""Least-squares stitch initialisation against torch.linalg.lstsq, and the MSE it must lower."""
from __future__ import annotations

import pytest
import torch

from gpulab.seam.models import StitchedFamily
from gpulab.seam.reference import lstsq_reference
from gpulab.seam.stitch import StitchLayer, least_squares_init

from .helpers import tiny_spec


def _family(bn: bool, seed: int = 0) -> StitchedFamily:
    torch.manual_seed(seed)
    fam = StitchedFamily(tiny_spec(width=4, cuts="aligned", stitch_bn=bn))
    # give the anchors non-trivial BN statistics so activations are not at their init scale
    fam.train()
    with torch.no_grad():
        for a in fam.anchors.values():
            a(torch.randn(16, 3, 8, 8))
    return fam.eval()


@pytest.mark.parametrize("bn", [False, True])
def test_lstsq_init_matches_reference_and_lowers_mse(bn):
    fam = _family(bn)
    calib = torch.randn(24, 3, 8, 8)
    held_out = torch.randn(24, 3, 8, 8)

    def mse(images):
        out = {}
        with torch.no_grad():
            acts = {a: fam.anchors[a].forward_positions(images) for a in fam.spec.anchors}
            for c in fam.cuts:
                pred = fam.stitches[c.key](acts[c.front][c.p])
                out[c.key] = float(((pred - acts[c.back][c.q]) ** 2).mean())
        return out

    before_cal, before_ho = mse(calib), mse(held_out)
    report = least_squares_init(fam, calib, batch_size=10)  # 3 batches: the accumulation is exercised
    after_cal, after_ho = mse(calib), mse(held_out)
    for c in fam.cuts:
        assert after_cal[c.key] < before_cal[c.key], c.name
        assert after_ho[c.key] < before_ho[c.key], c.name
        # the analytic MSE report agrees with the measured one
        assert report[c.key]["mse_lstsq"] == pytest.approx(after_cal[c.key], rel=1e-3, abs=1e-7)
        assert report[c.key]["mse_init"] == pytest.approx(before_cal[c.key], rel=1e-3, abs=1e-7)
    # the solution is the least-squares solution of the pixel regression
    with torch.no_grad():
        for c in fam.cuts[::4]:
            x = fam.anchors[c.front].forward_positions(calib)[c.p]
            y = fam.anchors[c.back].forward_positions(calib)[c.q]
            w, b = lstsq_reference(x, y, ridge=1e-2)
            layer = fam.stitches[c.key]
            assert torch.allclose(layer.conv.weight.reshape(layer.cout, layer.cin).double(), w, atol=1e-5, rtol=1e-4)
            assert torch.allclose(layer.conv.bias.double(), b, atol=1e-5, rtol=1e-4)


def test_bn_is_identity_over_calibration_statistics():
    fam = _family(True, seed=3)
    calib = torch.randn(20, 3, 8, 8)
    least_squares_init(fam, calib, batch_size=20)
    c = fam.cuts[7]
    layer = fam.stitches[c.key].eval()
    with torch.no_grad():
        x = fam.anchors[c.front].forward_positions(calib)[c.p]
        conv = layer.conv(x)
        assert torch.allclose(layer(x), conv, atol=1e-4)
        # the running statistics are the conv output's statistics
        assert torch.allclose(layer.bn.running_mean, conv.mean((0, 2, 3)), atol=1e-4)
        assert torch.allclose(layer.bn.running_var, conv.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-5)


def test_rank_deficient_front_still_solves():
    layer = StitchLayer(3, 2, bn=False)
    from gpulab.seam.stitch import Gram, LstsqProblem, solve_normal

    x = torch.randn(50, 1).double().repeat(1, 3)  # three identical channels
    y = torch.cat([2 * x[:, :1], -x[:, :1] + 1], 1)
    g, pr = Gram(), LstsqProblem()
    g.add(x)
    pr.add(x, y)
    wb = solve_normal(g.xtx, pr.xty, ridge=1e-9)
    assert torch.isfinite(wb).all()
    x1 = torch.cat([x, torch.ones(50, 1, dtype=x.dtype)], 1)
    assert torch.allclose(x1 @ wb, y, atol=1e-3)
    assert layer.conv.weight.shape == (2, 3, 1, 1)


def test_amp_agreement_rms_and_max_against_true_fp32():
    """amp_agreement: zero for a no-op autocast; under CPU bf16 autocast a small RMS, the max above the RMS; the
    fp32 reference runs with TF32 off and the flags are restored."""
    import contextlib

    from gpulab.seam.evaluate import amp_agreement

    fam = _family(True)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    same = amp_agreement(fam, x, contextlib.nullcontext)
    assert same == {"rms": 0.0, "max": 0.0}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    low = amp_agreement(fam, x, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert 0.0 < low["rms"] < low["max"] < 0.5, low
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def test_latency_on_the_cpu_is_eager_and_says_so():
    from gpulab.seam.measure import latency_ms
    from gpulab.seam.models import MemberNet

    fam = _family(False)
    lat = latency_ms(MemberNet(fam, fam.members()[0]).eval(), 2, 8, "cpu", amp=True, reps=3, warmup=1)
    assert lat["mode"] == "eager" and lat["median"] > 0 and "eager_median" not in lat
