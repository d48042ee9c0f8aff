"""Data: CIFAR-10 from the shared npz files (JPEG bytes) and ImageNet-style folders.

CIFAR-10 is decoded once into a uint8 tensor and kept on the training device; batches are
normalised and augmented there (random 32x32 crop of the 4-pixel reflect-padded image, horizontal
flip). Every batch is a pure function of (seed, step): the epoch's permutation comes from
``seed + epoch`` and the augmentation from ``seed, step``, so a resumed run sees the same batches.
ImageNet-style folders (``train/`` and ``val/`` of class sub-folders) go through torchvision's
ImageFolder with the usual transforms and a sampler that can start mid-epoch.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from gpulab.core.errors import InputError
from gpulab.core.paths import data_hint, shared_data

DEFAULT_CIFAR = shared_data("cifar10")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_TRAIN_FILES = [f"train-{i}.npz" for i in range(5)]


def resolve_data(path: Path | str | None) -> tuple[Path, str]:
    """The data folder and its format: ``cifar10`` (npz files) or ``imagefolder`` (train/ and val/)."""
    p = Path(path) if path else DEFAULT_CIFAR
    if not p.is_dir():
        raise InputError(f"data folder not found: {p}{data_hint(p)}")
    if (p / "test.npz").is_file() or (p / "train-0.npz").is_file():
        return p, "cifar10"
    if (p / "train").is_dir() and (p / "val").is_dir():
        return p, "imagefolder"
    raise InputError(f"{p}: neither CIFAR-10 npz files (train-0.npz, test.npz) nor train/ and val/ folders")


def _read_npz(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    if not path.is_file():
        raise InputError(f"CIFAR-10 file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            jpeg, offsets, labels = z["jpeg"], z["offsets"], z["labels"]
    except KeyError as e:
        raise InputError(f"{path}: missing array {e}") from None
    except Exception as e:
        raise InputError(f"{path}: not a readable npz file ({type(e).__name__})") from None
    n = len(labels) if limit is None else min(limit, len(labels))
    if len(offsets) != len(labels) + 1:
        raise InputError(f"{path}: 'offsets' has {len(offsets)} entries, expected {len(labels) + 1}")
    if len(labels) == 0:  # else torch's max() of no labels fails below, naming nothing
        raise InputError(f"{path}: no images")
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        try:
            img = Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
        except Exception:
            raise InputError(f"{path}: image {i} is not a decodable JPEG") from None
        if img.size != (32, 32):
            raise InputError(f"{path}: image {i} is {img.size[0]}x{img.size[1]}, expected 32x32")
        images[i] = np.asarray(img)
    return images, labels[:n].astype(np.int64)


def load_cifar10(folder: Path, split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, 32, 32) and int64 labels; ``n`` limits the count (first n of the split)."""
    if n is not None and n < 1:
        raise InputError(f"image count must be >= 1, got {n}")
    if split == "train":  # train-0.npz is required; train-1..4 are used when present
        files = [f for f in CIFAR_TRAIN_FILES if f == CIFAR_TRAIN_FILES[0] or (folder / f).is_file()]
    else:
        files = ["test.npz"]
    xs, ys, left = [], [], n
    for f in files:
        if left is not None and left <= 0:
            break
        x, y = _read_npz(folder / f, left)
        xs.append(x)
        ys.append(y)
        left = None if left is None else left - len(y)
    if n is not None and left is not None and left > 0:
        raise InputError(f"{folder}: asked for {n} {split} images, the folder holds {n - left}")
    x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.concatenate(ys))
    if int(y.max()) > 9 or int(y.min()) < 0:
        raise InputError(f"{folder}: labels outside 0..9")
    return x, y


def normalize(x_uint8: torch.Tensor, mean=CIFAR_MEAN, std=CIFAR_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x_uint8.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x_uint8.device).view(1, 3, 1, 1)
    return (x_uint8.float() / 255.0 - m) / s


def augment_draws(n: int, gen: torch.Generator, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random crop offsets (y, x) and flips of ``n`` images, drawn on the CPU from ``gen``."""
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    return oy, ox, flip


def augment(x: torch.Tensor, gen: torch.Generator | None, pad: int = 4,
            draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Random crop of the reflect-padded batch and horizontal flip (on x's device).

    ``draws`` (from :func:`augment_draws`) replaces drawing from ``gen``: under DDP every rank draws
    for the whole global batch and keeps its own share, so the global batch is augmented exactly as
    in a single-process run.
    """
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy, ox, flip = draws if draws is not None else augment_draws(n, gen, pad)
    oy, ox, flip = oy.to(x.device), ox.to(x.device), flip.to(x.device)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (oy[:, None] + ar_h[None, :])  # (n, h)
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - ar_w[None, :], ar_w[None, :])  # (n, w)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


class TensorSource:
    """Batches of an in-memory uint8 data set; batch ``step`` is a function of (seed, step)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, device: str,
                 train: bool = True, rank: int = 0, world: int = 1) -> None:
        if batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {batch_size}")
        self.x, self.y = x.to(device), y.to(device)
        self.bs, self.seed, self.device, self.train = batch_size, seed, device, train
        self.rank, self.world = rank, world
        self.steps_per_epoch = max(1, x.shape[0] // batch_size)
        self._perm_epoch, self._perm = -1, None

    def reseed(self, seed: int) -> None:
        self.seed, self._perm_epoch, self._perm = seed, -1, None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.x.shape[0], generator=g).to(self.device)
            self._perm_epoch = epoch
        idx = self._perm[k * self.bs:(k + 1) * self.bs]
        if idx.numel() < self.bs:  # fewer images than one batch: wrap around
            idx = self._perm[torch.arange(k * self.bs, (k + 1) * self.bs, device=self.device) % self._perm.numel()]
        # the global batch's augmentation is drawn whole (same seed on every rank), then sharded with it
        draws = augment_draws(idx.numel(), torch.Generator().manual_seed(self.seed * 7_919 + step * 31)) \
            if self.train else None
        share = slice(self.rank, None, self.world)
        idx = idx[share]
        x = normalize(self.x[idx])
        if draws is not None:
            x = augment(x, None, draws=tuple(d[share] for d in draws))
        return x, self.y[idx]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.x.shape[0], batch_size):
            yield normalize(self.x[i:i + batch_size]), self.y[i:i + batch_size]

    def first_images(self, n: int) -> torch.Tensor:
        return normalize(self.x[:n])


class _OffsetSampler(torch.utils.data.Sampler):
    def __init__(self, n: int, seed: int, epoch: int, start: int, rank: int, world: int) -> None:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.idx = torch.randperm(n, generator=g)[start:].tolist()[rank::world]

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


class FolderSource:
    """ImageNet-style folders through torchvision's ImageFolder (``image_size`` crops, 224 for ImageNet).

    Training batches use RandomResizedCrop + flip, drawn in the loader workers: unlike the CIFAR
    path they are not a pure function of (seed, step). Calibration images and evaluation use the
    deterministic Resize + CenterCrop transform.
    """

    def __init__(self, root: Path, split: str, batch_size: int, seed: int, device: str, train: bool = True,
                 workers: int = 8, rank: int = 0, world: int = 1, image_size: int = 224) -> None:
        from torchvision import datasets, transforms

        if batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {batch_size}")
        if image_size < 1:
            raise InputError(f"--image-size must be >= 1, got {image_size}")
        if workers < 0:
            raise InputError(f"--workers must be >= 0, got {workers}")
        norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.eval_tf = transforms.Compose([transforms.Resize(int(image_size * 256 / 224)),
                                           transforms.CenterCrop(image_size), transforms.ToTensor(), norm])
        if train:
            tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), norm])
        else:
            tf = self.eval_tf
        try:
            self.ds = datasets.ImageFolder(str(root / split), transform=tf)
        except (FileNotFoundError, OSError) as e:
            raise InputError(f"{root / split}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if train and len(self.ds) < batch_size:
            raise InputError(f"{root / split}: {len(self.ds)} images, fewer than one batch (--batch-size {batch_size})")
        self.bs, self.seed, self.device, self.train = batch_size, seed, device, train
        self.workers, self.rank, self.world = workers, rank, world
        self.steps_per_epoch = max(1, len(self.ds) // batch_size)
        self._it, self._next_step = None, -1
        self.x = None

    def limit(self, n: int) -> None:
        """Keep ``n`` images spread over the whole split (ImageFolder lists them class by class, so the
        first ``n`` would cover only the first classes): a fixed-seed subset, in folder order."""
        if n > len(self.ds):  # as load_cifar10: the count asked for is not there
            raise InputError(f"{self.ds.root}: asked for {n} images, the folder holds {len(self.ds)}")
        if 0 < n < len(self.ds):
            keep = sorted(torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(0))[:n].tolist())
            self.ds.samples = [self.ds.samples[i] for i in keep]
            self.ds.imgs = self.ds.samples
            self.ds.targets = [t for _, t in self.ds.samples]
        if self.train and len(self.ds) < self.bs:
            raise InputError(f"{len(self.ds)} training images, fewer than one batch (--batch-size {self.bs})")
        self.steps_per_epoch = max(1, len(self.ds) // self.bs)

    def reseed(self, seed: int) -> None:
        self.seed, self._it, self._next_step = seed, None, -1

    def _loader(self, epoch: int, start_batch: int):
        sampler = _OffsetSampler(len(self.ds), self.seed, epoch, start_batch * self.bs, self.rank, self.world)
        return iter(torch.utils.data.DataLoader(self.ds, batch_size=self.bs // self.world, sampler=sampler,
                                                num_workers=self.workers, pin_memory=self.device != "cpu",
                                                drop_last=True, persistent_workers=False))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._it is None or step != self._next_step or k == 0:
            self._it = self._loader(epoch, k)
        x, y = next(self._it)
        self._next_step = step + 1
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def eval_batches(self, batch_size: int):
        loader = torch.utils.data.DataLoader(self.ds, batch_size=batch_size, shuffle=False, num_workers=self.workers)
        for x, y in loader:
            yield x.to(self.device), y.to(self.device)

    def first_images(self, n: int) -> torch.Tensor:
        """The first ``n`` images of a fixed-seed spread over the split, center-cropped (deterministic)."""
        order = torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
        images = []
        for i in order:
            path, _ = self.ds.samples[i]
            images.append(self.eval_tf(self.ds.loader(path)))
        return torch.stack(images).to(self.device)
