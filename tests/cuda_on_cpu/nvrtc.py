"""NVRTC, the compiler cupy.RawModule runs on the GPU machine, here on the CPU (cuda-python's bindings and the
libnvrtc of the CUDA wheels): a source that nvcc builds can still fail NVRTC (no host headers, other defaults),
and on the GPU that would be found only inside a device run."""
from __future__ import annotations

import pytest


def nvrtc_cubin(source: str, name: str, arch: int, options: tuple[str, ...] = ("--std=c++17",)) -> bytes:
    """``source`` compiled by NVRTC for sm_<arch> with cupy's options (gpulab passes --std=c++17), as a cubin;
    skips where cuda-python or libnvrtc is missing; fails with NVRTC's log when the source does not compile."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        pytest.skip("cuda-python (cuda.bindings) is not installed")

    def check(result, what):
        err, *rest = result
        if int(err) != 0:
            raise AssertionError(f"{what}: {err}")
        return rest[0] if rest else None

    try:
        prog = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    except RuntimeError as e:  # libnvrtc not found
        pytest.skip(f"NVRTC is not usable here: {str(e).splitlines()[0]}")
    opts = [f"--gpu-architecture=sm_{arch}".encode(), *(o.encode() for o in options)]
    err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    log = bytes(bytearray(max(int(size), 2)))  # a fresh buffer (b" " * 1 would be CPython's interned object)
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert int(err) == 0, f"NVRTC could not compile {name} for sm_{arch}:\n{log.decode(errors='replace')[:3000]}"
    size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = bytes(bytearray(max(int(size), 2)))
    check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    nvrtc.nvrtcDestroyProgram(prog)
    return cubin[:size]
