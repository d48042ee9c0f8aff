"""A weight-shared supernet in the spirit of Once-for-All MobileNetV3, built in code (random weights).

Elastic depth (2-4 blocks per stage: a subnet runs the first d), width (expand ratio 3/4/6: a
subnet uses the first ``in * e`` middle channels of the largest block) and kernel size (7/5/3:
the centre k x k of the 7 x 7 depthwise kernel). Every subnet's weights are slices (views) of the
supernet's parameters, which live in one :class:`WeightArena`: subnets share storage.

Simplifications against OFA: batch norm is folded into conv biases, no squeeze-excite, and the
kernel-size transform matrices of OFA are left out (a centre crop). The arena is laid out by how
many subnets of the request stream use each block (hottest first), so a persisting window over
its prefix covers the weights that the stream reuses most.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from gpulab.core.errors import InputError
from gpulab.l2.models import Layer, Request, WeightArena
from gpulab.l2.policy import hotness_order

# (output width, stride of the first block, activation) per elastic stage (OFA MobileNetV3 w1.0).
STAGES = ((24, 2, "relu"), (40, 2, "relu"), (80, 2, "hswish"), (112, 1, "hswish"), (160, 2, "hswish"))
KERNELS = (3, 5, 7)
EXPANDS = (3, 4, 6)
DEPTHS = (2, 3, 4)
MAX_K, MAX_E, MAX_D = max(KERNELS), max(EXPANDS), max(DEPTHS)


def make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    return F.relu(x) if kind == "relu" else F.hardswish(x)


@dataclass(frozen=True)
class SubnetConfig:
    depths: tuple[int, ...]  # per stage
    kernels: tuple[tuple[int, ...], ...]  # per stage, per block (MAX_D entries; the first depth are used)
    expands: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.depths) != len(STAGES) or len(self.kernels) != len(STAGES) or len(self.expands) != len(STAGES):
            raise InputError(f"a subnet config needs {len(STAGES)} stages")
        for s, d in enumerate(self.depths):
            if d not in DEPTHS:
                raise InputError(f"stage {s}: depth {d} not in {DEPTHS}")
            if len(self.kernels[s]) != MAX_D or len(self.expands[s]) != MAX_D:
                raise InputError(f"stage {s}: kernels and expands need {MAX_D} entries")
            if any(k not in KERNELS for k in self.kernels[s]) or any(e not in EXPANDS for e in self.expands[s]):
                raise InputError(f"stage {s}: kernel sizes must be in {KERNELS} and expand ratios in {EXPANDS}")

    @property
    def label(self) -> str:
        return "d" + "".join(map(str, self.depths)) + "-" + "".join(
            f"{k}{e}" for s in range(len(STAGES)) for k, e in zip(self.kernels[s][:self.depths[s]],
                                                                 self.expands[s][:self.depths[s]]))

    @staticmethod
    def largest() -> "SubnetConfig":
        n = len(STAGES)
        return SubnetConfig((MAX_D,) * n, ((MAX_K,) * MAX_D,) * n, ((MAX_E,) * MAX_D,) * n)


def sample_subnets(count: int, seed: int = 0) -> list[SubnetConfig]:
    """A deterministic stream of ``count`` subnet configs (distinct when possible)."""
    if count < 1:
        raise InputError(f"--subnets must be >= 1, got {count}")
    rng = random.Random(seed)
    out: list[SubnetConfig] = []
    seen: set[SubnetConfig] = set()
    while len(out) < count:
        cfg = SubnetConfig(tuple(rng.choice(DEPTHS) for _ in STAGES),
                           tuple(tuple(rng.choice(KERNELS) for _ in range(MAX_D)) for _ in STAGES),
                           tuple(tuple(rng.choice(EXPANDS) for _ in range(MAX_D)) for _ in STAGES))
        if cfg not in seen or len(seen) > 10 * count:
            seen.add(cfg)
            out.append(cfg)
    return out


class OFASupernet:
    kind = "ofa"

    def __init__(self, width_mult: float, subnets: Sequence[SubnetConfig], batch: int, image: int,
                 dtype: torch.dtype, device: str, classes: int = 1000, seed: int = 0):
        if width_mult <= 0 or batch < 1 or image < 32:
            raise InputError(f"ofa needs width > 0, batch >= 1 and image >= 32, got {width_mult}, {batch}, {image}")
        if not subnets:
            raise InputError("ofa needs at least one subnet in the request stream")
        self.width_mult, self.batch, self.image, self.classes = width_mult, batch, image, classes
        self.subnets = list(subnets)
        self.stem_c = make_divisible(16 * width_mult)
        self.widths = [make_divisible(w * width_mult) for w, _, _ in STAGES]
        self.final_c = make_divisible(960 * width_mult)
        self.mix_c = make_divisible(1280 * width_mult)
        specs: dict[str, tuple[int, ...]] = {}
        fan: dict[str, int] = {}
        group: dict[str, str] = {}  # parameter -> its layer (block)

        def add(layer: str, name: str, shape: tuple[int, ...], fan_in: int | None) -> None:
            specs[name] = shape
            group[name] = layer
            if fan_in is not None:
                fan[name] = fan_in

        c = self.stem_c
        add("stem", "stem.w", (c, 3, 3, 3), 27)
        add("stem", "stem.b", (c,), None)
        add("stem", "first.dw.w", (c, 1, 3, 3), 9)
        add("stem", "first.dw.b", (c,), None)
        add("stem", "first.pw.w", (c, c, 1, 1), c)
        add("stem", "first.pw.b", (c,), None)
        self.block_names: list[list[str]] = []
        cin = c
        for s, cout in enumerate(self.widths):
            names = []
            for j in range(MAX_D):
                b_in = cin if j == 0 else cout
                mid = make_divisible(b_in * MAX_E)
                blk = f"s{s}b{j}"
                add(blk, f"{blk}.expand.w", (mid, b_in, 1, 1), b_in)
                add(blk, f"{blk}.expand.b", (mid,), None)
                add(blk, f"{blk}.dw.w", (mid, 1, MAX_K, MAX_K), MAX_K * MAX_K)
                add(blk, f"{blk}.dw.b", (mid,), None)
                add(blk, f"{blk}.project.w", (cout, mid, 1, 1), 4 * mid)  # damped: residual stacks stay finite
                add(blk, f"{blk}.project.b", (cout,), None)
                names.append(blk)
            self.block_names.append(names)
            cin = cout
        add("head", "final.w", (self.final_c, cin, 1, 1), cin)
        add("head", "final.b", (self.final_c,), None)
        add("head", "mix.w", (self.mix_c, self.final_c), self.final_c)
        add("head", "mix.b", (self.mix_c,), None)
        add("head", "fc.w", (classes, self.mix_c), self.mix_c)
        add("head", "fc.b", (classes,), None)
        self.group = group

        # How many subnets of the stream use each layer; the arena is laid out hottest first.
        layer_order = ["stem"] + [b for names in self.block_names for b in names] + ["head"]
        uses = {layer: 0 for layer in layer_order}
        for cfg in self.subnets:
            for layer in self.layers_of(cfg):
                uses[layer] += 1
        self.layer_uses = uses
        pos = {name: layer_order.index(group[name]) * 100 + i for i, name in enumerate(specs)}
        order = hotness_order({n: uses[group[n]] for n in specs}, pos)
        self.arena = WeightArena([(n, specs[n]) for n in order], dtype, device)
        self.arena.init_(seed, fan)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 3, image, image, generator=g).to(device=device, dtype=dtype)

    def layers_of(self, cfg: SubnetConfig) -> list[str]:
        return ["stem"] + [self.block_names[s][j] for s in range(len(STAGES)) for j in range(cfg.depths[s])] + ["head"]

    def _region(self, layer: str):
        return self.arena.region([n for n, g in self.group.items() if g == layer], layer)

    def subnet_weights(self, cfg: SubnetConfig) -> dict[str, torch.Tensor]:
        """The (sliced) parameter views that subnet ``cfg`` runs with: views of the arena, no copies."""
        a = self.arena
        out: dict[str, torch.Tensor] = {}
        for name in ("stem.w", "stem.b", "first.dw.w", "first.dw.b", "first.pw.w", "first.pw.b",
                     "final.w", "final.b", "mix.w", "mix.b", "fc.w", "fc.b"):
            out[name] = a[name]
        for s in range(len(STAGES)):
            for j in range(cfg.depths[s]):
                blk = self.block_names[s][j]
                k, e = cfg.kernels[s][j], cfg.expands[s][j]
                b_in = a[f"{blk}.expand.w"].shape[1]
                mid = make_divisible(b_in * e)
                lo = (MAX_K - k) // 2
                out[f"{blk}.expand.w"] = a[f"{blk}.expand.w"][:mid]
                out[f"{blk}.expand.b"] = a[f"{blk}.expand.b"][:mid]
                out[f"{blk}.dw.w"] = a[f"{blk}.dw.w"][:mid, :, lo:lo + k, lo:lo + k]
                out[f"{blk}.dw.b"] = a[f"{blk}.dw.b"][:mid]
                out[f"{blk}.project.w"] = a[f"{blk}.project.w"][:, :mid]
                out[f"{blk}.project.b"] = a[f"{blk}.project.b"]
        return out

    def subnet_layers(self, cfg: SubnetConfig) -> list[Layer]:
        w = self.subnet_weights(cfg)

        def stem(x: torch.Tensor) -> torch.Tensor:
            x = F.hardswish(F.conv2d(x, w["stem.w"], w["stem.b"], stride=2, padding=1))
            h = F.relu(F.conv2d(x, w["first.dw.w"], w["first.dw.b"], padding=1, groups=x.shape[1]))
            return x + F.conv2d(h, w["first.pw.w"], w["first.pw.b"])

        def block(blk: str, stride: int, act: str, k: int, residual: bool):
            def fn(x: torch.Tensor) -> torch.Tensor:
                h = _act(F.conv2d(x, w[f"{blk}.expand.w"], w[f"{blk}.expand.b"]), act)
                h = _act(F.conv2d(h, w[f"{blk}.dw.w"], w[f"{blk}.dw.b"], stride=stride, padding=k // 2,
                                  groups=h.shape[1]), act)
                h = F.conv2d(h, w[f"{blk}.project.w"], w[f"{blk}.project.b"])
                return x + h if residual else h
            return fn

        def head(x: torch.Tensor) -> torch.Tensor:
            x = F.hardswish(F.conv2d(x, w["final.w"], w["final.b"]))
            x = x.mean(dim=(2, 3))
            x = F.hardswish(F.linear(x, w["mix.w"], w["mix.b"]))
            return F.linear(x, w["fc.w"], w["fc.b"])

        layers = [Layer("stem", stem, self._region("stem"))]
        for s, (_, stride, act) in enumerate(STAGES):
            for j in range(cfg.depths[s]):
                blk = self.block_names[s][j]
                layers.append(Layer(blk, block(blk, stride if j == 0 else 1, act, cfg.kernels[s][j], j > 0),
                                    self._region(blk)))
        layers.append(Layer("head", head, self._region("head")))
        return layers

    def requests(self, impl: str = "torch") -> list[Request]:
        if impl != "torch":
            raise InputError(f"workload ofa runs on torch/cuDNN ops; --impl {impl} is not available for it")
        return [Request(self.x, self.subnet_layers(cfg), label=cfg.label) for cfg in self.subnets]

    def subnet_param_bytes(self, cfg: SubnetConfig) -> int:
        return sum(t.numel() * t.element_size() for t in self.subnet_weights(cfg).values())

    def describe(self) -> dict:
        return {"width_mult": self.width_mult, "image": self.image, "subnets": len(self.subnets),
                "weight_bytes": self.arena.total_bytes,
                "subnet_weight_bytes": [self.subnet_param_bytes(c) for c in self.subnets]}
