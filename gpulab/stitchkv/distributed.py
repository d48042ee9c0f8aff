"""torch.distributed for kvstitch: the torchrun environment, a process group that never hangs, and
the tensor hand-over between a prefill rank and a decode rank.

- :func:`setup` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by ``torchrun``); with more than one
  rank it binds the rank to ``cuda:LOCAL_RANK`` (before the group: NCCL binds to the current device)
  and joins a group: ``nccl`` when every rank has its own GPU, ``gloo`` otherwise (CPU, or several
  ranks sharing one GPU: tensors are then staged through host memory). Every collective and
  point-to-point call times out after ``KVSTITCH_DIST_TIMEOUT_S`` seconds (default 600): a dead peer
  is an error, never a hang.
- :func:`send_tensors` / :func:`recv_tensors`: a small int64 header (count, then dtype code, rank and
  shape of each tensor) followed by the tensors themselves, so the receiver needs no prior knowledge
  of shapes. gloo has no bf16/fp16 point-to-point support everywhere, so 16-bit tensors travel as
  int16 bit patterns (bit-exact).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from gpulab.core.errors import DeviceError, InputError

TIMEOUT_ENV = "KVSTITCH_DIST_TIMEOUT_S"


def env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment (0, 1, 0 without one)."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise InputError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun)") from None


def timeout_s() -> float:
    try:
        t = float(os.environ.get(TIMEOUT_ENV, 600))
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV} must be a number of seconds") from None
    if t <= 0:
        raise InputError(f"{TIMEOUT_ENV} must be > 0, got {t}")
    return t


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ctx:
    rank: int = 0
    world: int = 1
    local: int = 0
    backend: str | None = None  # None: a single process, no group
    device: str = "cpu"  # this rank's device ("cpu", "cuda", "cuda:1")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def staged(self) -> bool:
        """True when tensors on a GPU go through host memory (gloo between GPU ranks)."""
        return self.backend == "gloo" and self.device.startswith("cuda")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def mean_tensor(self, t: Any) -> Any:
        """The element-wise mean of a float tensor over the ranks (t itself with one rank); a collective: every
        rank calls it at the same point."""
        if self.world == 1:
            return t
        import torch
        import torch.distributed as dist

        x = t.to(self.comm_device, dtype=torch.float64)
        dist.all_reduce(x)
        return (x / self.world).to(t.device, t.dtype)

    @property
    def comm_device(self) -> str:
        return self.device if self.backend == "nccl" else "cpu"

    def close(self, sync: bool = False) -> None:
        """Leave the process group (once). ``sync``: first wait for every rank at a barrier, on a path where all
        of them get there (the end of a finished command): a rank that tears its connections down while another
        still works (rank 0 writing the record) can end in a gloo abort (SIGABRT) after the work was done. Error
        paths close without it (a barrier there could wait for a rank that will never come)."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                if sync and self.world > 1:
                    dist.barrier()
                dist.destroy_process_group()
            self.owns_group = False


def setup(device: str, min_world: int = 1, max_world: int | None = None, what: str = "kvstitch") -> Ctx:
    """This process's rank and device; joins the process group when torchrun started several ranks."""
    rank, world, local = env()
    if world < min_world or (max_world is not None and world > max_world):
        need = str(min_world) if max_world == min_world else f">= {min_world}"
        raise InputError(f"{what} needs {need} ranks, got WORLD_SIZE={world} "
                         f"(run it under torchrun --nproc-per-node {min_world})")
    if world == 1:
        return Ctx(device=device)
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    dev = device
    backend = "gloo"
    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        if n == 0:
            raise DeviceError(f"{what}: --device cuda, but no CUDA GPU is visible")
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun: ranks on this node
        if n >= per_node:  # one GPU per rank on every node
            dev, backend = f"cuda:{local}", "nccl"
        else:  # fewer GPUs than ranks: share them, move tensors over gloo through host memory
            dev = f"cuda:{local % n}"
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return Ctx(rank, world, local, dist.get_backend(), dev, owns_group=False)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except Exception as e:  # noqa: BLE001 - rendezvous failures are one line
        msg = str(e).strip().splitlines()
        raise InputError(f"{what}: cannot join the process group ({msg[0] if msg else type(e).__name__})") from None
    return Ctx(rank, world, local, backend, dev, owns_group=True)


def ddp(module: Any, ctx: Ctx) -> Any:
    """``module`` wrapped in DistributedDataParallel with more than one rank (itself otherwise)."""
    if ctx.world == 1:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device] if ctx.device.startswith("cuda") else None
    # buffers (RoPE inv_freq) are constants: synced once at construction, not before every forward
    params = inspect.signature(DDP.__init__).parameters
    kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DDP(module, device_ids=ids, **kw)


# --------------------------------------------------------------------------- tensor hand-over
_DTYPES = ("float32", "bfloat16", "float16", "int64", "int32", "float64", "uint8", "int16")


def _wire(t: Any, ctx: Ctx) -> Any:
    import torch

    t = t.contiguous()
    if ctx.backend == "gloo":
        if t.is_cuda:
            t = t.cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
    elif str(t.device) != ctx.device:  # nccl: on this rank's GPU
        t = t.to(ctx.device)
    return t


def send_tensors(tensors: list[Any], dst: int, ctx: Ctx) -> int:
    """Send a header and the tensors to rank ``dst`` (blocking); returns the payload bytes sent."""
    import torch
    import torch.distributed as dist

    head = [len(tensors)]
    for t in tensors:
        name = str(t.dtype).replace("torch.", "")
        if name not in _DTYPES:
            raise InputError(f"cannot hand over a {name} tensor")
        head += [_DTYPES.index(name), t.dim(), *t.shape]
    h = torch.tensor(head, dtype=torch.int64, device=ctx.comm_device)
    dist.send(torch.tensor([h.numel()], dtype=torch.int64, device=ctx.comm_device), dst)
    dist.send(h, dst)
    nbytes = 0
    for t in tensors:
        w = _wire(t, ctx)
        nbytes += w.numel() * w.element_size()
        dist.send(w, dst)
    return nbytes


def recv_tensors(src: int, ctx: Ctx) -> list[Any]:
    """Receive what :func:`send_tensors` sent from rank ``src``, on this rank's device."""
    import torch
    import torch.distributed as dist

    n = torch.zeros(1, dtype=torch.int64, device=ctx.comm_device)
    dist.recv(n, src)
    h = torch.zeros(int(n.item()), dtype=torch.int64, device=ctx.comm_device)
    dist.recv(h, src)
    head = h.tolist()
    count, i, out = head[0], 1, []
    for _ in range(count):
        code, ndim = head[i], head[i + 1]
        shape = head[i + 2: i + 2 + ndim]
        i += 2 + ndim
        dtype = getattr(torch, _DTYPES[code])
        wire_dtype = torch.int16 if ctx.backend == "gloo" and dtype in (torch.bfloat16, torch.float16) else dtype
        buf = torch.empty(shape, dtype=wire_dtype, device=ctx.comm_device)
        dist.recv(buf, src)
        if wire_dtype != dtype:
            buf = buf.view(dtype)
        out.append(buf.to(ctx.device))
    return out
