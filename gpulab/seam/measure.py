"""Per-model cost: FLOPs (torch.utils.flop_counter), parameters, latency at batch 1 and 64.

FLOPs are counted on the ``meta`` device (shapes only, no arithmetic), so counting a full-size
ResNet50 at 224x224 costs milliseconds. ``torch.utils.flop_counter`` counts 2 FLOPs per
multiply-accumulate; ``gmacs`` (= flops / 2 / 1e9) is the convention of torchvision's published
"GFLOPS" (ResNet34 3.66, ResNet50 4.09 at 224x224).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from gpulab.core.device import bf16_native
from gpulab.seam.models import FamilySpec, MemberNet, StitchedFamily, Member


def meta_family(spec: FamilySpec) -> StitchedFamily:
    with torch.device("meta"):
        return StitchedFamily(spec)


def count_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Total FLOPs of one forward pass as torch.utils.flop_counter counts them (2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(x)
    return int(fc.get_total_flops())


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def member_flops(family: StitchedFamily, m: Member, image_size: int, batch: int = 1) -> int:
    """flop_counter FLOPs of one whole member (the family on any device, meta included; eval mode)."""
    x = torch.zeros(batch, 3, image_size, image_size, device=_device_of(family))
    return count_flops(MemberNet(family, m), x)


def autocast_for(device: str, amp: bool) -> Callable[[], Any]:
    """bf16 autocast on a GPU that has native bf16 (:func:`gpulab.core.device.bf16_native`) when ``amp``; a no-op
    otherwise (the ResNets then run in fp32)."""
    if amp and bf16_native(device):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def latency_ms(net: torch.nn.Module, batch: int, image_size: int, device: str, amp: bool, reps: int,
               warmup: int = 3, max_seconds: float = 2.0, graph: bool | None = None) -> dict[str, Any]:
    """Median (p10, p90) forward latency of ``net`` in eval mode at this batch size.

    On a GPU (``graph`` None or True) the forward is captured once as a CUDA graph and its replay is timed, so the
    figure is the GPU's time, not Python's launch overhead: on an H200 (2026-11-27) the eager CIFAR ResNet34 took
    5.46 ms at batch 1 and 5.17 ms at batch 64, i.e. eager timing measured the host. The eager time is kept beside
    it (``eager_median``); ``mode`` says which one ``median`` is. The captured forward's output must equal an
    eager forward's (within bf16 rounding under autocast), else the eager time is reported and ``graph_error``
    says why; a failed capture does the same."""
    from gpulab.core.timing import benchmark

    x = torch.randn(batch, 3, image_size, image_size, device=device)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        x = x.to(memory_format=torch.channels_last)
    ctx = autocast_for(device, amp)

    def fn() -> None:
        with torch.inference_mode(), ctx():
            net(x)

    t = benchmark(fn, device=device, warmup=warmup, reps=reps, max_seconds=max_seconds)
    out: dict[str, Any] = {"median": t.median, "p10": t.p10, "p90": t.p90, "reps": t.reps, "mode": "eager"}
    if not on_gpu or graph is False:
        return out
    out["eager_median"] = t.median
    try:
        replay = _captured_forward(net, x, amp and bf16_native(device))
    except (RuntimeError, ValueError) as e:  # capture unsupported here: the eager figure stands
        out["graph_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        return out
    tg = benchmark(replay, device=device, warmup=warmup, reps=reps, max_seconds=max_seconds)
    out.update(median=tg.median, p10=tg.p10, p90=tg.p90, reps=tg.reps, mode="graph")
    return out


def _captured_forward(net: torch.nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], Any]:
    """``net(x)`` captured as a CUDA graph (bf16 autocast without its weight cache, which a graph must not hold);
    its replay, after checking one replay's output against an eager forward."""
    from gpulab.core.timing import capture_graph

    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if bf16 else \
        contextlib.nullcontext

    def forward() -> torch.Tensor:
        with torch.inference_mode(), ctx():
            return net(x)

    g, static = capture_graph(forward, warmup=2)
    want = forward()
    g.replay()
    torch.cuda.synchronize()
    tol = 2e-2 if bf16 else 1e-4
    if not torch.allclose(static.float(), want.float(), atol=tol * float(want.float().abs().max()), rtol=tol):
        raise ValueError("the captured forward's output differs from the eager one")
    return g.replay


def count_call(fn: Callable[..., Any], *args: Any) -> tuple[int, Any]:
    """FLOPs (flop_counter) of one call, and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = fn(*args)
    return int(fc.get_total_flops()), out


def segment_flops(net: torch.nn.Module, image_size: int) -> dict[str, Any]:
    """flop_counter FLOPs of a (meta) ScaledResNet's stem, each block and the head, counted one
    segment at a time, plus the activation shape at every position."""
    x = torch.zeros(1, 3, image_size, image_size, device=_device_of(net))
    stem, h = count_call(net.forward_stem, x)
    shapes, blocks = [tuple(h.shape[1:])], []
    for b in net.blocks:
        f, h = count_call(b, h)
        blocks.append(f)
        shapes.append(tuple(h.shape[1:]))
    head, _ = count_call(net.forward_head, h)
    return {"stem": stem, "blocks": blocks, "head": head, "shapes": shapes}


def family_flops(meta: StitchedFamily, image_size: int) -> dict[str, int]:
    """FLOPs of every member (batch 1), composed from per-segment flop_counter counts: a stitch costs
    front stem + front blocks[:p] + its 1x1 conv + back blocks[q:] + back head. ``meta`` may be the
    family itself in eval mode on its device (counting needs shapes only; on a real device a batch-1
    forward is cheaper than meta-device BatchNorm decompositions)."""
    seg = {a: segment_flops(meta.net(a), image_size) for a in [*meta.spec.anchors, *meta.spec.baselines]}
    out: dict[str, int] = {}
    for m in meta.members():
        if m.cut is None:
            s = seg[m.arch]
            out[m.name] = s["stem"] + sum(s["blocks"]) + s["head"]
            continue
        c = m.cut
        f, b = seg[c.front], seg[c.back]
        shape = f["shapes"][c.p]
        out[m.name] = (f["stem"] + sum(f["blocks"][:c.p]) + count_flops(meta.stitches[c.key],
                       torch.zeros(1, *shape, device=_device_of(meta))) + sum(b["blocks"][c.q:]) + b["head"])
    return out
