"""NVRTC, the compiler cupy.RawModule runs on the GPU machine, here on the CPU (cuda-python's bindings and the
libnvrtc of the CUDA wheels): a source that nvcc builds can still fail NVRTC (no host headers, other defaults),
and on the GPU that would be found only inside a device run."""
from __future__ import annotations

import pytest


def nvrtc_cubin(source: str, name: str, arch: int, options: tuple[str, ...] = ("--std=c++17",)) -> bytes:
    """``source`` compiled by NVRTC for sm_<arch> with cupy's options (gpulab passes --std=c++17), as a cubin,
    through gpulab.l2's NVRTC compile; skips where cuda-python or libnvrtc is missing, fails with NVRTC's first
    error line when the source does not compile."""
    from gpulab.core.errors import DeviceError
    from gpulab.l2.cuda_l2 import compile_cubin

    try:
        return compile_cubin(source, arch, name, options)
    except DeviceError as e:
        if "not available" in str(e) or "not usable" in str(e):
            pytest.skip(str(e))
        raise AssertionError(str(e)) from None
