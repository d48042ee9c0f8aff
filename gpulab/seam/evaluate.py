"""Evaluating every member of a family: top-1, FLOPs, parameters, latency; which stitches interpolate.

A stitch *interpolates* when its top-1 and its FLOPs both lie between the two anchors' (inclusive).
Top-1 on a finite test set is a noisy estimate: with the test-set size, :func:`interpolation` also
counts the stitches whose top-1 is between the anchors' *within noise* (not outside the band by more
than the 95% interval of a difference of two accuracies on n images, binomial and unpaired, so
conservative), and reports the band's width against that noise: when the anchors differ by less than
the test set resolves, whether a stitch lands strictly inside the band is largely chance.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from gpulab.seam.measure import family_flops, latency_ms, member_flops
from gpulab.seam.models import MemberNet, StitchedFamily
from gpulab.seam.reference import conv_linear_macs


@torch.no_grad()
def top1(family: StitchedFamily, member, batches: Callable, autocast, device: str) -> tuple[float, bool]:
    """Top-1 accuracy over the evaluation batches, and whether every logit was finite."""
    family.eval()
    correct = total = 0
    finite = True
    for x, y in batches():
        if device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = family.forward_member(x, member).float()
        finite = finite and bool(torch.isfinite(logits).all())
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    return correct / max(total, 1), finite


def diff_noise_95(p: float, q: float, n: int) -> float:
    """Half-width of the 95% interval of p - q, two accuracies measured on n images (unpaired binomial)."""
    return 1.96 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)


def interpolation(models: list[dict[str, Any]], n_test: int | None = None) -> dict[str, Any]:
    """Mark each stitch's ``interpolates`` (and, given the test-set size, ``interpolates_within_noise``);
    return the counts."""
    anchors = [m for m in models if m["kind"] == "anchor"]
    lo_a, hi_a = sorted(m["top1"] for m in anchors)
    lo_f, hi_f = sorted(m["flops"] for m in anchors)
    n = k = k_noise = 0
    for m in models:
        if m["kind"] != "stitch":
            continue
        m["acc_between"] = bool(lo_a <= m["top1"] <= hi_a)
        m["flops_between"] = bool(lo_f <= m["flops"] <= hi_f)
        m["interpolates"] = m["acc_between"] and m["flops_between"]
        if n_test:
            a = m["top1"]
            inside = lo_a - diff_noise_95(a, lo_a, n_test) <= a <= hi_a + diff_noise_95(a, hi_a, n_test)
            m["interpolates_within_noise"] = bool(inside and m["flops_between"])
            k_noise += m["interpolates_within_noise"]
        n += 1
        k += m["interpolates"]
    acc_between = sum(m.get("acc_between", False) for m in models)
    flops_between = sum(m.get("flops_between", False) for m in models)
    # FLOPs are fixed by the architectures and the cut set: flops_between_fraction is the most that can interpolate
    out = {"stitches": n, "interpolating": k, "fraction": (k / n) if n else None,
           "acc_between": acc_between, "flops_between": flops_between,
           "acc_between_fraction": acc_between / max(n, 1), "flops_between_fraction": flops_between / max(n, 1)}
    if n_test:
        out.update({"test_images": n_test, "interpolating_within_noise": k_noise,
                    "fraction_within_noise": (k_noise / n) if n else None, "anchor_band": hi_a - lo_a,
                    "anchor_band_noise_95": diff_noise_95(lo_a, hi_a, n_test)})
    return out


def evaluate(family: StitchedFamily, batches: Callable, device: str, autocast, amp: bool,
             latency: bool = True, latency_batches: tuple[int, ...] = (1, 64), latency_reps: int = 20,
             sample: int = 4, log=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One dict per member (anchors, stitches, baselines) and the check results."""
    spec = family.spec
    family.eval()
    meta = family  # FLOPs need shapes only: count on the family's own device (eval mode, no grad)
    size = spec.image_size
    rows: list[dict[str, Any]] = []
    composed = family_flops(meta, size)
    members = family.members()
    verified, mismatch = verify_flops(meta, members, composed, size, sample)
    all_finite = True
    for i, m in enumerate(members):
        acc, finite = top1(family, m, batches, autocast, device)
        all_finite = all_finite and finite
        flops = composed[m.name]
        row: dict[str, Any] = {"name": m.name, "kind": m.kind, "top1": acc, "flops": flops, "gmacs": flops / 2e9,
                               "params": family.member_params(m)}
        if m.cut is not None:
            row.update(direction=m.cut.direction, p=m.cut.p, q=m.cut.q)
        if latency:
            net = MemberNet(family, m).eval()
            modes = set()
            for b in latency_batches:
                lat = latency_ms(net, b, size, device, amp, reps=latency_reps)
                row[f"latency_b{b}_ms"] = lat["median"]
                row[f"latency_b{b}_mode"] = lat["mode"]  # graph: CUDA-graph replay (GPU time); eager: host included
                modes.add(lat["mode"])
                if "eager_median" in lat:
                    row[f"latency_b{b}_eager_ms"] = lat["eager_median"]
                if "graph_error" in lat:
                    row[f"latency_b{b}_graph_error"] = lat["graph_error"]
            row["latency_mode"] = modes.pop() if len(modes) == 1 else "mixed"  # the per-batch modes' summary
        rows.append(row)
        if (i + 1) % 20 == 0:
            log(f"evaluated {i + 1} models")
    checks = {"flops_match_reference": (mismatch is None, mismatch or f"composed flop_counter FLOPs == whole-model "
                                         f"flop_counter count == 2 x hook MACs for {verified} models"),
              "logits_finite": (all_finite, None)}
    return rows, checks


def verify_flops(meta: StitchedFamily, members: list, composed: dict[str, int], size: int,
                 sample: int) -> tuple[int, str | None]:
    """Count whole models directly (flop_counter, and MACs by hooks) for the anchors, baselines and
    ``sample`` stitches per direction (all when sample < 0); they must equal the composed counts."""
    chosen = [m for m in members if m.cut is None]
    stitches = [m for m in members if m.cut is not None]
    for d in sorted({m.cut.direction for m in stitches}):
        group = [m for m in stitches if m.cut.direction == d]
        if sample < 0 or sample >= len(group):
            chosen += group
        elif sample > 0:
            step = (len(group) - 1) / max(sample - 1, 1)
            chosen += [group[round(i * step)] for i in range(sample)]
    for m in chosen:
        direct = member_flops(meta, m, size)
        macs = conv_linear_macs(MemberNet(meta, m), torch.zeros(1, 3, size, size, device=next(meta.parameters()).device))
        if not (direct == composed[m.name] == 2 * macs):
            return len(chosen), f"{m.name}: composed {composed[m.name]}, direct {direct}, 2 x hook MACs {2 * macs}"
    return len(chosen), None


@torch.no_grad()
def amp_agreement(family: StitchedFamily, x: torch.Tensor, autocast) -> dict[str, float]:
    """bf16-autocast logits against fp32 ones (TF32 off: true fp32) over the anchors, each relative to the fp32
    logits' std: ``rms`` the worst anchor's root-mean-square difference (what the check bounds), ``max`` the
    largest single difference (an outlier statistic: 0.50 on an H200 for a family trained 2 epochs, whose logits
    barely spread)."""
    family.eval()
    worst = {"rms": 0.0, "max": 0.0}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for m in family.members(("anchor",)):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            ref = family.forward_member(x, m).float()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        with autocast():
            low = family.forward_member(x, m).float()
        std = ref.std().clamp_min(1e-6)
        d = low - ref
        worst["rms"] = max(worst["rms"], float(d.pow(2).mean().sqrt() / std))
        worst["max"] = max(worst["max"], float(d.abs().max() / std))
    return worst
