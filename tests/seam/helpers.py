"""Small builders shared by the seam tests: tiny families, a synthetic CIFAR-10 folder, an image folder."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def tiny_spec(**kw):
    from gpulab.seam.models import FamilySpec

    base = dict(anchors=("resnet34", "resnet50"), width=2, stem="cifar", num_classes=10, cuts="all",
                stitch_bn=True, baselines=[], image_size=8)
    base.update(kw)
    return FamilySpec(**base)


def write_cifar(folder: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """A CIFAR-10-format folder (npz of JPEG bytes) with class-dependent colours, so it is learnable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    classes = np.array([f"class{i}" for i in range(10)])

    def make(n: int) -> dict:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        blobs, offsets = [], [0]
        for lab in labels:
            img = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            img[:, :, lab % 3] += np.uint8(100 + 15 * lab)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
            offsets.append(offsets[-1] + len(blobs[-1]))
        return {"jpeg": np.concatenate(blobs), "offsets": np.array(offsets, dtype=np.int64), "labels": labels,
                "classes": classes}

    np.savez(folder / "train-0.npz", **make(n_train))
    np.savez(folder / "test.npz", **make(n_test))
    return folder


IMAGE_CLASSES = ("ant", "bee", "cat")
_COLORS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def write_image_folder(root: Path, n_train: int = 6, n_val: int = 4, seed: int = 0) -> Path:
    """An ImageNet-style tree (train/ and val/ of three class folders; PNG and JPEG files of 30-47 px
    sides) with class-dependent colours."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, color in zip(IMAGE_CLASSES, _COLORS):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(30, 48)), int(rng.integers(30, 48))
                img = (rng.integers(0, 50, (h, w, 3)) + np.array(color)).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{name}{i}.{'png' if i % 2 else 'jpg'}")
    return root
