"""Plain reference computations that the optimised paths are checked against.

- :func:`lstsq_reference`: the stitching layer by ``torch.linalg.lstsq`` on all pixels at once
  (what the Gram-matrix accumulation of :mod:`gpulab.seam.stitch` must reproduce).
- :func:`conv_linear_macs`: multiply-accumulates of every Conv2d and Linear from forward hooks
  (``C_out * C_in/groups * k_h * k_w * H_out * W_out`` and ``in * out`` per sample) -- the convention
  of torchvision's published "GFLOPS" (3.66 for ResNet34, 4.09 for ResNet50 at 224x224), which
  ``torch.utils.flop_counter`` reports doubled (it counts a multiply-add as 2 FLOPs).
- :func:`lightest_meeting`: the selection rule by brute force.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def lstsq_reference(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """W (cout, cin) and b (cout,) minimising ||conv1x1(x) - y||^2 + lam ||W||^2 for (N, C, H, W) tensors,
    with lam = ridge * (mean over channels of sum x^2), solved as an augmented least-squares problem
    (rows sqrt(lam) * I appended) by an SVD-based solver -- no normal equations."""
    xp = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
    yp = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()
    x1 = torch.cat([xp, torch.ones(xp.shape[0], 1, dtype=xp.dtype)], 1)
    if ridge > 0:
        lam = ridge * float((xp * xp).sum(0).mean())
        c = xp.shape[1]
        extra = torch.cat([lam ** 0.5 * torch.eye(c, dtype=xp.dtype), torch.zeros(c, 1, dtype=xp.dtype)], 1)
        x1 = torch.cat([x1, extra], 0)
        yp = torch.cat([yp, torch.zeros(c, yp.shape[1], dtype=yp.dtype)], 0)
    sol = torch.linalg.lstsq(x1, yp, driver="gelsd").solution
    return sol[:-1].T.contiguous(), sol[-1].contiguous()


def conv_linear_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers of one forward pass, summed over the batch."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.shape[0] * m.out_channels * (m.in_channels // m.groups) * kh * kw * out.shape[2] * out.shape[3]

    def lin_hook(m: nn.Linear, inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() // m.out_features * m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return int(total)


def lightest_meeting(models: list[dict[str, Any]], accuracy: float, metric: str) -> dict[str, Any] | None:
    """The model with the smallest ``metric`` among those with top1 >= accuracy (ties: higher top1)."""
    best = None
    for m in models:
        if m["top1"] + 1e-12 < accuracy:
            continue
        if best is None or (m[metric], -m["top1"]) < (best[metric], -best["top1"]):
            best = m
    return best
