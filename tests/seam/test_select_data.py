"""Selection on synthetic results (against brute force), the Pareto front, and the data pipeline."""
from __future__ import annotations

import itertools

import pytest
import torch
import yaml

from gpulab.core.errors import InputError
from gpulab.seam import select as sel
from gpulab.seam.data import DEFAULT_CIFAR, augment, load_cifar10
from gpulab.seam.reference import lightest_meeting


def _models():
    m = [
        {"name": "r34", "kind": "anchor", "top1": 0.90, "flops": 100, "params": 21},
        {"name": "r50", "kind": "anchor", "top1": 0.93, "flops": 130, "params": 23},
        {"name": "r18", "kind": "baseline", "top1": 0.88, "flops": 60, "params": 11},
        {"name": "s1", "kind": "stitch", "top1": 0.91, "flops": 105, "params": 22, "direction": "r34>r50"},
        {"name": "s2", "kind": "stitch", "top1": 0.92, "flops": 115, "params": 22, "direction": "r34>r50"},
        {"name": "s3", "kind": "stitch", "top1": 0.89, "flops": 90, "params": 20, "direction": "r50>r34"},
        {"name": "s4", "kind": "stitch", "top1": 0.85, "flops": 140, "params": 30, "direction": "r50>r34"},
    ]
    return m


def test_selection_rows_and_lighter_flags():
    models = _models()
    rows, key = sel.select(models, [0.89, 0.905, 0.915, 0.93, 0.95], "flops")
    by = {r["accuracy"]: r for r in rows}
    assert by[0.89]["chosen"] == "s3" and by[0.89]["baseline"] == "r34" and by[0.89]["lighter"]
    assert by[0.905]["chosen"] == "s1" and by[0.905]["baseline"] == "r50" and by[0.905]["lighter"]
    assert by[0.915]["chosen"] == "s2" and by[0.915]["lighter"] and by[0.915]["saving"] == pytest.approx(1 - 115 / 130)
    assert by[0.93]["chosen"] == "r50" and by[0.93]["lighter"] is False  # only the anchor meets it
    assert by[0.95]["chosen"] is None and by[0.95]["lighter"] is None and by[0.95]["feasible"] is False
    # the sweep uses every reached accuracy; every choice equals brute force
    sweep, key = sel.select(models, [], "flops")
    assert [r["accuracy"] for r in sweep] == sorted({m["top1"] for m in models})
    for r in sweep:
        assert r["chosen"] == lightest_meeting(models, r["accuracy"], key)["name"]
    assert [r["chosen"] for r in sweep][:2] == ["r18", "r18"]  # the ResNet18 baseline wins at low accuracy


def test_pareto_front_is_the_undominated_set():
    models = _models()
    front = {m["name"] for m in sel.pareto_front(models, "flops")}
    undominated = {m["name"] for m in models
                   if not any(o["flops"] <= m["flops"] and o["top1"] >= m["top1"] and
                              (o["flops"], o["top1"]) != (m["flops"], m["top1"]) for o in models)}
    assert front == undominated == {"r18", "s3", "r34", "s1", "s2", "r50"}


def test_ties_in_cost_and_accuracy_choose_the_model_the_front_keeps():
    """Three models of equal cost and top-1 (input order not by name): the selection and the Pareto front
    break the tie alike, so the chosen model is on the front."""
    models = _models() + [
        {"name": name, "kind": "stitch", "top1": 0.95, "flops": 120, "params": 25, "direction": "r34>r50"}
        for name in ("s9", "s7", "s8")]
    front = sel.pareto_front(models, "flops")
    tied = [m["name"] for m in front if m["flops"] == 120]
    assert tied == ["s7"]
    rows, _ = sel.select(models, [0.94], "flops")
    assert rows[0]["chosen"] == "s7"
    for order in itertools.permutations(models[-3:]):
        ms = _models() + list(order)
        chosen = sel.select(ms, [0.94], "flops")[0][0]["chosen"]
        assert chosen == "s7" and chosen in {m["name"] for m in sel.pareto_front(ms, "flops")}


def test_metric_and_accuracy_validation():
    with pytest.raises(InputError, match="--metric"):
        sel.select(_models(), [], "energy")
    with pytest.raises(InputError, match="has no 'latency_b1_ms' \\(seam eval with latency"):
        sel.select(_models(), [], "latency")
    timed = [dict(m, latency_b1_ms=m["flops"] / 100, latency_b1_mode="graph") for m in _models()]
    assert sel.select(timed, [0.89], "latency")[0][0]["chosen"] == "s3"
    timed[3]["latency_b1_mode"] = "eager"  # its graph capture failed: a host-side time among GPU times
    with pytest.raises(InputError, match="timed differently \\(eager for s1, graph for r34"):
        sel.select(timed, [0.89], "latency")
    assert sel.select(timed, [0.89], "flops")[0][0]["chosen"] == "s3"  # other metrics are unaffected
    assert sel.parse_accuracies("93.5, 92") == [0.935, 0.92]
    assert sel.parse_accuracies("10,10,93.5,10") == [0.1, 0.935]  # a repeated level once (lighter_fraction)
    for bad in ("0", "101", "abc"):
        with pytest.raises(InputError):
            sel.parse_accuracies(bad)
    with pytest.raises(InputError, match=r"^--accuracy is in percent: 0.105 would be 0.105% \(for 10.5% give 10.5\)"):
        sel.parse_accuracies("0.105")  # a fraction, as the tables print top-1


def test_select_cli_on_a_synthetic_family(tmp_path):
    from gpulab.cli import invoke
    from gpulab.seam.store import EVAL_SCHEMA

    fam = tmp_path / "fam"
    fam.mkdir()
    (fam / "eval.yaml").write_text(yaml.safe_dump({"schema": EVAL_SCHEMA, "models": _models()}))
    invoke(["--out", str(tmp_path / "r"), "seam", "select", "--family", str(fam), "--accuracy", "91",
            "--metric", "params"])
    out = yaml.safe_load((fam / "select-params.yaml").read_text())
    assert out["selections"][0]["chosen"] == "s2" and out["selections"][0]["lighter"]  # ties in params: higher top1
    assert (fam / "select-params.png").read_bytes()[:4] == b"\x89PNG"
    rec = yaml.safe_load(next((tmp_path / "r").glob("seam-select-*.yaml")).read_text())
    assert rec["ok"] and rec["summary"]["lighter"] == 1
    # --family naming the eval.yaml itself: the outputs go beside it
    invoke(["--out", str(tmp_path / "r"), "seam", "select", "--family", str(fam / "eval.yaml"), "--accuracy", "91",
            "--metric", "flops"])
    assert yaml.safe_load((fam / "select-flops.yaml").read_text())["selections"][0]["chosen"] == "s1"
    assert (fam / "select-flops.png").is_file()
    bad = _models()
    bad[1]["kind"] = "stitch"  # one anchor only
    (fam / "eval.yaml").write_text(yaml.safe_dump({"schema": EVAL_SCHEMA, "models": bad}))
    with pytest.raises(InputError, match="exactly 2 anchors"):
        invoke(["--out", str(tmp_path / "r"), "seam", "select", "--family", str(fam)])
    with pytest.raises(InputError, match="not evaluated"):
        invoke(["--out", str(tmp_path / "r"), "seam", "select", "--family", str(tmp_path)])


def test_augment_matches_a_per_image_reference():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 6, 6)
    g = torch.Generator().manual_seed(3)
    out = augment(x, g, pad=2)
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 5, (5,), generator=g)
    ox = torch.randint(0, 5, (5,), generator=g)
    flip = torch.rand(5, generator=g) < 0.5
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(5):
        ref = xp[i, :, oy[i]:oy[i] + 6, ox[i]:ox[i] + 6]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    from gpulab.seam.data import TensorSource

    from .helpers import write_cifar

    data = write_cifar(tmp_path / "c", n_train=40, n_test=8)
    x, y = load_cifar10(data, "train")
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (40,)
    a, b = TensorSource(x, y, 16, 1, "cpu"), TensorSource(x, y, 16, 1, "cpu")
    for s in (5, 0, 3):
        xa, ya = a.batch(s)
        xb, yb = b.batch(s)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    seen = torch.cat([a.batch(s)[1] for s in range(2)])  # one epoch (2 steps of 16 of 40 images)
    assert seen.shape == (32,)
    with pytest.raises(InputError, match="holds 40"):
        load_cifar10(data, "train", 100)


def test_a_split_without_images_is_a_one_line_error(tmp_path):
    """An npz of zero images (a truncated export) was a RuntimeError from torch's max() of no labels."""
    import numpy as np

    from gpulab.cli import invoke

    empty = {"jpeg": np.zeros(0, np.uint8), "offsets": np.zeros(1, np.int64), "labels": np.zeros(0, np.uint8)}
    for name in ("train-0.npz", "test.npz"):
        np.savez(tmp_path / name, **empty)
    for split, name in (("train", "train-0.npz"), ("test", "test.npz")):
        with pytest.raises(InputError, match=f"{name}: no images"):
            load_cifar10(tmp_path, split)
    with pytest.raises(InputError, match="train-0.npz: no images") as e:
        invoke(["--out", str(tmp_path / "res"), "seam", "train", "--family", str(tmp_path / "fam"), "--data",
                str(tmp_path), "--width", "2"])
    assert "\n" not in str(e.value) and not (tmp_path / "fam").exists()


@pytest.mark.skipif(not (DEFAULT_CIFAR / "test.npz").is_file(), reason="shared CIFAR-10 copy not present")
def test_shared_cifar10_loads():
    x, y = load_cifar10(DEFAULT_CIFAR, "test", 16)
    assert x.shape == (16, 3, 32, 32) and int(y.max()) <= 9
    assert 20 < float(x.float().mean()) < 235


def test_interpolation_within_noise():
    """Strict interpolation vs within the test set's noise (95% interval of an accuracy difference)."""
    from gpulab.seam.evaluate import diff_noise_95, interpolation

    def models():
        return [{"name": "r34", "kind": "anchor", "top1": 0.90, "flops": 10},
                {"name": "r50", "kind": "anchor", "top1": 0.91, "flops": 20},
                {"name": "in", "kind": "stitch", "top1": 0.905, "flops": 15},
                {"name": "just-below", "kind": "stitch", "top1": 0.899, "flops": 15},
                {"name": "far-below", "kind": "stitch", "top1": 0.80, "flops": 15},
                {"name": "heavy", "kind": "stitch", "top1": 0.905, "flops": 25},
                {"name": "r18", "kind": "baseline", "top1": 0.85, "flops": 5}]

    strict = interpolation(models())
    assert (strict["stitches"], strict["interpolating"]) == (4, 1) and "fraction_within_noise" not in strict
    ms = models()
    noisy = interpolation(ms, n_test=10000)
    by = {m["name"]: m for m in ms}
    assert [by[k]["interpolates_within_noise"] for k in ("in", "just-below", "far-below", "heavy")] == \
        [True, True, False, False]
    assert noisy["interpolating_within_noise"] == 2 and noisy["fraction_within_noise"] == 0.5
    assert noisy["anchor_band"] == pytest.approx(0.01)
    assert noisy["anchor_band_noise_95"] == pytest.approx(diff_noise_95(0.90, 0.91, 10000))
    assert 0.0081 < noisy["anchor_band_noise_95"] < 0.0083  # 1.96 * sqrt((0.09 + 0.0819) / 1e4)


def test_normalize_maps_0_and_255_to_the_ends_of_the_unit_range():
    from gpulab.seam.data import CIFAR_MEAN, CIFAR_STD, normalize

    x = torch.stack([torch.zeros(3, 2, 2, dtype=torch.uint8), torch.full((3, 2, 2), 255, dtype=torch.uint8)])
    got = normalize(x)
    for c in range(3):
        assert torch.allclose(got[0, c], torch.full((2, 2), (0.0 - CIFAR_MEAN[c]) / CIFAR_STD[c]), atol=1e-6)
        assert torch.allclose(got[1, c], torch.full((2, 2), (1.0 - CIFAR_MEAN[c]) / CIFAR_STD[c]), atol=1e-6)
