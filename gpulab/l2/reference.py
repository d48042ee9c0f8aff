"""Torch/numpy references of every gpulab l2 kernel."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, relu: bool = False,
           out: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    y = F.linear(x.float(), w.float(), None if b is None else b.float())
    y = torch.relu(y) if relu else y
    if add is not None:
        y = y + add.float()
    y = y.to(x.dtype)
    return y if out is None else out.copy_(y)


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, stride: int = 1, padding: int = 0,
           relu: bool = False) -> torch.Tensor:
    y = F.conv2d(x.float(), w.float(), None if b is None else b.float(), stride=stride, padding=padding)
    return (torch.relu(y) if relu else y).to(x.dtype)


def xor_all(words: torch.Tensor) -> int:
    """XOR of all int32 words (the reference of kernels.touch after an XOR-reduce)."""
    a = words.detach().cpu().numpy().astype(np.int32, copy=False)
    return int(np.bitwise_xor.reduce(a)) if a.size else 0
