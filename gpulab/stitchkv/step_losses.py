"""Per-step training losses kept on the device and read back in batches (stitch training and pretraining)."""
from __future__ import annotations

import math
from typing import Any

from gpulab.core.errors import InputError


class StepLosses:
    """A training loop's per-step losses (means over the ranks): kept on the device in one buffer allocated up
    front and read back only at log lines, checkpoints and the loop's end. Reading each step's loss (a float()
    per step) made the host wait for the GPU after every step, idling the GPU while the next step's kernels
    were queued: these tiny models are bound by launches. One buffer, not a list of each step's detached loss:
    thousands of small tensors kept alive between large activation buffers fragmented glibc's heap on the CPU
    (24 GB and an OOM kill after 2,000 pretraining steps). The first non-finite loss read back is a one-line
    error naming its step; the steps between it and the read are lost, never saved (read before saving).

    ``ctx``: a :class:`gpulab.stitchkv.distributed.Ctx` (None: one process); ``done``: the losses of the steps
    already run (from a checkpoint), ``what`` and ``lr_flag`` name the loop and its learning-rate option in
    the error."""

    def __init__(self, ctx: Any, device: str, steps: int, done: list[float], what: str, lr_flag: str) -> None:
        import torch

        self.ctx, self.what, self.lr_flag = ctx, what, lr_flag
        self.values = list(done)  # read back and checked
        self.buf = torch.zeros(max(steps, len(done)), device=device)

    def add(self, step: int, loss: Any) -> None:
        self.buf[step] = loss.detach()

    def read(self, upto: int) -> list[float]:
        """The losses of steps < ``upto``, checked; a collective with several ranks: every rank calls it at the
        same steps."""
        lo = len(self.values)
        if upto > lo:
            new = self.buf[lo:upto]
            new = (new if self.ctx is None else self.ctx.mean_tensor(new)).tolist()
            for i, v in enumerate(new):
                if not math.isfinite(v):
                    raise InputError(f"{self.what} loss became {v} at step {lo + i}; lower {self.lr_flag}")
            self.values.extend(new)
        return self.values
