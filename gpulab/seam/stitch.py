"""Stitching layers (1x1 conv, optional BatchNorm) and their least-squares initialisation.

For a cut ``front[:p] -> back[q:]`` the stitching layer maps the front's activation ``X`` (C_in
channels) to the back's own activation ``Y`` at position ``q`` (C_out channels) on the same images.
Treating every pixel as a sample, the 1x1 conv ``W, b`` that minimises ``||X W + b - Y||^2`` solves
the normal equations ``[X 1]^T [X 1] [W; b] = [X 1]^T Y`` (a small ridge term keeps them well posed);
the Gram matrices are accumulated in float64 over calibration batches, so no activation is kept.
The ridge ``lam = ridge * mean_c sum x_c^2`` (default ridge 1e-2) matters at the low-resolution cuts:
100 CIFAR images give 1,600 pixels at stride 8 for up to 2,049 unknowns per output channel, where the
plain solution overfits the calibration images (held-out MSE far above the random init's).
With BN, the BN layer is set to the identity over the calibration statistics of the conv's output
(running mean/var = those statistics, weight = sqrt(var + eps), bias = mean).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class StitchLayer(nn.Module):
    def __init__(self, cin: int, cout: int, bn: bool = True) -> None:
        super().__init__()
        self.cin, self.cout = cin, cout
        self.conv = nn.Conv2d(cin, cout, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(cout) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) in float64."""
    return x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()


@dataclass
class Gram:
    """Sufficient statistics of one side: sum of [x 1]^T [x 1] (front) or of y*y (target)."""

    xtx: torch.Tensor | None = None  # (cin+1, cin+1)
    n: int = 0

    def add(self, xp: torch.Tensor) -> None:
        x1 = torch.cat([xp, torch.ones(xp.shape[0], 1, dtype=xp.dtype, device=xp.device)], 1)
        g = x1.T @ x1
        self.xtx = g if self.xtx is None else self.xtx + g
        self.n += xp.shape[0]


class LstsqProblem:
    """Accumulates [X 1]^T Y and sum(Y^2) for one cut; the front's Gram matrix is shared."""

    def __init__(self) -> None:
        self.xty: torch.Tensor | None = None
        self.yty = 0.0

    def add(self, xp: torch.Tensor, yp: torch.Tensor) -> None:
        x1 = torch.cat([xp, torch.ones(xp.shape[0], 1, dtype=xp.dtype, device=xp.device)], 1)
        g = x1.T @ yp
        self.xty = g if self.xty is None else self.xty + g
        self.yty += float((yp * yp).sum())


def solve_normal(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """[W; b] (cin+1, cout) from the normal equations with a relative ridge on W (not on b)."""
    k = xtx.shape[0]
    reg = torch.zeros(k, dtype=xtx.dtype, device=xtx.device)
    scale = float(torch.diagonal(xtx)[:-1].mean()) if k > 1 else 1.0
    reg[:-1] = ridge * max(scale, 1e-12)
    a = xtx + torch.diag(reg)
    try:
        return torch.linalg.solve(a, xty)
    except RuntimeError:  # singular even with the ridge: least-norm solution
        return torch.linalg.lstsq(a, xty).solution


def mse_of(wb: torch.Tensor, xtx: torch.Tensor, xty: torch.Tensor, yty: float, n: int, cout: int) -> float:
    """Mean squared error of X W + b against Y from the accumulated statistics (per element)."""
    sse = float(torch.sum(wb * (xtx @ wb))) - 2.0 * float(torch.sum(wb * xty)) + yty
    return max(sse, 0.0) / max(n * cout, 1)


def conv_as_wb(layer: StitchLayer) -> torch.Tensor:
    """The current conv as a (cin+1, cout) [W; b] matrix (float64, CPU)."""
    w = layer.conv.weight.detach().reshape(layer.cout, layer.cin).double().cpu()
    b = layer.conv.bias.detach().double().cpu() if layer.conv.bias is not None else torch.zeros(layer.cout)
    return torch.cat([w.T, b[None, :]], 0)


@torch.no_grad()
def apply_solution(layer: StitchLayer, wb: torch.Tensor, xtx: torch.Tensor, n: int) -> None:
    """Set the conv to [W; b]; with BN, make BN the identity over the conv output's statistics."""
    wb = wb.to(layer.conv.weight.device)
    layer.conv.weight.copy_(wb[:-1].T.reshape(layer.cout, layer.cin, 1, 1).to(layer.conv.weight.dtype))
    layer.conv.bias.copy_(wb[-1].to(layer.conv.bias.dtype))
    if layer.bn is not None:
        xtx = xtx.to(wb.device)
        mean_x = xtx[-1, :-1] / n
        cov_x = xtx[:-1, :-1] / n - torch.outer(mean_x, mean_x)
        w = wb[:-1]
        mean_o = mean_x @ w + wb[-1]
        var_o = torch.einsum("ic,ij,jc->c", w, cov_x, w).clamp_min(0.0)
        bn = layer.bn
        bn.running_mean.copy_(mean_o.to(bn.running_mean.dtype))
        bn.running_var.copy_(var_o.to(bn.running_var.dtype))
        bn.weight.copy_(torch.sqrt(var_o + bn.eps).to(bn.weight.dtype))
        bn.bias.copy_(mean_o.to(bn.bias.dtype))


@torch.no_grad()
def least_squares_init(family, images: torch.Tensor, batch_size: int = 50, ridge: float = 1e-2,
                       autocast=None) -> dict[str, dict[str, float]]:
    """Initialise every stitching layer of ``family`` by least squares on ``images`` (normalised, on device).

    Returns, per cut key, the activation MSE against the target at the previous init (``mse_init``),
    after the least-squares solution (``mse_lstsq``) and the target's mean square (``target_ms``).
    """
    import contextlib

    was_training = family.training
    family.eval()
    fronts = sorted({(c.front, c.p) for c in family.cuts})
    grams = {fp: Gram() for fp in fronts}
    probs = {c.key: LstsqProblem() for c in family.cuts}
    ctx = autocast or contextlib.nullcontext
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        with ctx():
            acts = {a: family.anchors[a].forward_positions(x) for a in family.spec.anchors}
        pix: dict[tuple[str, int], torch.Tensor] = {}

        def get(a: str, p: int) -> torch.Tensor:
            if (a, p) not in pix:
                pix[(a, p)] = _pixels(acts[a][p].float())
            return pix[(a, p)]

        for fp in fronts:
            grams[fp].add(get(*fp))
        for c in family.cuts:
            probs[c.key].add(get(c.front, c.p), get(c.back, c.q))
        del acts, pix
    report: dict[str, dict[str, float]] = {}
    for c in family.cuts:
        g, pr, layer = grams[(c.front, c.p)], probs[c.key], family.stitches[c.key]
        xtx, xty = g.xtx, pr.xty
        wb0 = conv_as_wb(layer).to(xtx.device)
        wb = solve_normal(xtx, xty, ridge)
        report[c.key] = {
            "mse_init": mse_of(wb0, xtx, xty, pr.yty, g.n, layer.cout),
            "mse_lstsq": mse_of(wb, xtx, xty, pr.yty, g.n, layer.cout),
            "target_ms": pr.yty / max(g.n * layer.cout, 1),
        }
        apply_solution(layer, wb, xtx, g.n)
    family.train(was_training)
    return report
