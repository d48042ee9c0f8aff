"""train -> eval -> select on a tiny ImageNet-style folder (imagenet stem, width 4, 32x32 crops).

The tree (``train/`` and ``val/``, three classes, PNG and JPEG files of several sizes) is written with
Pillow. The ResNet34 anchor comes from a local file in torchvision's state-dict layout (torchvision's
key names and a 1000-class head; at width 4, since torchvision's own files are width 64: a real
torchvision ResNet34 state dict is checked to be refused by a width-4 family with a one-line error).
"""
from __future__ import annotations

import pytest
import torch
import yaml

from gpulab.core.errors import InputError

from .helpers import write_image_folder

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from gpulab.cli import invoke
    from gpulab.core import options
    from gpulab.seam.models import ScaledResNet

    root = tmp_path_factory.mktemp("imagefolder")
    data = write_image_folder(root / "imgs")
    torch.manual_seed(5)
    r34 = ScaledResNet("resnet34", 4, 1000, "imagenet")
    weights = root / "resnet34-tv.pth"
    torch.save(r34.state_dict(), weights)
    fam, res = root / "family", root / "results"
    old = options.get().out
    try:
        invoke(["--out", str(res), "seam", "train", "--family", str(fam), "--data", str(data), "--width", "4",
                "--image-size", "32", "--cuts", "aligned", "--batch-size", "6", "--anchor-steps", "2",
                "--stitch-steps", "2", "--mode", "frozen", "--calib-images", "9", "--workers", "0",
                "--weights", f"resnet34={weights}"])
        invoke(["--out", str(res), "seam", "eval", "--family", str(fam), "--data", str(data), "--batch-size", "5",
                "--no-latency", "--verify-flops", "1", "--workers", "0"])
        invoke(["--out", str(res), "seam", "select", "--family", str(fam), "--metric", "params"])
    finally:
        options.set_options(out=old)
    return root, data, fam, res, r34


def test_train_eval_select_on_an_image_folder(run):
    root, data, fam, res, r34 = run
    records = {p.name.split("-2")[0]: yaml.safe_load(p.read_text()) for p in res.glob("seam-*.yaml")}
    assert set(records) == {"seam-train", "seam-eval", "seam-select"}
    assert all(r["ok"] for r in records.values()), {k: r["checks"] for k, r in records.items()}
    tr = records["seam-train"]
    spec = tr["config"]["spec"]
    assert (spec["stem"], spec["num_classes"], spec["image_size"], spec["width"]) == ("imagenet", 3, 32, 4)
    assert tr["config"]["data"] == {"format": "imagefolder", "path": str(data), "train_images": 18, "image_size": 32}
    assert yaml.safe_load((fam / "family.yaml").read_text())["data"]["classes"] == ["ant", "bee", "cat"]
    # resnet34 was loaded with a 1000-class head: its fresh 3-class head makes it fine-tuned in an anchor phase
    assert [r["phase"] for r in tr["rows"]] == ["anchor:resnet34", "anchor:resnet50", "calibrate", "stitch"]
    assert any("fc re-initialised; fine-tuned in phase anchor:resnet34" in n for n in tr["notes"])

    from gpulab.seam import store

    family, info = store.load_family(fam)
    # the loaded anchor was fine-tuned from its weights (its 1000-class head replaced by a 3-class one)
    mine = family.anchors["resnet34"].state_dict()
    assert mine["fc.weight"].shape == (3, 32)
    assert not torch.equal(mine["conv1.weight"], r34.state_dict()["conv1.weight"])
    ev = yaml.safe_load((fam / "eval.yaml").read_text())
    assert ev["test_images"] == 12 and len(ev["models"]) == 2 + 34
    for m in ev["models"]:
        assert round(m["top1"] * 12) == pytest.approx(m["top1"] * 12, abs=1e-9)  # k of 12 images
    # FLOPs at the family's 32x32 crops: the anchors' whole-model counts
    from gpulab.seam.measure import member_flops

    r50 = next(m for m in ev["models"] if m["name"] == "r50")
    assert r50["flops"] == member_flops(family.eval(), family.member("r50"), 32)
    sel = yaml.safe_load((fam / "select-params.yaml").read_text())
    assert sel["key"] == "params" and sel["selections"]
    assert (fam / "select-params.png").read_bytes()[:4] == b"\x89PNG"


def test_image_folder_subsets_and_calibration_images_are_spread_and_deterministic(run):
    from gpulab.seam.data import FolderSource

    _, data, _, _, _ = run
    val = FolderSource(data, "val", 4, 0, "cpu", train=False, workers=0, image_size=32)
    val.limit(6)
    assert len(val.ds) == 6 and len(set(val.ds.targets)) >= 2  # not just the first class's images
    assert val.ds.targets == [t for _, t in val.ds.samples] and val.ds.imgs == val.ds.samples
    tr = FolderSource(data, "train", 6, 0, "cpu", workers=0, image_size=32)
    a, b = tr.first_images(5), tr.first_images(5)
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b)  # center crops, no random augmentation
    x, y = tr.batch(0)
    assert x.shape == (6, 3, 32, 32) and y.shape == (6,)
    with pytest.raises(InputError, match="fewer than one batch"):
        FolderSource(data, "train", 19, 0, "cpu", workers=0, image_size=32)


def test_image_folder_input_errors(tmp_path, run):
    import torchvision

    from gpulab.cli import invoke

    _, data, fam, _, _ = run
    tv = tmp_path / "resnet34-torchvision.pth"
    torch.save(torchvision.models.resnet34().state_dict(), tv)  # width 64, torchvision's own module
    base = ["--out", str(tmp_path / "r"), "seam", "train", "--family", str(tmp_path / "f"), "--data", str(data),
            "--width", "4", "--image-size", "32", "--workers", "0", "--batch-size", "6"]
    with pytest.raises(InputError, match=r"'conv1.weight' has shape \(64, 3, 7, 7\), resnet34 needs \(4, 3, 7, 7\)"):
        invoke([*base, "--weights", f"resnet34={tv}"])
    with pytest.raises(InputError, match="fewer than one batch"):
        invoke([*base[:-2], "--batch-size", "64"])
    with pytest.raises(InputError, match="--image-size"):
        invoke([*base[:-6], "--image-size", "-1"])
    # a val/ with another class count than the family's
    other = tmp_path / "other"
    write_image_folder(other, n_train=1, n_val=1)
    (other / "val" / "dog").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(other / "val" / "dog" / "d.png")
    with pytest.raises(InputError, match="has 4 classes, the family 3"):
        invoke(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(fam), "--data", str(other),
                "--no-latency", "--workers", "0"])
    # a val/ with the family's class count but another class name: its labels would mean other classes
    renamed = tmp_path / "renamed"
    write_image_folder(renamed, n_train=1, n_val=1)
    (renamed / "val" / "bee").rename(renamed / "val" / "bug")
    with pytest.raises(InputError, match="class 1 is 'bug', the family was trained with 'bee'"):
        invoke(["--out", str(tmp_path / "r"), "seam", "eval", "--family", str(fam), "--data", str(renamed),
                "--no-latency", "--workers", "0"])
    assert not (tmp_path / "f").exists()
