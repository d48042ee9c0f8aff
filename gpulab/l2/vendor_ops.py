"""The vendor-library path of the mlp, cnn and matformer workloads (``--impl cublas``): cuBLAS GEMMs and cuDNN
convolutions through torch, in the model's own dtype, with the same signatures as :mod:`gpulab.l2.kernels`.

The hand-written Triton GEMVs read weights far below the copy rate at decode batch sizes (latency-bound), so an L2
policy's gain on them could come from shorter load latencies alone; these kernels show the policies against the
library kernels that a serving stack would run. The fused parts of the Triton kernels (bias, ReLU, the added
operand, the strided output) are separate small torch ops here. Checked against :mod:`gpulab.l2.reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, relu: bool = False,
           out: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x @ w.T + b) + add`` (``add`` may be ``out``: it is read before ``out`` is written)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} and w {tuple(w.shape)} do not match")
    if add is not None and not relu:
        y = torch.addmm(add, x, w.t())  # one GEMM with the residual (or partial sum) as its C operand
        if b is not None:
            y.add_(b)
    else:
        y = F.linear(x, w, b)
        if relu:
            y.relu_()
        if add is not None:
            y.add_(add)
    return y if out is None else out.copy_(y)


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, stride: int = 1, padding: int = 0,
           relu: bool = False) -> torch.Tensor:
    y = F.conv2d(x, w, b, stride=stride, padding=padding)
    return y.relu_() if relu else y
