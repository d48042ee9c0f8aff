"""Device probe: what machine a result was measured on.

:func:`probe` never fails: on a machine without a GPU, or without torch, cuda-python,
NVML or any optional package, the matching fields are ``None`` and ``backend`` is ``cpu``.
"""
from __future__ import annotations

import os
import platform
import re
from functools import lru_cache
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "triton", "cupy", "numba", "numba-cuda", "flashinfer", "cuda-python", "transformers", "peft")
_DISTRIBUTIONS = {
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
    "flashinfer": ("flashinfer-python", "flashinfer"),
    "cuda-python": ("cuda-python", "cuda-bindings"),
}


def package_version(name: str) -> str | None:
    """Installed version of a distribution (without importing it), or None."""
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def version_release(version: str | None) -> tuple[int, ...]:
    """The leading numeric release of a version string ("3.6.0+git1" -> (3, 6, 0), "4.57.0.dev0" ->
    (4, 57, 0), "5.0.0rc1" -> (5, 0, 0)); () when unknown."""
    m = re.match(r"\d+(?:\.\d+)*", version or "")
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: Any) -> int:
    """SMs of a CUDA device (a torch device or its name; no index: the current device), 0 for any other device.
    A host-side property query, remembered per device: no device sync, so a kernel's grid may be sized with it
    during a CUDA-graph capture."""
    import torch

    d = torch.device(device)
    if d.type != "cuda":
        return 0
    index = d.index if d.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = int(torch.cuda.get_device_properties(index).multi_processor_count)
    return _SM_COUNTS[index]


def bf16_native(device: Any) -> bool:
    """Whether ``device`` (a torch device or its name) computes in bf16 natively: CUDA compute capability 8.0
    (Ampere) or newer. Older GPUs only emulate bf16, slowly (cuBLAS/cuDNN/flashinfer have no bf16 kernels
    there), though ``torch.cuda.is_bf16_supported()`` says True: it counts emulation."""
    import torch

    return str(device).startswith("cuda") and torch.cuda.get_device_capability(device)[0] >= 8


def cpu_info() -> dict[str, Any]:
    model = None
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                    break
    except Exception:  # the probe never fails
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"model": model or platform.processor() or None, "cores": os.cpu_count(), "usable_cores": usable}


def _cuda_runtime_props(index: int) -> dict[str, Any]:
    """L2 persistence limits through cuda-python (cuda.bindings.runtime), when installed."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]
    except Exception:
        return {}
    try:
        err, prop = cudart.cudaGetDeviceProperties(index)
        if int(err) != 0:
            return {}
        err, drv = cudart.cudaDriverGetVersion()
        err2, rt = cudart.cudaRuntimeGetVersion()
        return {
            "persisting_l2_max_bytes": int(prop.persistingL2CacheMaxSize),
            "access_policy_max_window_bytes": int(prop.accessPolicyMaxWindowSize),
            "l2_bytes": int(prop.l2CacheSize),
            "cuda_driver_api": int(drv) if int(err) == 0 else None,
            "cuda_runtime": int(rt) if int(err2) == 0 else None,
        }
    except Exception:
        return {}


def _nvml_info(index: int) -> dict[str, Any]:
    """Driver, clocks and power limit of torch's device ``index`` from NVML (found by its PCI address: NVML
    ignores CUDA_VISIBLE_DEVICES), or {}."""
    from gpulab.core import nvml

    pynvml = nvml._pynvml()
    if pynvml is None:
        return {}
    try:
        pynvml.nvmlInit()
        h = nvml.handle_for(pynvml, index)
        drv = pynvml.nvmlSystemGetDriverVersion()
        out = {
            "driver": drv.decode() if isinstance(drv, bytes) else drv,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "max_mem_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0,
        }
        pynvml.nvmlShutdown()
        return out
    except Exception:
        return {}


def _gpu_info() -> dict[str, Any] | None:
    try:
        import torch
    except Exception:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        gpu: dict[str, Any] = {
            "index": index,
            "count": torch.cuda.device_count(),
            "name": p.name,
            "compute_capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count,
            "memory_bytes": int(total),
            "memory_free_bytes": int(free),
            "l2_bytes": int(getattr(p, "L2_cache_size", 0)) or None,
            "persisting_l2_max_bytes": None,
            "access_policy_max_window_bytes": None,
            "torch_cuda": torch.version.cuda,
        }
        rt = _cuda_runtime_props(index)
        for k, v in rt.items():
            if v is not None and (gpu.get(k) is None or k != "l2_bytes"):
                gpu[k] = v
        gpu.update(_nvml_info(index))
        return gpu
    except Exception as e:  # a broken driver must not break the probe
        return {"error": f"{type(e).__name__}: {e}"}


@lru_cache(maxsize=1)
def probe() -> dict[str, Any]:
    """The device record written into every result (cached per process)."""
    gpu = _gpu_info()
    backend = "cuda" if gpu and "error" not in gpu else "cpu"
    return {
        "backend": backend,
        "gpu": gpu,
        "cpu": cpu_info(),
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in PACKAGES},
    }


def describe(record: dict[str, Any]) -> str:
    """One line naming the device of a probe record."""
    gpu = record.get("gpu") or {}
    if record.get("backend") == "cuda" and gpu.get("name"):
        return f"{gpu['name']} (sm_{str(gpu.get('compute_capability', '?')).replace('.', '')})"
    cpu = record.get("cpu") or {}
    return f"CPU: {cpu.get('model') or 'unknown'} x{cpu.get('usable_cores') or '?'}"
