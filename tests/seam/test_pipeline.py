"""train -> eval -> select through the CLI on a synthetic CIFAR folder; resume; one-line errors."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
import yaml

from gpulab.core.errors import InputError

from .helpers import tiny_spec, write_cifar

TRAIN = ["--width", "2", "--cuts", "aligned", "--batch-size", "16", "--anchor-steps", "2", "--stitch-steps", "3",
         "--calib-images", "16", "--baselines", "resnet18"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained and evaluated family, shared by the tests below (read-only)."""
    from gpulab.cli import invoke
    from gpulab.core import options

    root = tmp_path_factory.mktemp("seam")
    data = write_cifar(root / "cifar", n_train=48, n_test=24)
    fam = root / "family"
    old = options.get().out
    out = ["--out", str(root / "results")]
    try:
        invoke([*out, "seam", "train", "--family", str(fam), "--data", str(data), *TRAIN])
        invoke([*out, "seam", "eval", "--family", str(fam), "--data", str(data), "--latency-batches", "1",
                "--latency-reps", "1", "--verify-flops", "1"])
        invoke([*out, "seam", "select", "--family", str(fam), "--metric", "flops"])
    finally:
        options.set_options(out=old)
    return root, data, fam


def test_pipeline_writes_family_eval_selection_and_records(trained):
    root, _, fam = trained
    for f in ("family.yaml", "weights.safetensors", "checkpoint.pt", "eval.yaml", "select-flops.yaml",
              "select-flops.png"):
        assert (fam / f).is_file(), f
    assert (fam / "select-flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = yaml.safe_load((fam / "eval.yaml").read_text())
    assert len(ev["models"]) == 2 + 34 + 1
    kinds = {m["kind"] for m in ev["models"]}
    assert kinds == {"anchor", "stitch", "baseline"}
    r34 = next(m for m in ev["models"] if m["name"] == "r34")
    r50 = next(m for m in ev["models"] if m["name"] == "r50")
    for m in ev["models"]:
        if m["kind"] == "stitch":
            between = min(r34["flops"], r50["flops"]) <= m["flops"] <= max(r34["flops"], r50["flops"])
            assert m["flops_between"] == between
            assert m["interpolates"] == (between and m["acc_between"])
            assert m["interpolates_within_noise"] >= m["interpolates"]  # noise only widens the band
    assert ev["interpolation"]["fraction_within_noise"] >= ev["interpolation"]["fraction"]
    # each timed batch says how it was timed (the CPU times eagerly), and the model's summary agrees
    assert all(m["latency_b1_mode"] == m["latency_mode"] == "eager" and m["latency_b1_ms"] > 0 for m in ev["models"])
    records = {p.name.split("-2")[0]: yaml.safe_load(p.read_text()) for p in (root / "results").glob("seam-*.yaml")}
    assert set(records) == {"seam-train", "seam-eval", "seam-select"}
    assert all(r["ok"] for r in records.values()), {k: r["checks"] for k, r in records.items()}
    assert records["seam-eval"]["summary"]["stitches"] == 34
    summ, ip = records["seam-eval"]["summary"], ev["interpolation"]
    assert summ["flops_between_fraction"] == ip["flops_between"] / 34 >= summ["interpolate_fraction"]
    assert summ["acc_between_fraction"] == ip["acc_between"] / 34 >= summ["interpolate_fraction"]
    assert records["seam-train"]["checks"]["lstsq_lowers_activation_mse"]["passed"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path, trained):
    from gpulab.seam import data as sdata
    from gpulab.seam.train import TrainConfig, Trainer

    _, data, _ = trained
    x, y = sdata.load_cifar10(data, "train")
    cfg = TrainConfig(spec=tiny_spec(cuts="aligned"), batch_size=8, anchor_steps=3, stitch_steps=16,
                      calib_images=8, checkpoint_every=4, amp=False)

    def run(folder, stop_at=None):
        src = sdata.TensorSource(x, y, 8, 0, "cpu")
        if stop_at is not None:
            calls = {"n": 0}
            orig = src.batch

            def batch(step):
                calls["n"] += 1
                if calls["n"] > stop_at:
                    raise KeyboardInterrupt
                return orig(step)

            src.batch = batch
        t = Trainer(cfg, folder, src, "cpu", log=lambda s: None)
        return t

    full = run(tmp_path / "a")
    full.run()
    broken = run(tmp_path / "b", stop_at=3 + 3 + 13)  # dies at stitch step 13 (checkpoint at step 12)
    with pytest.raises(KeyboardInterrupt):
        broken.run()
    resumed = run(tmp_path / "b")
    resumed.resume()
    assert resumed.step == 12 and resumed.opt_state is not None
    resumed.run()
    a, b = full.family.state_dict(), resumed.family.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    # the resumed phase reports all of its steps, as the uninterrupted one (it reported those after the resume)
    for h, g in zip(full.history, resumed.history, strict=True):
        assert h["phase"] == g["phase"] and "_partial" not in g
        for key in ("final_loss", "train_top1_sampled", "loss_finite"):
            want = h.get(key)
            assert (g.get(key) is None) if want is None else g.get(key) == pytest.approx(want, rel=1e-6), \
                (h["phase"], key, want, g.get(key))


def test_resume_with_other_settings_is_refused(tmp_path, trained, capsys):
    """Every setting that shapes training (phases, steps, learning rates, weights, calibration ...) must
    match the checkpoint's; the error names the first that differs, old and new value."""
    import dataclasses

    from gpulab.cli import main
    from gpulab.seam import data as sdata
    from gpulab.seam.train import TrainConfig, Trainer

    _, data, fam = trained
    x, y = sdata.load_cifar10(data, "train")
    spec = tiny_spec(cuts="aligned")
    cfg = TrainConfig(spec=spec, batch_size=8, anchor_steps=2, stitch_steps=2, calib_images=8, amp=False)
    folder = tmp_path / "f"
    Trainer(cfg, folder, sdata.TensorSource(x, y, 8, 0, "cpu"), "cpu", log=lambda s: None).run()
    pretrained = tmp_path / "r34.pth"
    from gpulab.seam.models import StitchedFamily

    torch.save(StitchedFamily(spec).net("resnet34").state_dict(), pretrained)

    def resume(c, n=len(x), folder=folder):
        Trainer(c, folder, sdata.TensorSource(x[:n], y[:n], 8, 0, "cpu"), "cpu", log=lambda s: None).resume()

    resume(dataclasses.replace(cfg, checkpoint_every=7))  # harmless: resumes
    cases = [({"anchor_steps": 3}, "anchor_steps 2, now 3"),
             ({"stitch_lr": 0.02}, "stitch_lr 0.01, now 0.02"),
             ({"calib_images": 9}, "calib_images 8, now 9"),
             ({"lstsq_ridge": 0.5}, "lstsq_ridge 0.01, now 0.5"),
             ({"label_smoothing": 0.1}, "label_smoothing 0.0, now 0.1"),
             ({"amp": True}, "amp False, now True"),
             ({"weights": {"resnet34": str(pretrained)}}, "weights.resnet34 None, now '"),
             ({"spec": tiny_spec(cuts="all")}, "spec.cuts 'aligned', now 'all'")]
    for change, msg in cases:
        with pytest.raises(InputError, match="was trained with " + re.escape(msg)) as e:
            resume(dataclasses.replace(cfg, **change))
        assert "\n" not in str(e.value)
    # same settings, fewer images: an epoch-based phase would have another step count
    by_epochs = dataclasses.replace(cfg, anchor_steps=None, anchor_epochs=1.0)
    Trainer(by_epochs, tmp_path / "g", sdata.TensorSource(x, y, 8, 0, "cpu"), "cpu", log=lambda s: None).save(None)
    resume(by_epochs, folder=tmp_path / "g")
    with pytest.raises(InputError, match=f"phase anchor:resnet34 has {len(x) // 8} steps, now 2"):
        resume(by_epochs, n=16, folder=tmp_path / "g")
    # through the CLI: one line, exit 1, nothing written
    copy = tmp_path / "copy"
    shutil.copytree(fam, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    argv = list(TRAIN)
    argv[argv.index("--anchor-steps") + 1] = "5"
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(copy), "--data", str(data), *argv,
              "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "anchor_steps 2, now 5" in err[0], err
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before


def test_save_family_writes_weights_and_yaml_together(tmp_path, monkeypatch):
    """A failure while writing family.yaml (disk full, say) leaves neither file new: no new weights beside an old
    family.yaml, no temporaries."""
    from pathlib import Path

    from gpulab.seam import store
    from gpulab.seam.models import StitchedFamily

    fam = StitchedFamily(tiny_spec(cuts="aligned"))
    store.save_family(tmp_path, fam, {"note": "old"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"weights.safetensors", "family.yaml"}
    with torch.no_grad():
        for p in fam.parameters():
            p.add_(1.0)

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        store.save_family(tmp_path, fam, {"note": "new"})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    store.save_family(tmp_path, fam, {"note": "new"})
    loaded, info = store.load_family(tmp_path)
    assert info["note"] == "new"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), fam.state_dict().values()))


def test_family_folder_errors_are_one_line(tmp_path, trained, capsys):
    from gpulab.cli import main
    from gpulab.seam import store

    _, data, fam = trained
    with pytest.raises(InputError, match="family folder not found"):
        store.load_family(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(fam, bad)
    (bad / "weights.safetensors").unlink()
    with pytest.raises(InputError, match="no weights.safetensors"):
        store.load_family(bad)
    (bad / "weights.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="corrupt weights"):
        store.load_family(bad)
    # a stitch's tensors missing from the weights: the error names the model
    from safetensors.torch import load_file, save_file

    sd = load_file(str(fam / "weights.safetensors"))
    key = "stitches.r50_5__r34_5.conv.weight"
    save_file({k: v for k, v in sd.items() if k != key}, str(bad / "weights.safetensors"))
    with pytest.raises(InputError, match=r"model r50\[:5\]>r34\[5:\] is missing"):
        store.load_family(bad)
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(bad / "weights.safetensors"))
    with pytest.raises(InputError, match="corrupt"):
        store.load_family(bad)
    # eval.yaml: a model without its accuracy, a malformed file
    ev = yaml.safe_load((fam / "eval.yaml").read_text())
    del ev["models"][3]["top1"]
    (bad / "eval.yaml").write_text(yaml.safe_dump(ev))
    with pytest.raises(InputError, match="is missing 'top1'"):
        store.load_eval(bad)
    (bad / "eval.yaml").write_text("models: [unclosed\n")
    with pytest.raises(InputError, match="malformed YAML"):
        store.load_eval(bad)
    # through the CLI: one line on stderr, exit 1
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "r"), "seam", "select", "--family", str(bad)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "malformed YAML" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(tmp_path / "nope"), "--data", str(data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "family folder not found" in err[0]


def test_weights_with_another_head_get_an_anchor_phase(tmp_path, trained):
    """A network loaded from weights whose head has another class count is fine-tuned (its fresh head would score
    near chance), also with --mode frozen; one whose head fits is used as loaded."""
    from gpulab.seam import data as sdata
    from gpulab.seam.models import StitchedFamily
    from gpulab.seam.train import TrainConfig, Trainer

    _, data, _ = trained
    x, y = sdata.load_cifar10(data, "train")
    spec = tiny_spec(cuts="aligned")
    other = tiny_spec(cuts="aligned", num_classes=7)
    torch.manual_seed(1)
    r34, r50 = tmp_path / "r34.pth", tmp_path / "r50-7.pth"
    torch.save(StitchedFamily(spec).net("resnet34").state_dict(), r34)
    torch.save(StitchedFamily(other).net("resnet50").state_dict(), r50)
    cfg = TrainConfig(spec=spec, batch_size=8, anchor_steps=2, stitch_steps=1, calib_images=8, amp=False,
                      mode="frozen", weights={"resnet34": str(r34), "resnet50": str(r50)})
    t = Trainer(cfg, tmp_path / "f", sdata.TensorSource(x, y, 8, 0, "cpu"), "cpu", log=lambda s: None)
    assert [p for p, _ in t.plan()] == ["anchor:resnet50", "calibrate", "stitch"]
    assert any("fc re-initialised; fine-tuned in phase anchor:resnet50" in n for n in t.notes)
    head = t.family.net("resnet50").fc.weight.detach().clone()
    body = t.family.net("resnet34").fc.weight.detach().clone()
    t.run()
    assert not torch.equal(t.family.net("resnet50").fc.weight, head)  # the new head was trained
    assert torch.equal(t.family.net("resnet34").fc.weight, body)  # frozen mode, fitting head: as loaded


def test_train_input_errors(tmp_path, trained):
    from gpulab.cli import invoke

    _, data, fam = trained
    cases = [
        (["--data", str(tmp_path / "missing")], "data folder not found"),
        (["--data", str(data), "--anchors", "resnet34"], "two architectures"),
        (["--data", str(data), "--mode", "solo"], "--mode"),
        (["--data", str(data), "--cuts", "some"], "cuts"),
        (["--data", str(data), "--batch-size", "0"], "--batch-size"),
        (["--data", str(data), "--weights", "resnet34"], "ARCH=PATH"),
        (["--data", str(data), "--weights", "resnet101=x.pth"], "neither an anchor"),
        (["--data", str(data), "--weights", "resnet34=a.pth", "--weights", "resnet34=b.pth"], "resnet34 twice"),
        (["--data", str(data), "--baselines", "resnet18,resnet18"], "baseline resnet18 is given twice"),
        (["--data", str(data), "--anchor-epochs", "nan"], "--anchor-epochs must be a finite number"),
        (["--data", str(data), "--lr", "inf"], "--lr must be a finite number"),
        (["--data", str(data), "--lstsq-ridge", "nan"], "--lstsq-ridge must be a finite number"),
        (["--data", str(data), "--weight-decay", "-1"], "--weight-decay must be >= 0"),
    ]
    for extra, msg in cases:
        with pytest.raises(InputError, match=msg):
            invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(tmp_path / "f"), "--width", "2",
                    *extra])
    with pytest.raises(InputError, match="already holds a family"):
        invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(fam), "--data", str(data), *TRAIN])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="neither CIFAR-10"):
        invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(tmp_path / "f"), "--data", str(empty)])
    (empty / "train-0.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a readable npz"):
        invoke(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(tmp_path / "f"), "--data", str(empty)])


@pytest.mark.parametrize("key,value,msg", [("baselines", 5, "baselines must be a list"),
                                           ("anchors", [[1], 2], "anchors must be a list"),
                                           ("num_classes", True, "num_classes must be a positive integer"),
                                           ("stitch_bn", 3, "stitch_bn must be true or false")])
def test_family_yaml_with_wrong_types_is_one_line(tmp_path, trained, capsys, key, value, msg):
    from gpulab.cli import main

    _, data, fam = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    info = yaml.safe_load((fam / "family.yaml").read_text())
    info["spec"][key] = value
    (bad / "family.yaml").write_text(yaml.safe_dump(info))
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(bad), "--data", str(data), "--no-latency"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and msg in err[0] and "family.yaml" in err[0], err
    assert not (bad / "eval.yaml").exists()


@pytest.mark.parametrize("content", [[1, 2], {"x": 1}])
def test_resume_from_a_foreign_checkpoint_is_one_line(tmp_path, trained, capsys, content):
    from gpulab.cli import main

    _, data, fam = trained
    folder = tmp_path / "f"
    folder.mkdir()
    torch.save(content, folder / "checkpoint.pt")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "r"), "seam", "train", "--family", str(folder), "--data", str(data), *TRAIN,
              "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "not a seam training checkpoint" in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt"]
