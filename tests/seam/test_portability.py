"""bf16 autocast only on GPUs with native bf16 (CPU checks with a patched compute capability)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from gpulab.core.device import bf16_native
from gpulab.seam.measure import autocast_for


@pytest.mark.parametrize("device,cc,want", [("cuda", (8, 0), True), ("cuda:1", (8, 6), True), ("cuda", (9, 0), True),
                                            ("cuda", (7, 5), False), ("cuda", (7, 0), False), ("cpu", (9, 0), False)])
def test_bf16_autocast_needs_native_bf16(monkeypatch, device, cc, want):
    """cuDNN has no bf16 convolutions before compute capability 8.0 (T4, V100, RTX 20), and
    is_bf16_supported() says True there anyway (emulation): the ResNets run in fp32 on such GPUs."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    assert bf16_native(device) is want
    ctx = autocast_for(device, True)
    assert (ctx is not contextlib.nullcontext) is want
    assert autocast_for(device, False) is contextlib.nullcontext


def test_trainer_notes_fp32_on_a_gpu_without_bf16(monkeypatch):
    """The seam-train record says when --amp could not apply (the family itself stays on the CPU here)."""
    from gpulab.seam import train as T

    from .helpers import tiny_spec

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # no GPU to move to
    cfg = T.TrainConfig(spec=tiny_spec(width=8, image_size=32), batch_size=4, amp=True)
    tr = T.Trainer(cfg, "unused", source=None, device="cuda")
    assert tr.autocast is contextlib.nullcontext
    assert any("no native bf16" in n for n in tr.notes)
