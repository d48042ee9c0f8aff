"""Baseline join in plain torch: sort the right keys, two searchsorted calls, expand the ranges."""
from __future__ import annotations

from gpulab.dbjoin.reference import JoinResult


def sort_search_join(left_key, right_key, count_only: bool = False) -> JoinResult:
    """Inner join of two 1-D integer key tensors (any device); returns int64 row-index tensors."""
    import torch

    nl, nr = left_key.numel(), right_key.numel()
    dev = left_key.device
    if nl == 0 or nr == 0:
        e = torch.empty(0, dtype=torch.int64, device=dev)
        return JoinResult(0) if count_only else JoinResult(0, e, e)
    if left_key.dtype != right_key.dtype:
        left_key, right_key = left_key.to(torch.int64), right_key.to(torch.int64)
    rs, perm = torch.sort(right_key)
    lo = torch.searchsorted(rs, left_key, right=False)
    hi = torch.searchsorted(rs, left_key, right=True)
    cnt = hi - lo
    total = int(cnt.sum().item())
    if count_only:
        return JoinResult(total)
    li = torch.repeat_interleave(torch.arange(nl, device=dev), cnt, output_size=total)
    start = torch.cumsum(cnt, 0) - cnt
    ri = perm[lo[li] + (torch.arange(total, device=dev) - start[li])]
    return JoinResult(total, li, ri)
