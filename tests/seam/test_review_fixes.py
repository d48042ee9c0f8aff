"""Inputs a review found accepted: partial or corrupt evaluations, resumes on other data, untrained phases, paths
that fail only after the training, and selections left describing an older evaluation."""
from __future__ import annotations

import math
import shutil

import pytest
import yaml

from gpulab.core.errors import InputError
from gpulab.seam import store
from gpulab.seam.train import TrainConfig, phase_steps

from .helpers import tiny_spec
from .test_pipeline import TRAIN, trained  # noqa: F401 - trained is a module fixture


def _copy(fam, tmp_path):
    d = tmp_path / "fam"
    shutil.copytree(fam, d)
    return d


def _edit_eval(d, fn):
    ev = yaml.safe_load((d / "eval.yaml").read_text())
    fn(ev["models"])
    (d / "eval.yaml").write_text(yaml.safe_dump(ev))


def test_an_evaluation_missing_models_of_its_family_is_refused(trained, tmp_path):
    d = _copy(trained[2], tmp_path)
    _edit_eval(d, lambda ms: ms.__setitem__(slice(None), [m for m in ms if m["kind"] != "baseline"]))
    with pytest.raises(InputError, match="of the family's models are not in it \\(e.g. r18\\)"):
        store.load_eval(d)


@pytest.mark.parametrize("field, value", [("latency_b1_ms", float("nan")), ("latency_b1_ms", -5.0),
                                          ("flops", float("inf"))])
def test_latencies_and_flops_must_be_finite_and_non_negative(trained, tmp_path, field, value):
    d = _copy(trained[2], tmp_path)
    _edit_eval(d, lambda ms: ms[0].__setitem__(field, value))
    with pytest.raises(InputError, match=f"'{field}' must be a finite non-negative number"):
        store.load_eval(d)


def test_weights_of_another_dtype_are_refused(trained, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    d = _copy(trained[2], tmp_path)
    sd = load_file(str(d / "weights.safetensors"))
    k = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() == 2)
    sd[k] = sd[k].to(torch.int32)
    save_file(sd, str(d / "weights.safetensors"))
    with pytest.raises(InputError, match=f"'{k}' is torch.int32"):
        store.load_family(d)


def test_positive_epochs_give_at_least_one_step():
    cfg = TrainConfig(spec=tiny_spec(), batch_size=16, anchor_epochs=0.1, stitch_epochs=0.1)
    assert phase_steps(cfg, "anchor:resnet34", 4) == 1 and phase_steps(cfg, "stitch", 4) == 1
    cfg = TrainConfig(spec=tiny_spec(), batch_size=16, anchor_epochs=0.0, stitch_epochs=2.0)
    assert phase_steps(cfg, "anchor:resnet34", 4) == 0 and phase_steps(cfg, "stitch", 4) == 8


def test_train_paths_and_data_are_checked_before_training(trained, tmp_path):
    from gpulab.cli import invoke

    _, data, _ = trained
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(InputError, match="--out .*afile"):
        invoke(["--out", str(blocker / "out"), "seam", "train", "--family", str(tmp_path / "f"), "--data", str(data),
                *TRAIN])
    with pytest.raises(InputError, match="--family .*afile: not a folder"):
        invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(blocker), "--data", str(data), *TRAIN])
    with pytest.raises(InputError, match="--family .*afile/sub: .*afile is not a folder"):  # not a NotADirectoryError
        invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(blocker / "sub"), "--data", str(data),
                *TRAIN])
    big = [*TRAIN[:TRAIN.index("--batch-size")], "--batch-size", "64", *TRAIN[TRAIN.index("--batch-size") + 2:]]
    with pytest.raises(InputError, match="48 training images, fewer than one batch \\(--batch-size 64\\)"):
        invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(tmp_path / "f"), "--data", str(data),
                *big])


def test_resume_on_other_data_is_refused(trained, tmp_path):
    from gpulab.cli import invoke

    _, data, fam = trained
    d = _copy(fam, tmp_path)
    common = ["--out", str(tmp_path / "r"), "seam", "train", "--family", str(d), "--resume", *TRAIN]
    with pytest.raises(InputError, match="was trained on data with train_images 48, now 32"):
        invoke([*common, "--data", str(data), "--train-images", "32"])


def test_a_checkpoint_pointing_past_its_plan_is_refused(trained, tmp_path):
    import torch

    from gpulab.cli import invoke

    _, data, fam = trained
    d = _copy(fam, tmp_path)
    ck = torch.load(str(d / "checkpoint.pt"), weights_only=False)
    ck["phase_index"] = 99
    torch.save(ck, str(d / "checkpoint.pt"))
    with pytest.raises(InputError, match="phase 99, step .* is not a point of this training"):
        invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(d), "--resume", "--data", str(data),
                *TRAIN])


def test_a_new_evaluation_removes_the_old_selections(trained, tmp_path):
    d = _copy(trained[2], tmp_path)
    assert list(d.glob("select-*"))
    store.save_eval(d, yaml.safe_load((d / "eval.yaml").read_text()))
    assert not list(d.glob("select-*")) and math.isfinite(len(store.load_eval(d)["models"]))


def test_a_failed_eval_or_select_leaves_the_family_folder_as_it_was(trained, tmp_path, monkeypatch):
    """The record is written first: when it cannot be (an unwritable --out, a full disk), eval.yaml and the
    selections made from it stay as they were (eval removed the selections before its record failed)."""
    from gpulab.cli import invoke
    from gpulab.core import results
    from gpulab.core.errors import InputError as Refused

    root, data, fam = trained
    d = _copy(fam, tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.name.startswith(("eval", "select-"))}
    assert {"eval.yaml", "select-flops.yaml", "select-flops.png"} <= set(before)

    def refuse(self, out=None):
        raise Refused("--out x: cannot write result files there (OSError: No space left on device)")

    monkeypatch.setattr(results.Record, "save", refuse)
    out = ["--out", str(tmp_path / "res")]
    with pytest.raises(Refused, match="No space left"):
        invoke([*out, "seam", "eval", "--family", str(d), "--data", str(data), "--no-latency"])
    with pytest.raises(Refused, match="No space left"):
        invoke([*out, "seam", "select", "--family", str(d), "--metric", "params"])
    after = {p.name: p.read_bytes() for p in d.iterdir() if p.name.startswith(("eval", "select-"))}
    assert after == before


def test_an_unwritable_family_folder_is_refused_before_the_work(trained, tmp_path, monkeypatch):
    import os

    from gpulab.cli import invoke

    root, data, fam = trained
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: not (str(p) == str(fam) and mode & os.W_OK) and real(p, mode, **k))
    monkeypatch.setattr(store, "load_family", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(InputError, match="cannot write in the family folder"):
        invoke(["--out", str(tmp_path / "res"), "seam", "eval", "--family", str(fam), "--data", str(data)])
    with pytest.raises(InputError, match="cannot write in the family folder"):
        invoke(["--out", str(tmp_path / "res"), "seam", "select", "--family", str(fam)])


def test_warmup_starts_above_zero_and_reaches_base_at_its_end():
    from gpulab.seam.train import lr_at

    base, warm = 0.1, 5
    assert lr_at(0, 100, base, warm) == pytest.approx(base / warm)  # no wasted zero-lr first step
    assert [lr_at(s, 100, base, warm) for s in range(warm)] == pytest.approx([base * (s + 1) / warm for s in range(warm)])
    assert lr_at(warm, 100, base, warm) == pytest.approx(base)
    assert lr_at(100, 100, base, warm) == pytest.approx(0.0)


def test_weight_decay_skips_biases_and_norm_weights():
    import torch

    from gpulab.seam.train import make_sgd

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(1, 3, 5, 5))
    opt = make_sgd(list(net.parameters()), lr=0.1, wd=5e-4)
    decayed = {id(p) for grp in opt.param_groups if grp["weight_decay"] > 0 for p in grp["params"]}
    for name, p in net.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name


def test_eval_on_data_of_another_kind_than_the_training_is_refused(trained, tmp_path):
    """A CIFAR-trained family scored on an image folder (ImageNet normalization, folder labels) gave a meaningless
    top-1 without a word."""
    from gpulab.cli import invoke

    from .helpers import write_image_folder

    folder = write_image_folder(tmp_path / "imgs")
    with pytest.raises(InputError, match="imagefolder data, the family was trained on cifar10 data"):
        invoke(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(trained[2]), "--data", str(folder),
                "--no-latency", "--workers", "0"])


def test_more_images_than_an_image_folder_holds_is_refused(tmp_path):
    from gpulab.seam.data import FolderSource

    from .helpers import write_image_folder

    src = FolderSource(write_image_folder(tmp_path / "imgs"), "val", 2, 0, "cpu", train=False, workers=0,
                       image_size=32)
    with pytest.raises(InputError, match=f"asked for 1000 images, the folder holds {len(src.ds)}"):
        src.limit(1000)


def test_resuming_a_finished_family_changes_nothing(trained, tmp_path, capsys):
    """--resume of a complete training wrote a new record and deleted eval.yaml and the selections."""
    from gpulab.cli import invoke

    root, data, fam = trained
    d = _copy(fam, tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    out = tmp_path / "r"
    invoke(["--out", str(out), "seam", "train", "--family", str(d), "--data", str(data), "--resume", *TRAIN,
            "--checkpoint-every", "7"])  # a setting a resume may change
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before and not out.exists()
    assert "the training is complete; nothing to resume" in capsys.readouterr().err


def test_select_without_a_plot_removes_the_earlier_plot(trained, tmp_path):
    from gpulab.cli import invoke

    d = _copy(trained[2], tmp_path)
    assert (d / "select-flops.png").is_file()
    invoke(["--out", str(tmp_path / "r"), "seam", "select", "--family", str(d), "--metric", "flops", "--no-plot"])
    assert (d / "select-flops.yaml").is_file() and not (d / "select-flops.png").exists()


def test_eval_on_a_gpu_puts_the_family_in_channels_last(trained, tmp_path, monkeypatch):
    """The inputs are channels_last on a GPU: the family must be too (an NCHW family reformats its weights in every
    convolution, and the latencies change). Checked without a GPU: the device and the family are stand-ins."""
    import torch

    from gpulab.cli import invoke
    from gpulab.core import options
    from gpulab.seam import data as sdata

    root, data, fam = trained
    info = store.load_family(fam, "cpu")[1]
    calls = []

    real = store.load_family(fam, "cpu")[0]

    class Family:
        spec = real.spec

        def to(self, **kw):
            calls.append(kw)

    class Stop(Exception):
        pass

    monkeypatch.setattr(options, "resolve_device", lambda **k: "cuda")
    monkeypatch.setattr(store, "load_family", lambda *a, **k: (Family(), info))
    monkeypatch.setattr(sdata, "load_cifar10", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        invoke(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(fam), "--data", str(data)])
    assert calls == [{"memory_format": torch.channels_last}]


def test_resume_writes_a_finished_training_the_family_does_not_hold_yet(trained, tmp_path, monkeypatch):
    """Killed after its last checkpoint but before the family was written, a training leaves the older family in
    the folder: --resume writes the new one (it took the older family for the finished training)."""
    from gpulab.cli import invoke

    root, data, fam = trained
    d = _copy(fam, tmp_path)
    common = ["--out", str(tmp_path / "r"), "seam", "train", "--family", str(d), "--data", str(data), *TRAIN,
              "--seed", "7"]
    real = store.save_family

    def lost(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(store, "save_family", lost)
    with pytest.raises(OSError, match="No space left"):
        invoke([*common, "--overwrite"])
    monkeypatch.setattr(store, "save_family", real)
    assert yaml.safe_load((d / "family.yaml").read_text())["train"]["seed"] != 7
    invoke([*common, "--resume"])
    assert yaml.safe_load((d / "family.yaml").read_text())["train"]["seed"] == 7


@pytest.mark.parametrize("option", [["--latency-batches", "4"], ["--latency-reps", "3"]])
def test_latency_options_without_latency_are_refused(tmp_path, monkeypatch, option):
    """--no-latency measures no latency: a batch size or repetition count given with it was silently ignored."""
    from gpulab.cli import invoke

    monkeypatch.setattr(store, "load_family", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(InputError, match=f"^{option[0]} applies only to --latency$"):
        invoke(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(tmp_path / "f"), "--no-latency",
                *option])


def test_verify_flops_below_minus_one_is_refused(tmp_path, monkeypatch):
    """The help documents -1 (all); -2 was taken for all as well."""
    from gpulab.cli import invoke

    monkeypatch.setattr(store, "load_family", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(InputError, match="--verify-flops must be >= -1 \\(-1: all\\), got -2"):
        invoke(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(tmp_path / "f"), "--verify-flops",
                "-2"])


def test_negative_workers_are_refused_with_cifar_too(tmp_path, monkeypatch):
    """Only the image folders refused --workers -1; with CIFAR-10 (no loader workers) it passed unnoticed."""
    from gpulab.cli import invoke
    from gpulab.seam import train as strain

    from .helpers import write_cifar

    data = write_cifar(tmp_path / "cifar", n_train=16, n_test=8)
    monkeypatch.setattr(strain.Trainer, "__init__", lambda *a, **k: pytest.fail("trained before the check"))
    monkeypatch.setattr(store, "load_family", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(InputError, match="--workers must be >= 0, got -1"):
        invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(tmp_path / "f"), "--data", str(data),
                *TRAIN, "--workers", "-1"])
    with pytest.raises(InputError, match="--workers must be >= 0, got -1"):
        invoke(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(tmp_path / "f"), "--data", str(data),
                "--workers", "-1"])


@pytest.mark.parametrize("workers", ["0", "4"])
def test_workers_with_cifar_are_refused(tmp_path, monkeypatch, workers):
    """CIFAR-10 is held in memory and batched without a data loader: --workers (its help: for image folders) was
    accepted and ignored."""
    from gpulab.cli import invoke
    from gpulab.seam import train as strain

    from .helpers import write_cifar

    data = write_cifar(tmp_path / "cifar", n_train=16, n_test=8)
    monkeypatch.setattr(strain.Trainer, "__init__", lambda *a, **k: pytest.fail("trained before the check"))
    monkeypatch.setattr(store, "load_family", lambda *a, **k: (None, {}))  # the family's data: the --data given
    import gpulab.seam.evaluate as sevaluate

    monkeypatch.setattr(sevaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(InputError, match="^--workers applies only to image folders"):
        invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(tmp_path / "f"), "--data", str(data),
                *TRAIN, "--workers", workers])
    with pytest.raises(InputError, match="^--workers applies only to image folders"):
        invoke(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(tmp_path / "f"), "--data", str(data),
                "--workers", workers])
