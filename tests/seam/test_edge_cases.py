"""Edge cases against plain references: least squares at cuts with p != q, top-1 over uneven batches,
interpolation fractions and the inclusive FLOPs band, the noise band above the anchors, and selection /
Pareto front against brute force on random results."""
from __future__ import annotations

import random

import pytest
import torch

from gpulab.seam import select as sel
from gpulab.seam.evaluate import diff_noise_95, interpolation, top1
from gpulab.seam.models import StitchedFamily
from gpulab.seam.reference import lightest_meeting, lstsq_reference
from gpulab.seam.stitch import least_squares_init

from .helpers import tiny_spec


def test_lstsq_targets_the_back_anchor_at_q_for_unaligned_cuts():
    """Cuts with p != q at the same stride: the target is the back anchor's activation at q (the one at p has
    the same shape there, so using it would go unnoticed by shape checks)."""
    torch.manual_seed(0)
    fam = StitchedFamily(tiny_spec(width=2, cuts="all", stitch_bn=False))
    fam.train()
    with torch.no_grad():
        for a in fam.anchors.values():
            a(torch.randn(16, 3, 8, 8))
    fam.eval()
    calib = torch.randn(12, 3, 8, 8)
    least_squares_init(fam, calib, batch_size=6)
    picked = [c for c in fam.cuts if c.p != c.q and c.p <= 16 and c.q <= 16][::9]
    assert len(picked) >= 6
    with torch.no_grad():
        acts = {a: fam.anchors[a].forward_positions(calib) for a in fam.spec.anchors}
        for c in picked:
            w, b = lstsq_reference(acts[c.front][c.p], acts[c.back][c.q], ridge=1e-2)
            layer = fam.stitches[c.key]
            torch.testing.assert_close(layer.conv.weight.reshape(layer.cout, layer.cin).double(), w, atol=1e-5,
                                       rtol=1e-4, msg=lambda m: f"{c.name}: {m}")
            torch.testing.assert_close(layer.conv.bias.double(), b, atol=1e-5, rtol=1e-4)


class _Fixed(torch.nn.Module):
    """A stand-in family whose member returns fixed logits per batch (in call order)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.i = logits, 0

    def forward_member(self, x, m):
        out = self.logits[self.i]
        self.i += 1
        return out


def test_top1_counts_images_over_uneven_batches():
    import contextlib

    g = torch.Generator().manual_seed(0)
    sizes = (4, 7, 1)  # none equals the 10 classes
    logits = [torch.randn(n, 10, generator=g) for n in sizes]
    labels = [torch.randint(0, 10, (n,), generator=g) for n in sizes]
    labels[0] = logits[0].argmax(1)  # a batch that is all right, and a one-image batch that is wrong
    labels[2] = (logits[2].argmax(1) + 1) % 10
    want = sum(int((lg.argmax(1) == y).sum()) for lg, y in zip(logits, labels)) / sum(sizes)
    fam = _Fixed(logits)
    acc, finite = top1(fam, None, lambda: iter(zip([torch.zeros(n) for n in sizes], labels)),
                       contextlib.nullcontext, "cpu")
    assert acc == pytest.approx(want) and finite
    assert 4 / 12 <= acc < 1


def _ip_models():
    return [{"name": "r34", "kind": "anchor", "top1": 0.80, "flops": 10},
            {"name": "r50", "kind": "anchor", "top1": 0.90, "flops": 20},
            {"name": "at-front-flops", "kind": "stitch", "top1": 0.85, "flops": 10},   # on the band's edges:
            {"name": "at-back-acc", "kind": "stitch", "top1": 0.90, "flops": 20},      # inclusive
            {"name": "below", "kind": "stitch", "top1": 0.70, "flops": 15},
            {"name": "heavy", "kind": "stitch", "top1": 0.85, "flops": 30},
            {"name": "r18", "kind": "baseline", "top1": 0.86, "flops": 15},
            {"name": "r101", "kind": "baseline", "top1": 0.95, "flops": 40}]


def test_interpolation_band_is_inclusive_and_fractions_are_over_stitches():
    ms = _ip_models()
    out = interpolation(ms)
    by = {m["name"]: m for m in ms}
    assert by["at-front-flops"]["interpolates"] and by["at-back-acc"]["interpolates"]
    assert not by["below"]["interpolates"] and by["below"]["flops_between"]
    assert not by["heavy"]["interpolates"] and by["heavy"]["acc_between"]
    assert "interpolates" not in by["r18"]  # baselines are not stitches
    assert out["stitches"] == 4 and out["interpolating"] == 2 and out["fraction"] == 0.5
    assert out["acc_between"] == 3 and out["acc_between_fraction"] == 0.75
    assert out["flops_between"] == 3 and out["flops_between_fraction"] == 0.75


def test_within_noise_band_widens_both_edges():
    n = 400
    ms = [{"name": "r34", "kind": "anchor", "top1": 0.80, "flops": 10},
          {"name": "r50", "kind": "anchor", "top1": 0.82, "flops": 20},
          {"name": "just-above", "kind": "stitch", "top1": 0.83, "flops": 15},
          {"name": "just-below", "kind": "stitch", "top1": 0.79, "flops": 15},
          {"name": "far-above", "kind": "stitch", "top1": 0.95, "flops": 15}]
    assert 0.83 - 0.82 < diff_noise_95(0.83, 0.82, n) and 0.95 - 0.82 > diff_noise_95(0.95, 0.82, n)
    out = interpolation(ms, n_test=n)
    by = {m["name"]: m for m in ms}
    assert by["just-above"]["interpolates_within_noise"] and not by["just-above"]["interpolates"]
    assert by["just-below"]["interpolates_within_noise"] and not by["far-above"]["interpolates_within_noise"]
    assert out["interpolating_within_noise"] == 2 and out["fraction_within_noise"] == pytest.approx(2 / 3)


def _random_models(seed):
    rng = random.Random(seed)
    kinds = ["anchor", "anchor"] + [rng.choice(["stitch", "stitch", "baseline"]) for _ in range(18)]
    # coarse grids: ties in cost and in accuracy are common
    return [{"name": f"m{i:02d}", "kind": k, "top1": rng.choice([0.5, 0.6, 0.7, 0.8, 0.9]),
             "flops": rng.choice([10, 20, 30, 40, 50]), "params": rng.randint(1, 5)} for i, k in enumerate(kinds)]


@pytest.mark.parametrize("seed", range(6))
def test_selection_and_pareto_front_against_brute_force(seed):
    models = _random_models(seed)
    levels = [0.55, 0.6, 0.75, 0.9, 0.95]
    rows, key = sel.select(models, levels, "flops")
    baselines = [m for m in models if m["kind"] in ("anchor", "baseline")]
    assert [r["accuracy"] for r in rows] == levels  # one row per level: the zip below drops none
    for a, r in zip(levels, rows):
        best = lightest_meeting(models, a, key)
        base = lightest_meeting(baselines, a, key)
        assert (r["chosen"] is None) == (best is None)
        if best is None:
            continue
        chosen = next(m for m in models if m["name"] == r["chosen"])
        assert (chosen["flops"], chosen["top1"]) == (best["flops"], best["top1"])  # lightest, then most accurate
        assert chosen["top1"] >= a
        if base is not None:
            assert r["lighter"] == (best["flops"] < base["flops"])
            assert r["saving"] == pytest.approx(1 - best["flops"] / base["flops"])
    front = sel.pareto_front(models, key)
    undominated = {(m["flops"], m["top1"]) for m in models
                   if not any(o["flops"] <= m["flops"] and o["top1"] >= m["top1"]
                              and (o["flops"], o["top1"]) != (m["flops"], m["top1"]) for o in models)}
    assert [(m["flops"], m["top1"]) for m in front] == sorted(undominated)  # one per point, ascending cost
    assert all(r["chosen"] in {m["name"] for m in front} for r in rows if r["chosen"])


def test_within_noise_upper_edge_uses_the_upper_anchor():
    """SE3: the upper edge widens by the noise of (stitch, upper anchor), the lower by (stitch, lower anchor)."""
    from gpulab.seam.evaluate import diff_noise_95, interpolation

    n = 100
    ms = [{"name": "a", "kind": "anchor", "top1": 0.50, "flops": 10},
          {"name": "b", "kind": "anchor", "top1": 0.90, "flops": 20},
          {"name": "hi", "kind": "stitch", "top1": 0.99, "flops": 15},
          {"name": "lo", "kind": "stitch", "top1": 0.38, "flops": 15}]
    # 0.99 is above 0.90 by more than noise(0.99, 0.90) but less than noise(0.99, 0.50)
    assert diff_noise_95(0.99, 0.90, n) < 0.09 < diff_noise_95(0.99, 0.50, n)
    # 0.38 is below 0.50 by less than noise(0.38, 0.50) but more than noise(0.38, 0.90)
    assert diff_noise_95(0.38, 0.90, n) < 0.12 < diff_noise_95(0.38, 0.50, n)
    interpolation(ms, n_test=n)
    by = {m["name"]: m for m in ms}
    assert by["hi"]["interpolates_within_noise"] is False
    assert by["lo"]["interpolates_within_noise"] is True
