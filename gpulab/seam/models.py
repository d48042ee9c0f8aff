"""Width-scalable torchvision ResNets, their cut points, and a stitched family.

:class:`ScaledResNet` is torchvision's ResNet (same blocks, same module names, same initialisation)
with two knobs: the base ``width`` (64 gives torchvision's model exactly, so torchvision state dicts
load into it) and the ``stem`` ("imagenet": 7x7/2 conv + max-pool; "cifar": 3x3/1 conv, no pool).

A *position* ``p`` of a ResNet is the point after its stem and its first ``p`` residual blocks
(``p = 0 .. n_blocks``); position ``n_blocks`` is the input of the head (pool + fc). A *cut*
``(front, p, back, q)`` runs ``front`` up to position ``p``, a stitching layer, then ``back`` from its
position ``q`` on. A cut is valid when the spatial stride at ``front``'s position ``p`` equals the
stride at ``back``'s position ``q`` (the activations have the same resolution for any input size).
``cuts="all"`` enumerates every valid ``(p, q)`` pair; ``cuts="aligned"`` only ``p == q``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from gpulab.core.errors import InputError
from gpulab.seam.stitch import StitchLayer

ARCHS: dict[str, tuple[type, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}
SHORT = {"resnet18": "r18", "resnet34": "r34", "resnet50": "r50", "resnet101": "r101"}
STEMS = ("imagenet", "cifar")
CUT_MODES = ("all", "aligned")


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    return arch


class ScaledResNet(nn.Module):
    """torchvision's ResNet with a base width and a choice of stem (module names as torchvision's)."""

    def __init__(self, arch: str, width: int = 64, num_classes: int = 1000, stem: str = "imagenet") -> None:
        super().__init__()
        block, layers = ARCHS[check_arch(arch)]
        if width < 1:
            raise InputError(f"--width must be >= 1, got {width}")
        if stem not in STEMS:
            raise InputError(f"--stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {num_classes}")
        self.arch, self.width, self.stem_kind, self.num_classes = arch, width, stem, num_classes
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            stem_stride = 4
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
            stem_stride = 1
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self._channels = [width]
        self._strides = [stem_stride]
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        for i in range(blocks):
            self._channels.append(planes * block.expansion)
            self._strides.append(self._strides[-1] * (stride if i == 0 else 1))
        return nn.Sequential(*mods)

    # -- positions ---------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        return [b for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for b in layer]

    @property
    def n_blocks(self) -> int:
        return len(self._channels) - 1

    def position_channels(self, p: int) -> int:
        return self._channels[p]

    def position_stride(self, p: int) -> int:
        return self._strides[p]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_blocks(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for b in self.blocks[start:end]:
            x = b(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_positions(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations at every position 0..n_blocks."""
        h = self.forward_stem(x)
        acts = [h]
        for b in self.blocks:
            h = b(h)
            acts.append(h)
        return acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_blocks(self.forward_stem(x), 0, self.n_blocks))

    def stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1]

    def head_modules(self) -> list[nn.Module]:
        return [self.fc]


@dataclass(frozen=True)
class Cut:
    front: str  # architecture name of the front anchor
    p: int
    back: str
    q: int

    @property
    def key(self) -> str:
        return f"{SHORT.get(self.front, self.front)}_{self.p}__{SHORT.get(self.back, self.back)}_{self.q}"

    @property
    def name(self) -> str:
        return f"{SHORT.get(self.front, self.front)}[:{self.p}]>{SHORT.get(self.back, self.back)}[{self.q}:]"

    @property
    def direction(self) -> str:
        return f"{SHORT.get(self.front, self.front)}>{SHORT.get(self.back, self.back)}"


@dataclass(frozen=True)
class Member:
    """One model of a family: an anchor, a baseline, or a stitch."""

    name: str
    kind: str  # anchor | baseline | stitch
    arch: str | None = None
    cut: Cut | None = None


def enumerate_cuts(front: ScaledResNet, back: ScaledResNet, mode: str = "all") -> list[Cut]:
    """Every valid cut from ``front`` into ``back`` (matching stride); ``aligned`` keeps p == q."""
    if mode not in CUT_MODES:
        raise InputError(f"--cuts must be one of {', '.join(CUT_MODES)}, got {mode!r}")
    if front.stem_kind != back.stem_kind:
        raise InputError("both anchors of a family need the same stem")
    cuts = []
    for p in range(front.n_blocks + 1):
        for q in range(back.n_blocks + 1):
            if front.position_stride(p) != back.position_stride(q):
                continue
            if mode == "aligned" and p != q:
                continue
            cuts.append(Cut(front.arch, p, back.arch, q))
    return cuts


@dataclass
class FamilySpec:
    anchors: tuple[str, str] = ("resnet34", "resnet50")
    width: int = 64
    stem: str = "cifar"
    num_classes: int = 10
    cuts: str = "all"
    stitch_bn: bool = True
    baselines: list[str] = field(default_factory=list)
    image_size: int = 32

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["anchors"] = list(self.anchors)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "family.yaml") -> "FamilySpec":
        if not isinstance(d, dict):
            raise InputError(f"{where}: 'spec' must be a mapping")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise InputError(f"{where}: unknown spec key '{sorted(unknown)[0]}'")
        try:
            spec = cls(**{**d, "anchors": tuple(d.get("anchors", cls.anchors))})
        except TypeError as e:
            raise InputError(f"{where}: bad spec ({e})") from None
        spec.validate(where)
        return spec

    def validate(self, where: str = "spec") -> None:
        for name, v in (("anchors", self.anchors), ("baselines", self.baselines)):
            if not isinstance(v, (list, tuple)) or not all(isinstance(a, str) for a in v):
                raise InputError(f"{where}: {name} must be a list of architecture names, got {v!r}")
        if not isinstance(self.stitch_bn, bool):
            raise InputError(f"{where}: stitch_bn must be true or false, got {self.stitch_bn!r}")
        if len(self.anchors) != 2 or self.anchors[0] == self.anchors[1]:
            raise InputError(f"{where}: a family needs two different anchors, got {list(self.anchors)}")
        for a in (*self.anchors, *self.baselines):
            check_arch(a)
        if self.stem not in STEMS:
            raise InputError(f"{where}: stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
        if self.cuts not in CUT_MODES:
            raise InputError(f"{where}: cuts must be one of {', '.join(CUT_MODES)}, got {self.cuts!r}")
        for name, v in (("width", self.width), ("num_classes", self.num_classes), ("image_size", self.image_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{where}: {name} must be a positive integer, got {v!r}")
        if set(self.baselines) & set(self.anchors):
            raise InputError(f"{where}: a baseline cannot also be an anchor")
        twice = next((b for i, b in enumerate(self.baselines) if b in self.baselines[:i]), None)
        if twice is not None:
            raise InputError(f"{where}: baseline {twice} is given twice")


class StitchedFamily(nn.Module):
    """Two anchors, optional baselines and one stitching layer per valid cut in both directions."""

    def __init__(self, spec: FamilySpec) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec
        mk = lambda arch: ScaledResNet(arch, spec.width, spec.num_classes, spec.stem)  # noqa: E731
        self.anchors = nn.ModuleDict({a: mk(a) for a in spec.anchors})
        self.baselines = nn.ModuleDict({a: mk(a) for a in spec.baselines})
        a, b = (self.anchors[x] for x in spec.anchors)
        self.cuts = enumerate_cuts(a, b, spec.cuts) + enumerate_cuts(b, a, spec.cuts)
        self.stitches = nn.ModuleDict({
            c.key: StitchLayer(self.anchors[c.front].position_channels(c.p),
                               self.anchors[c.back].position_channels(c.q), bn=spec.stitch_bn)
            for c in self.cuts})

    def members(self, kinds: Iterable[str] = ("anchor", "stitch", "baseline")) -> list[Member]:
        out: list[Member] = []
        if "anchor" in kinds:
            out += [Member(SHORT.get(a, a), "anchor", arch=a) for a in self.spec.anchors]
        if "stitch" in kinds:
            out += [Member(c.name, "stitch", cut=c) for c in self.cuts]
        if "baseline" in kinds:
            out += [Member(SHORT.get(a, a), "baseline", arch=a) for a in self.spec.baselines]
        return out

    def member(self, name: str) -> Member:
        for m in self.members():
            if m.name == name:
                return m
        raise InputError(f"no model named {name!r} in this family")

    def net(self, arch: str) -> ScaledResNet:
        return self.anchors[arch] if arch in self.anchors else self.baselines[arch]

    def forward_member(self, x: torch.Tensor, m: Member) -> torch.Tensor:
        if m.cut is None:
            return self.net(m.arch)(x)
        c = m.cut
        front, back = self.anchors[c.front], self.anchors[c.back]
        h = front.forward_blocks(front.forward_stem(x), 0, c.p)
        h = self.stitches[c.key](h)
        return back.forward_head(back.forward_blocks(h, c.q, back.n_blocks))

    def forward(self, x: torch.Tensor, name: str) -> torch.Tensor:  # name: a member name (for DDP)
        return self.forward_member(x, self.member(name))

    def member_modules(self, m: Member) -> list[nn.Module]:
        """The modules a member executes (for its parameter count)."""
        if m.cut is None:
            return [self.net(m.arch)]
        c = m.cut
        front, back = self.anchors[c.front], self.anchors[c.back]
        return [*front.stem_modules(), *front.blocks[:c.p], self.stitches[c.key], *back.blocks[c.q:],
                *back.head_modules()]

    def member_params(self, m: Member) -> int:
        seen: dict[int, int] = {}
        for mod in self.member_modules(m):
            for prm in mod.parameters():
                seen[id(prm)] = prm.numel()
        return sum(seen.values())

    def member_parameters(self, m: Member) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for mod in self.member_modules(m):
            for prm in mod.parameters():
                seen[id(prm)] = prm
        return list(seen.values())


class MemberNet(nn.Module):
    """One member of a family as a plain module (shares the family's parameters)."""

    def __init__(self, family: StitchedFamily, member: Member) -> None:
        super().__init__()
        self.family = family
        self.m = member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.family.forward_member(x, self.m)


def load_state_file(path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors / .pt / .pth file (nothing is downloaded)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise InputError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{p}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{p}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


NEW_HEAD_NOTE = "new head: "


def load_pretrained(model: ScaledResNet, path, allow_new_head: bool = True) -> list[str]:
    """Load torchvision-format weights from a local file; a head of another class count is kept fresh (a note
    that starts with NEW_HEAD_NOTE says so: the caller trains it)."""
    sd = load_state_file(path)
    own = model.state_dict()
    notes = []
    if allow_new_head and "fc.weight" in sd and sd["fc.weight"].shape != own["fc.weight"].shape:
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        sd.update({k: own[k] for k in ("fc.weight", "fc.bias")})
        notes.append(f"{NEW_HEAD_NOTE}{path}: head has another class count; fc re-initialised")
    # saved before BatchNorm counted its batches (PyTorch < 0.4.1, the older torchvision model-zoo files among them):
    # no num_batches_tracked, which torch's own loader fills in (with a fixed momentum it changes no output)
    sd.update({k: own[k] for k in own if k.endswith(".num_batches_tracked") and k not in sd})
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        what = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise InputError(f"{path}: does not fit {model.arch} (width {model.width}): {what}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise InputError(f"{path}: '{k}' has shape {tuple(v.shape)}, {model.arch} needs {tuple(own[k].shape)}")
    model.load_state_dict(sd)
    return notes
