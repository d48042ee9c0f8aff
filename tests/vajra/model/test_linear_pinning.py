"""linear.pinned_backends / varies_with_m: auto's choice by step size, and pinning it for a measurement."""
from __future__ import annotations

import pytest
import torch

from gpulab.vajra import linear
from gpulab.vajra.checkpoint import QuantWeight


def _auto_fp8_linear(monkeypatch) -> linear.Linear:
    """A per-channel FP8 linear with dynamic activations as ``auto`` keeps it on a GPU whose torch._scaled_mm works
    (on the CPU its constructor dequantizes it: the attributes are set by hand here)."""
    q = torch.randn(32, 48).to(torch.float8_e4m3fn)
    qw = QuantWeight(q=q, scale=torch.ones(32), strategy="channel", block=None, act="dynamic", input_scale=None)
    lin = linear.Linear(torch.zeros(32, 48), None, torch.float32)
    lin.qw, lin.w, lin.backend, lin.w8a8_ok = qw, None, "auto", True
    return lin


def test_auto_switches_at_w8a16_max_m(monkeypatch):
    lin = _auto_fp8_linear(monkeypatch)
    assert lin.choose(1) == lin.choose(linear.W8A16_MAX_M) == "w8a16"
    assert lin.choose(linear.W8A16_MAX_M + 1) == lin.choose(8192) == "w8a8"
    assert linear.varies_with_m(lin)
    dense = linear.Linear(torch.zeros(4, 4), None, torch.float32)
    assert not linear.varies_with_m(dense)
    lin.backend = "w8a16"  # a backend asked for (--linear-backend) never switches
    assert not linear.varies_with_m(lin)


@pytest.mark.parametrize("m, backend", [(8192, "w8a8"), (16, "w8a16")])
def test_pinned_backends_fix_the_choice_and_restore_auto(monkeypatch, m, backend):
    lin, dense = _auto_fp8_linear(monkeypatch), linear.Linear(torch.zeros(4, 4), None, torch.float32)
    with linear.pinned_backends([lin, dense], m) as pinned:
        assert pinned == [backend]
        assert lin.choose(1) == lin.choose(4096) == backend and dense.choose(1) == "dense"
    assert lin.backend == "auto" and lin.choose(1) == "w8a16" and dense.backend == "dense"
    with pytest.raises(RuntimeError):  # restored when the body fails too
        with linear.pinned_backends([lin], 8192):
            raise RuntimeError("boom")
    assert lin.backend == "auto"


def test_linear_backend_option_is_checked_against_the_backends():
    """--linear-backend (the CLI, before anything is read, and load_engine) takes linear.LINEAR_BACKENDS only."""
    from gpulab.core.errors import InputError

    for name in linear.LINEAR_BACKENDS:
        linear.check_backend_option(name)
    with pytest.raises(InputError, match="--linear-backend must be auto, dequant, w8a8, w8a16 or dequant-jit"):
        linear.check_backend_option("w4a16")
