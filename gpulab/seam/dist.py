"""torchrun (DDP) plumbing for ``gpulab seam train``: the process group, barriers, a parameter check.

One :class:`ProcessGroup` spans the whole command. The backend follows the device the command
resolved (``nccl`` for CUDA, ``gloo`` for the CPU, so ``--device cpu`` works on a GPU machine too),
and leaving the ``with`` block destroys the group on every rank, on success or error. Rank 0 alone
writes files; :func:`barrier` brackets those writes so no rank races ahead of them.
"""
from __future__ import annotations

from typing import Any

import torch


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    if not active():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def barrier() -> None:
    """A barrier across the ranks when a process group is up (a no-op otherwise)."""
    if not active():
        return
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def reduce_device() -> torch.device:
    """Where collective tensors live: the current GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (``values`` itself without a process group)."""
    if not active():
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


class ProcessGroup:
    """``with ProcessGroup(world, device, local_rank):`` -- init (world > 1) and destroy on every rank."""

    def __init__(self, world: int, device: str, local_rank: int) -> None:
        self.world, self.device, self.local = world, device, local_rank
        self.owned = False

    def __enter__(self) -> "ProcessGroup":
        if self.world > 1:
            import torch.distributed as dist

            if self.device == "cuda":  # before the process group: NCCL binds each rank to its current device
                torch.cuda.set_device(self.local)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device == "cuda" else "gloo")
                self.owned = True
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.owned and active():
            import torch.distributed as dist

            dist.destroy_process_group()
        self.owned = False
        return False

    def barrier(self) -> None:
        barrier()

    def params_in_sync(self, module: torch.nn.Module, rtol: float = 1e-6) -> tuple[bool, str] | None:
        """Whether every rank holds the same parameters (per-tensor sums and sums of squares compared
        through an all-reduce of max and min); None without a process group. A collective."""
        if not active():
            return None
        import torch.distributed as dist

        with torch.no_grad():
            stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                                 for p in module.parameters()]).flatten().to(reduce_device())
        hi, lo = stats.clone(), stats.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        n = f"{dist.get_world_size()} ranks, {stats.numel() // 2} tensors"
        if not bool(torch.isfinite(hi).all() and torch.isfinite(lo).all()):
            return False, f"{n}: non-finite parameters on some rank"
        worst = float(((hi - lo).abs() / hi.abs().clamp_min(1e-12)).max())
        return worst <= rtol, f"{n}, worst relative spread {worst:.2e}"
