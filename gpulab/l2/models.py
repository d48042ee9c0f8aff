"""Workloads of gpulab l2: a packed weight arena, an MLP and a small conv net on the Triton kernels.

Every workload keeps its parameters in one :class:`WeightArena` (a single byte buffer, each
parameter a 256-byte aligned view), laid out hottest first, so that one access-policy window
covers the hottest weights and each layer's weights are one contiguous prefetch range.
A workload yields :class:`Request` objects: an input and its list of :class:`Layer` steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from gpulab.core.errors import InputError
from gpulab.l2.policy import Region

ALIGN = 256
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the kernels of the mlp, cnn and matformer workloads: the hand-written Triton ones, the fp32 torch reference, and
# cuBLAS/cuDNN through torch in the model's dtype
IMPLS = ("triton", "torch", "cublas")


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"unknown --dtype '{name}' (known: {', '.join(DTYPES)})")
    return DTYPES[name]


class WeightArena:
    """Parameters as views of one uint8 buffer, in the given order, each 256-byte aligned."""

    def __init__(self, specs: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device: str | torch.device):
        if not specs:
            raise InputError("a weight arena needs at least one parameter")
        names = [n for n, _ in specs]
        if len(set(names)) != len(names):
            raise InputError("weight arena: duplicate parameter names")
        esize = torch.empty((), dtype=dtype).element_size()
        self.dtype = dtype
        self.offsets: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        off = 0
        for name, shape in specs:
            nbytes = math.prod(shape) * esize
            self.offsets[name] = off
            self.nbytes[name] = nbytes
            off += -(-nbytes // ALIGN) * ALIGN
        self.total_bytes = max(off, ALIGN)
        self.buffer = torch.zeros(self.total_bytes, dtype=torch.uint8, device=device)
        self.tensors: dict[str, torch.Tensor] = {}
        for name, shape in specs:
            o, nb = self.offsets[name], self.nbytes[name]
            self.tensors[name] = self.buffer[o:o + nb].view(dtype).view(shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def base_ptr(self) -> int:
        return int(self.buffer.data_ptr())

    def region(self, names: Sequence[str], label: str = "") -> Region:
        """The smallest arena range holding all ``names`` (offsets relative to the arena)."""
        start = min(self.offsets[n] for n in names)
        end = max(self.offsets[n] + self.nbytes[n] for n in names)
        end = min(-(-end // ALIGN) * ALIGN, self.total_bytes)
        return Region(label or names[0], start, end - start)

    def init_(self, seed: int, fan_in: dict[str, int]) -> None:
        """Deterministic init: weights N(0, 2/fan_in) (He), biases small."""
        g = torch.Generator().manual_seed(seed)
        for name, t in self.tensors.items():
            std = math.sqrt(2.0 / max(1, fan_in.get(name, 1))) if name in fan_in else 0.02
            t.copy_((torch.randn(t.shape, generator=g) * std).to(t.dtype))


@dataclass
class Layer:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    region: Region  # its weights in the arena (for prefetch)


@dataclass
class Request:
    x: torch.Tensor
    layers: list[Layer]
    label: str = ""
    meta: dict = field(default_factory=dict)


def run_layers(x: torch.Tensor, layers: Sequence[Layer],
               before: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run layers in order; ``before(i)`` is called before layer i is launched (the prefetch hook)."""
    for i, layer in enumerate(layers):
        if before is not None:
            before(i)
        x = layer.fn(x)
    return x


def _impl(impl: str):
    if impl == "triton":
        from gpulab.l2 import kernels
        return kernels
    if impl == "torch":
        from gpulab.l2 import reference
        return reference
    if impl == "cublas":
        from gpulab.l2 import vendor_ops
        return vendor_ops
    raise InputError(f"unknown --impl '{impl}' (known: {', '.join(IMPLS)})")


class MLP:
    """``layers`` Linear(width, width) + ReLU (the last without ReLU), weights in one arena."""

    kind = "mlp"

    def __init__(self, width: int, layers: int, batch: int, dtype: torch.dtype, device: str, seed: int = 0):
        if width < 1 or layers < 1 or batch < 1:
            raise InputError(f"mlp needs width, layers and batch >= 1, got {width}, {layers}, {batch}")
        self.width, self.n_layers, self.batch = width, layers, batch
        specs = []
        for i in range(layers):
            specs += [(f"fc{i}.weight", (width, width)), (f"fc{i}.bias", (width,))]
        self.arena = WeightArena(specs, dtype, device)
        self.arena.init_(seed, {f"fc{i}.weight": width for i in range(layers)})
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, width, generator=g).to(device=device, dtype=dtype)

    def layers(self, impl: str) -> list[Layer]:
        k = _impl(impl)
        out = []
        for i in range(self.n_layers):
            w, b = self.arena[f"fc{i}.weight"], self.arena[f"fc{i}.bias"]
            relu = i < self.n_layers - 1
            out.append(Layer(f"fc{i}", (lambda x, w=w, b=b, relu=relu: k.linear(x, w, b, relu=relu)),
                             self.arena.region([f"fc{i}.weight", f"fc{i}.bias"], f"fc{i}")))
        return out

    def requests(self, impl: str) -> list[Request]:
        return [Request(self.x, self.layers(impl), label=f"mlp{self.n_layers}x{self.width}")]

    def describe(self) -> dict:
        return {"width": self.width, "layers": self.n_layers, "weight_bytes": self.arena.total_bytes}


class ConvNet:
    """``layers`` 3x3 convs (3 -> C, then C -> C, stride 1, ReLU), global average pool, Linear(C, classes)."""

    kind = "cnn"

    def __init__(self, channels: int, layers: int, batch: int, image: int, dtype: torch.dtype, device: str,
                 classes: int = 1000, seed: int = 0):
        if channels < 1 or layers < 1 or batch < 1 or image < 3:
            raise InputError(f"cnn needs channels, layers, batch >= 1 and image >= 3, got "
                             f"{channels}, {layers}, {batch}, {image}")
        self.channels, self.n_layers, self.batch, self.image, self.classes = channels, layers, batch, image, classes
        specs, fan = [], {}
        for i in range(layers):
            cin = 3 if i == 0 else channels
            specs += [(f"conv{i}.weight", (channels, cin, 3, 3)), (f"conv{i}.bias", (channels,))]
            fan[f"conv{i}.weight"] = cin * 9
        specs += [("fc.weight", (classes, channels)), ("fc.bias", (classes,))]
        fan["fc.weight"] = channels
        self.arena = WeightArena(specs, dtype, device)
        self.arena.init_(seed, fan)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 3, image, image, generator=g).to(device=device, dtype=dtype)

    def layers(self, impl: str) -> list[Layer]:
        k = _impl(impl)
        out = []
        for i in range(self.n_layers):
            w, b = self.arena[f"conv{i}.weight"], self.arena[f"conv{i}.bias"]
            out.append(Layer(f"conv{i}", (lambda x, w=w, b=b: k.conv2d(x, w, b, stride=1, padding=1, relu=True)),
                             self.arena.region([f"conv{i}.weight", f"conv{i}.bias"], f"conv{i}")))
        w, b = self.arena["fc.weight"], self.arena["fc.bias"]
        out.append(Layer("fc", (lambda x, w=w, b=b: k.linear(x.mean(dim=(2, 3)), w, b, relu=False)),
                         self.arena.region(["fc.weight", "fc.bias"], "fc")))
        return out

    def requests(self, impl: str) -> list[Request]:
        return [Request(self.x, self.layers(impl), label=f"cnn{self.n_layers}x{self.channels}")]

    def describe(self) -> dict:
        return {"channels": self.channels, "layers": self.n_layers, "image": self.image,
                "weight_bytes": self.arena.total_bytes}
