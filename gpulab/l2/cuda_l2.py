"""Every cuda-python call of gpulab l2, in one small module (torch has no API for these).

Runtime (``cuda.bindings.runtime``):
  * the persisting-L2 set-aside: ``cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize)``;
  * an access-policy window on a stream (torch's stream handle): ``cudaStreamSetAttribute``;
  * ``cudaCtxResetPersistingL2Cache`` to demote persisting lines back to normal afterwards.
NVRTC + driver (``cuda.bindings.nvrtc`` / ``driver``; ``cuda.nvrtc`` / ``cuda.cuda`` in cuda-python < 12.6):
compile ``prefetch_l2.cu`` for the current device and launch its prefetch kernels on a given stream.

Nothing here runs without a GPU: the GPU tests (``@pytest.mark.gpu``) check each call. On the CPU, the prefetch
kernels run under the tests' CUDA C emulation, launched through ``PrefetchKernels.launch``, which checks the lines
and chunks they ask the L2 for (tests/l2/test_prefetch_cuda_c_on_cpu.py).
"""
from __future__ import annotations

import ctypes
import importlib
from pathlib import Path
from typing import Any, Iterable

from gpulab.core.errors import DeviceError

SOURCE = Path(__file__).with_name("prefetch_l2.cu")
PREFETCH_KERNELS = ("prefetch_l2", "prefetch_l2_evict_last", "prefetch_l2_bulk")


def _cuda_module(new: str, old: str, missing: str) -> Any:
    """cuda-python's ``cuda.bindings.<new>`` (>= 12.6) or ``cuda.<old>`` (< 12.6, which the cuda12 extra allows:
    12.4 and 12.5 have no ``cuda.bindings``); ``missing`` is the one-line DeviceError when neither imports."""
    for name in (f"cuda.bindings.{new}", f"cuda.{old}"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise DeviceError(missing)


def _rt():
    return _cuda_module("runtime", "cudart", "L2 policies need cuda-python (pip install 'gpulab[cuda13]')")


def _nvrtc():
    return _cuda_module("nvrtc", "nvrtc", "NVRTC (cuda.bindings.nvrtc) is not available")


def _driver():
    return _cuda_module("driver", "cuda", "the prefetch kernels need cuda-python (cuda.bindings.nvrtc/driver)")


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (err, *values): raise a one-line DeviceError on failure, return the values."""
    if not isinstance(result, tuple):
        result = (result,)
    err, rest = result[0], result[1:]
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise DeviceError(f"{what} failed: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


# --- runtime: persisting L2 ------------------------------------------------------------------

def device_limits(device: int | None = None) -> dict[str, int]:
    """L2 size, persisting maximum and access-policy window maximum of a device, in bytes."""
    cudart = _rt()
    if device is None:
        device = _check(cudart.cudaGetDevice(), "cudaGetDevice")
    prop = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return {"l2_bytes": int(prop.l2CacheSize), "persisting_l2_max_bytes": int(prop.persistingL2CacheMaxSize),
            "access_policy_max_window_bytes": int(prop.accessPolicyMaxWindowSize),
            "compute_capability": int(prop.major) * 10 + int(prop.minor)}


def get_persisting_limit() -> int:
    cudart = _rt()
    return int(_check(cudart.cudaDeviceGetLimit(cudart.cudaLimit.cudaLimitPersistingL2CacheSize),
                      "cudaDeviceGetLimit(cudaLimitPersistingL2CacheSize)"))


def set_persisting_limit(nbytes: int) -> None:
    cudart = _rt()
    _check(cudart.cudaDeviceSetLimit(cudart.cudaLimit.cudaLimitPersistingL2CacheSize, int(nbytes)),
           f"cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, {int(nbytes)})")


def reset_persisting_lines() -> None:
    cudart = _rt()
    _check(cudart.cudaCtxResetPersistingL2Cache(), "cudaCtxResetPersistingL2Cache")


def _window_value(base_ptr: int, num_bytes: int, hit_ratio: float, persisting: bool):
    cudart = _rt()
    value = cudart.cudaStreamAttrValue()
    w = value.accessPolicyWindow
    w.base_ptr = int(base_ptr)
    w.num_bytes = int(num_bytes)
    w.hitRatio = float(hit_ratio)
    w.hitProp = (cudart.cudaAccessProperty.cudaAccessPropertyPersisting if persisting
                 else cudart.cudaAccessProperty.cudaAccessPropertyNormal)
    w.missProp = (cudart.cudaAccessProperty.cudaAccessPropertyStreaming if persisting
                  else cudart.cudaAccessProperty.cudaAccessPropertyNormal)
    value.accessPolicyWindow = w
    return value


def synchronize_device() -> None:
    _check(_rt().cudaDeviceSynchronize(), "cudaDeviceSynchronize")


def _window_attr(cudart: Any) -> Any:
    """The access-policy-window stream attribute id: cuda-python 12.6+ names it in cudaStreamAttrID as a launch
    attribute; older releases as cudaStreamAttributeAccessPolicyWindow (an AttributeError there, not a
    DeviceError, would have escaped the installability check)."""
    for holder, name in ((getattr(cudart, "cudaStreamAttrID", None), "cudaLaunchAttributeAccessPolicyWindow"),
                         (getattr(cudart, "cudaLaunchAttributeID", None), "cudaLaunchAttributeAccessPolicyWindow"),
                         (getattr(cudart, "cudaStreamAttrID", None), "cudaStreamAttributeAccessPolicyWindow"),
                         (cudart, "cudaStreamAttributeAccessPolicyWindow")):
        if holder is not None and hasattr(holder, name):
            return getattr(holder, name)
    raise DeviceError("this cuda-python has no access-policy-window stream attribute")


def set_access_policy_window(stream_handle: int, base_ptr: int, num_bytes: int, hit_ratio: float) -> None:
    """Install a persisting window on a stream (``torch.cuda.Stream.cuda_stream``): later kernels on it
    mark ``hit_ratio`` of the accesses to ``[base_ptr, base_ptr + num_bytes)`` persisting."""
    if not 0.0 <= hit_ratio <= 1.0:
        raise DeviceError(f"hitRatio must be in [0, 1], got {hit_ratio}")
    cudart = _rt()
    _check(cudart.cudaStreamSetAttribute(cudart.cudaStream_t(int(stream_handle)),
                                         _window_attr(cudart),
                                         _window_value(base_ptr, num_bytes, hit_ratio, True)),
           "cudaStreamSetAttribute(accessPolicyWindow)")


def clear_access_policy_window(stream_handle: int) -> None:
    """Remove the window (num_bytes = 0, normal properties)."""
    cudart = _rt()
    _check(cudart.cudaStreamSetAttribute(cudart.cudaStream_t(int(stream_handle)),
                                         _window_attr(cudart),
                                         _window_value(0, 0, 0.0, False)),
           "cudaStreamSetAttribute(accessPolicyWindow, cleared)")


def get_access_policy_window(stream_handle: int) -> dict[str, Any]:
    cudart = _rt()
    value = _check(cudart.cudaStreamGetAttribute(cudart.cudaStream_t(int(stream_handle)),
                                                 _window_attr(cudart)),
                   "cudaStreamGetAttribute(accessPolicyWindow)")
    w = value.accessPolicyWindow
    return {"base_ptr": int(w.base_ptr), "num_bytes": int(w.num_bytes), "hit_ratio": float(w.hitRatio),
            "hit_prop": getattr(w.hitProp, "name", str(w.hitProp)),
            "miss_prop": getattr(w.missProp, "name", str(w.missProp))}


class PersistingL2:
    """Context manager: set aside persisting L2, install one window on the given streams; on exit clear
    the windows, demote persisting lines (cudaCtxResetPersistingL2Cache) and restore the old limit.

    Install it before capturing a CUDA graph: captured kernel nodes take the stream's window."""

    def __init__(self, set_aside_bytes: int, base_ptr: int, window_bytes: int, hit_ratio: float,
                 streams: Iterable[int]):
        self.set_aside_bytes = int(set_aside_bytes)
        self.base_ptr = int(base_ptr)
        self.window_bytes = int(window_bytes)
        self.hit_ratio = float(hit_ratio)
        self.streams = [int(s) for s in streams]
        self._old_limit: int | None = None
        self.granted_bytes: int | None = None  # the set-aside the driver reports after setting it
        self.installed_hit_ratio: float | None = None

    def __enter__(self) -> "PersistingL2":
        self._old_limit = get_persisting_limit()
        set_persisting_limit(self.set_aside_bytes)
        try:
            # the driver may set aside less than asked (its granularity, MIG): the window's persisting share
            # must fit what it granted, so hitRatio is at most granted / window
            self.granted_bytes = get_persisting_limit()
            ratio = self.hit_ratio
            if self.window_bytes > 0:
                ratio = min(ratio, self.granted_bytes / self.window_bytes)
            self.installed_hit_ratio = ratio
            for s in self.streams:
                set_access_policy_window(s, self.base_ptr, self.window_bytes, ratio)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        errors = []
        try:  # the queued kernels first: a reset while they run would let them mark lines persisting again
            synchronize_device()
        except DeviceError as e:
            errors.append(e)
        for s in self.streams:
            try:
                clear_access_policy_window(s)
            except DeviceError as e:
                errors.append(e)
        for fn in (reset_persisting_lines, lambda: set_persisting_limit(self._old_limit or 0)):
            try:
                fn()
            except DeviceError as e:
                errors.append(e)
        if errors and exc[0] is None:
            raise errors[0]


# --- NVRTC + driver: the prefetch kernels ------------------------------------------------------

class PrefetchKernels:
    """``prefetch_l2.cu`` compiled with NVRTC for the current device and loaded with the driver API."""

    def __init__(self, device: int | None = None):
        driver = _driver()
        self._driver = driver
        _check(_rt().cudaFree(0), "cudaFree(0)")  # make the primary context (torch's) current in this thread
        limits = device_limits(device)
        self.arch = limits["compute_capability"]
        self.cubin = compile_cubin(SOURCE.read_text(), self.arch)
        self.module = _check(driver.cuModuleLoadData(self.cubin), "cuModuleLoadData(prefetch_l2)")
        self.functions = {name: _check(driver.cuModuleGetFunction(self.module, name.encode()),
                                       f"cuModuleGetFunction({name})")
                          for name in PREFETCH_KERNELS}

    def available(self, kind: str) -> bool:
        return {"prefetch_l2": True, "prefetch_l2_evict_last": self.arch >= 80,
                "prefetch_l2_bulk": self.arch >= 90}.get(kind, False)

    def launch(self, kind: str, ptr: int, nbytes: int, stream_handle: int, blocks: int = 8,
               threads: int = 256) -> None:
        if kind not in self.functions:
            raise DeviceError(f"unknown prefetch kernel {kind!r} (known: {', '.join(PREFETCH_KERNELS)})")
        if nbytes <= 0:
            return
        if kind == "prefetch_l2_bulk" and int(ptr) % 16:
            raise DeviceError("prefetch_l2_bulk needs a 16-byte aligned address")
        d = self._driver
        args = ((int(ptr), int(nbytes)), (ctypes.c_void_p, ctypes.c_ulonglong))
        _check(d.cuLaunchKernel(self.functions[kind], int(blocks), 1, 1, int(threads), 1, 1, 0,
                                d.CUstream(int(stream_handle)), args, 0), f"cuLaunchKernel({kind})")


def compile_cubin(source: str, arch: int, name: str = "prefetch_l2.cu",
                  options: tuple[str, ...] = ("-default-device",)) -> bytes:
    """NVRTC-compile CUDA C (``name`` in messages) to a cubin for ``sm_<arch>`` with ``options``."""
    nvrtc = _nvrtc()
    try:
        prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    except RuntimeError as e:  # libnvrtc not found
        raise DeviceError(f"NVRTC is not usable: {str(e).splitlines()[0]}") from None
    opts = [f"--gpu-architecture=sm_{arch}".encode(), *(o.encode() for o in options)]
    err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    if int(err) != 0:
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = _out_buffer(size)
        nvrtc.nvrtcGetProgramLog(prog, log)
        first = log.decode(errors="replace").strip().splitlines()[:1] or [getattr(err, "name", str(err))]
        raise DeviceError(f"NVRTC could not compile {name} for sm_{arch}: {first[0]}")
    size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = _out_buffer(size)
    _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    nvrtc.nvrtcDestroyProgram(prog)
    return cubin[:size]


def _out_buffer(size: int) -> bytes:
    """A fresh bytes object for NVRTC to write into. Never ``b" " * size``: for size 1 that is CPython's
    interned one-byte object, and NVRTC overwriting it corrupts every ``b" "`` in the process."""
    return bytes(bytearray(max(int(size), 2)))
