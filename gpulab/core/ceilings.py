"""Measured ceilings of the current device, so that results can be reported as a fraction of them.

Each function measures one ceiling with :func:`gpulab.core.timing.benchmark`:
device-to-device copy (bytes read + bytes written per second), bf16 and fp8 matmul
throughput, pinned host-to-device bandwidth. On the CPU only the copy is measured.
"""
from __future__ import annotations

from typing import Any

from gpulab.core.timing import benchmark


def copy_bandwidth_gbs(device: str = "cuda", nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Large device-to-device copy, counting read + write bytes (GB/s, 1e9)."""
    import torch

    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = benchmark(lambda: dst.copy_(src), device=device, warmup=3, reps=reps)
    return 2 * n * 4 / (t.median * 1e-3) / 1e9


def matmul_tflops(dtype_name: str = "bf16", device: str = "cuda", size: int = 8192, reps: int = 20) -> float | None:
    """Square matmul throughput (TFLOP/s); fp8 through torch._scaled_mm; None where unsupported."""
    import torch

    if device != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    if dtype_name == "bf16":
        fn = lambda: a @ b  # noqa: E731
    elif dtype_name == "fp8":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9) or not hasattr(torch, "float8_e4m3fn"):
            return None
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major second operand
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        raise ValueError(dtype_name)
    try:
        t = benchmark(fn, device=device, warmup=3, reps=reps)
    except RuntimeError:
        return None
    return 2 * size**3 / (t.median * 1e-3) / 1e12


def h2d_bandwidth_gbs(pinned: bool = True, nbytes: int = 256 << 20, reps: int = 10) -> float | None:
    """Host-to-device copy bandwidth (GB/s) from pinned or pageable memory; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.random_(0, 255)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t = benchmark(lambda: dev.copy_(host, non_blocking=pinned), device="cuda", warmup=2, reps=reps)
    return nbytes / (t.median * 1e-3) / 1e9


def measure(device: str) -> dict[str, Any]:
    """All ceilings for this device (a few seconds on a GPU)."""
    if device == "cuda":
        return {
            "copy_gbs": copy_bandwidth_gbs("cuda"),
            "bf16_matmul_tflops": matmul_tflops("bf16"),
            "fp8_matmul_tflops": matmul_tflops("fp8"),
            "h2d_pinned_gbs": h2d_bandwidth_gbs(True),
            "h2d_pageable_gbs": h2d_bandwidth_gbs(False),
        }
    return {"copy_gbs": copy_bandwidth_gbs("cpu", nbytes=256 << 20, reps=5)}
