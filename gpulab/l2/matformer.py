"""A weight-shared MatFormer-style supernet: nested FFN blocks whose subnets share the hidden units' prefixes.

MatFormer (and Gemma 3n after it) trains one transformer whose every FFN is nested: a subnet of granularity g
uses the first ``hidden * g`` hidden units (g in 1/8, 1/4, 1/2, 1: S, M, L, XL), and Mix'n'Match picks a
granularity per layer, so one set of weights serves many model sizes. At decode (a few tokens a step) each FFN is
a matrix-vector product: the time is the weight reads, and a stream of requests for different subnets rereads
the shared prefixes of every layer. That is the weight-shared case the L2 policies are for.

Built in code with random weights: ``layers`` blocks ``x + W_down relu(W_up x + b_up) + b_down`` of model width
``width`` and hidden width ``4 * width`` (attention and norms left out: the FFN weights are two thirds of such a
model's). Each layer's hidden units are split into four bands at the granularity boundaries (widths h/8, h/8, h/4,
h/2); a band's rows of W_up and of W_down (stored transposed, [hidden, width], so a band is contiguous) are
parameters of their own in one :class:`WeightArena`, laid out by how many subnets of the request stream use them
(hottest first: the first band of every layer, used by all, then the second ...). A persisting window over the
arena's prefix thus holds what the stream shares most, not the first layers whole.

One request runs as a list of :class:`Layer` steps, each one band's product on the hand-written Triton kernels:
the up-projections write their columns of the layer's hidden buffer, the first down band adds the residual and
the bias, the later ones add into the same output (each step's weights are one contiguous prefetch range).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from gpulab.core.errors import InputError
from gpulab.l2.models import Layer, Request, WeightArena, _impl
from gpulab.l2.policy import hotness_order

FFN_MULT = 4
GRANULARITIES = ("S", "M", "L", "XL")  # the first 1/8, 1/4, 1/2 and all of the hidden units
BAND_EIGHTHS = (1, 1, 2, 4)  # each band's share of the hidden units, in eighths


def band_bounds(hidden: int) -> list[tuple[int, int]]:
    """[lo, hi) of each band's hidden units; band j holds what granularity j adds to granularity j - 1."""
    if hidden % 8:
        raise InputError(f"matformer: the hidden width ({hidden}) must be a multiple of 8")
    out, lo = [], 0
    for e in BAND_EIGHTHS:
        out.append((lo, lo + hidden * e // 8))
        lo += hidden * e // 8
    return out


@dataclass(frozen=True)
class MatConfig:
    """A Mix'n'Match subnet: a granularity index (0 = S .. 3 = XL) per layer."""

    granularity: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.granularity or any(g not in range(len(GRANULARITIES)) for g in self.granularity):
            raise InputError(f"a matformer subnet needs a granularity in 0..{len(GRANULARITIES) - 1} per layer, "
                             f"got {self.granularity}")

    @property
    def label(self) -> str:
        return "-".join(GRANULARITIES[g] for g in self.granularity)

    @staticmethod
    def largest(layers: int) -> "MatConfig":
        return MatConfig((len(GRANULARITIES) - 1,) * layers)


def sample_configs(count: int, layers: int, seed: int = 0) -> list[MatConfig]:
    """A deterministic stream of ``count`` Mix'n'Match subnets, each layer's granularity drawn uniformly."""
    if count < 0 or layers < 1:
        raise InputError(f"sample_configs needs count >= 0 and layers >= 1, got {count}, {layers}")
    rng = random.Random(seed)
    return [MatConfig(tuple(rng.randrange(len(GRANULARITIES)) for _ in range(layers))) for _ in range(count)]


class MatFormerSupernet:
    kind = "matformer"

    def __init__(self, width: int, layers: int, subnets: Sequence[MatConfig], batch: int, dtype: torch.dtype,
                 device: str, seed: int = 0):
        if width < 2 or width % 2 or layers < 1 or batch < 1:
            raise InputError(f"matformer needs an even width (its hidden width {FFN_MULT} x width splits into "
                             f"eighths), layers >= 1 and batch >= 1, got {width}, {layers}, {batch}")
        if not subnets:
            raise InputError("matformer needs at least one subnet in the request stream")
        if any(len(c.granularity) != layers for c in subnets):
            raise InputError(f"every matformer subnet needs a granularity for each of the {layers} layers")
        self.width, self.n_layers, self.batch, self.device = width, layers, batch, device
        self.hidden = FFN_MULT * width
        self.bands = band_bounds(self.hidden)
        self.subnets = list(subnets)
        specs: dict[str, tuple[int, ...]] = {}
        fan: dict[str, int] = {}
        uses: dict[str, int] = {}
        pos: dict[str, int] = {}
        for i in range(layers):
            for j, (lo, hi) in enumerate(self.bands):
                # band j of layer i serves every subnet whose granularity there is j or larger
                n = sum(c.granularity[i] >= j for c in self.subnets)
                names = [(f"l{i}.up{j}.w", (hi - lo, width), width), (f"l{i}.up{j}.b", (hi - lo,), None),
                         (f"l{i}.down{j}.w", (hi - lo, width), 4 * self.hidden)]  # damped: residual stacks stay finite
                if j == 0:
                    names.append((f"l{i}.down.b", (width,), None))  # with the first band: every subnet adds it
                for name, shape, f in names:
                    specs[name] = shape
                    uses[name] = n
                    pos[name] = len(pos)
                    if f is not None:
                        fan[name] = f
        self.param_uses = uses
        self.arena = WeightArena([(n, specs[n]) for n in hotness_order(uses, pos)], dtype, device)
        self.arena.init_(seed, fan)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, width, generator=g).to(device=device, dtype=dtype)

    def _step_names(self, i: int, j: int, kind: str) -> list[str]:
        if kind == "up":
            return [f"l{i}.up{j}.w", f"l{i}.up{j}.b"]
        return [f"l{i}.down{j}.w"] + ([f"l{i}.down.b"] if j == 0 else [])

    def subnet_layers(self, cfg: MatConfig, impl: str) -> list[Layer]:
        """One request's steps: per layer, the up band products then the down band products of its granularity.
        Each layer has its own hidden and output buffers (allocated here, once: a CUDA graph replays into them)."""
        return self._subnet_steps(cfg, impl)[0]

    def _subnet_steps(self, cfg: MatConfig, impl: str) -> tuple[list[Layer], list[torch.Tensor]]:
        """:meth:`subnet_layers`, and the buffers that its steps write."""
        k, a = _impl(impl), self.arena

        def up(w, b, h):  # h = relu(x @ w.T + b), columns of the hidden buffer; the layer input passes on
            def fn(x):
                k.linear(x, w, b, relu=True, out=h)
                return x
            return fn

        def down(wt, h, out, b, first):  # out = x + b + h @ wt.T (first band), else out += h @ wt.T
            def fn(x):
                return k.linear(h, wt, b, out=out, add=x if first else out)
            return fn

        steps: list[Layer] = []
        buffers: list[torch.Tensor] = []
        for i, g in enumerate(cfg.granularity):
            used = self.bands[:g + 1]
            hid = torch.empty(self.batch, used[-1][1], device=self.device, dtype=a.dtype)
            out = torch.empty(self.batch, self.width, device=self.device, dtype=a.dtype)
            buffers += [hid, out]
            for j, (lo, hi) in enumerate(used):
                steps.append(Layer(f"l{i}.up{j}", up(a[f"l{i}.up{j}.w"], a[f"l{i}.up{j}.b"], hid[:, lo:hi]),
                                   a.region(self._step_names(i, j, "up"), f"l{i}.up{j}")))
            for j, (lo, hi) in enumerate(used):
                # W_down's band is stored [band, width]: its transpose [width, band] is linear's [N, K] weight
                fn = down(a[f"l{i}.down{j}.w"].t(), hid[:, lo:hi], out, a[f"l{i}.down.b"] if j == 0 else None, j == 0)
                steps.append(Layer(f"l{i}.down{j}", fn, a.region(self._step_names(i, j, "down"), f"l{i}.down{j}")))
        return steps, buffers

    def requests(self, impl: str = "triton") -> list[Request]:
        """One request per subnet of the stream; its meta["buffers"] are the buffers its steps write, which every run
        of the request (each policy's, eager or graph) reuses."""
        return [Request(self.x, steps, label=c.label, meta={"buffers": buffers})
                for c in self.subnets for steps, buffers in [self._subnet_steps(c, impl)]]

    def subnet_weight_bytes(self, cfg: MatConfig) -> int:
        return sum(self.arena.nbytes[n] for i, g in enumerate(cfg.granularity) for j in range(g + 1)
                   for kind in ("up", "down") for n in self._step_names(i, j, kind))

    def shared_bytes(self) -> int:
        """Bytes that every subnet of the stream reads."""
        return sum(self.arena.nbytes[n] for n, u in self.param_uses.items() if u == len(self.subnets))

    def describe(self) -> dict:
        return {"width": self.width, "hidden": self.hidden, "layers": self.n_layers, "subnets": len(self.subnets),
                "granularities": [c.label for c in self.subnets], "weight_bytes": self.arena.total_bytes,
                "shared_by_all_bytes": self.shared_bytes(),
                "subnet_weight_bytes": [self.subnet_weight_bytes(c) for c in self.subnets]}
