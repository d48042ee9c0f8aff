"""Global CLI options (--device, --out, --debug), visible to every subcommand.

The root command stores them here; subcommands read them through :func:`get` and
resolve the device with :func:`resolve_device`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gpulab.core.errors import DeviceError

DEVICE_CHOICES = ("auto", "cuda", "cpu")


@dataclass
class GlobalOptions:
    device: str = "auto"
    out: Path = Path("results")
    debug: bool = False


def debug_from_env() -> bool:
    """GPULAB_DEBUG set to anything but empty or 0."""
    return os.environ.get("GPULAB_DEBUG", "") not in ("", "0")


_current = GlobalOptions(
    device=os.environ.get("GPULAB_DEVICE", "auto"),
    out=Path(os.environ.get("GPULAB_OUT", "results")),
    debug=debug_from_env(),
)


def get() -> GlobalOptions:
    return _current


def set_options(device: str | None = None, out: Path | str | None = None, debug: bool | None = None) -> GlobalOptions:
    if device is not None:
        if device not in DEVICE_CHOICES:
            raise DeviceError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
        _current.device = device
    if out is not None:
        _current.out = Path(out)
    if debug is not None:
        _current.debug = debug
    return _current


def cuda_available() -> bool:
    """True when torch sees a CUDA device (imports torch)."""
    try:
        import torch
    except Exception:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_device(requested: str | None = None, *, need_gpu: bool = False, what: str = "this command") -> str:
    """Return ``"cuda"`` or ``"cpu"`` for the requested device (default: the global --device).

    ``auto`` picks cuda when present. Asking for cuda without one, or calling with
    ``need_gpu=True`` on a machine without a GPU, raises a one-line :class:`DeviceError`.
    """
    req = requested or _current.device
    if req not in DEVICE_CHOICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {req!r}")
    has_cuda = cuda_available()
    if req == "cuda" and not has_cuda:
        raise DeviceError(f"--device cuda was asked for, but no CUDA GPU is visible ({what})")
    if need_gpu and (req == "cpu" or not has_cuda):
        raise DeviceError(f"{what} needs a CUDA GPU, and none is {'selected' if has_cuda else 'visible'}")
    if req == "auto":
        return "cuda" if has_cuda else "cpu"
    return req
