"""NVML (nvidia-ml-py) reads for the records: which NVML device torch's device is, and the GPU's energy and
clock-limit counters over a run.

NVML numbers GPUs in PCI order and ignores ``CUDA_VISIBLE_DEVICES``; torch's device 0 under
``CUDA_VISIBLE_DEVICES=3`` is NVML's device 3. So a torch device is found in NVML by its PCI domain, bus and
device numbers, never by its index.

A run's counters (:func:`snapshot` at its start and end, :func:`during`) say what the clocks did while it ran:
the energy used and the time the driver held the clocks down for the power limit or for temperature
(``nvmlDeviceGetViolationStatus``: cumulative nanoseconds per policy). The start is taken for every NVML device,
without importing torch (a record starts before its command has touched the GPU); the end is matched to the
device the run used. Everything here returns None, never raises, where NVML or a counter is missing.
"""
from __future__ import annotations

import sys
from typing import Any

PERF_POLICY_POWER = 0  # nvmlPerfPolicyType_t: NVML_PERF_POLICY_POWER
PERF_POLICY_THERMAL = 1  # NVML_PERF_POLICY_THERMAL
THERMAL_NOTE_FRACTION = 0.005  # a run held down by temperature for more of its time than this gets a note
_nvml_open = None  # the pynvml module that snapshot() initialised (and keeps open)


def _pynvml():
    try:
        import pynvml  # nvidia-ml-py
    except Exception:
        return None
    return pynvml


def torch_pci(index: int | None = None) -> tuple[int, int, int] | None:
    """(domain, bus, device) of torch's CUDA device ``index`` (default: the current one), only where torch is
    already imported and has initialised CUDA (never imports torch or starts CUDA), else None."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return None
        p = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
        return int(p.pci_domain_id), int(p.pci_bus_id), int(p.pci_device_id)
    except Exception:
        return None


def _pci(nv, handle) -> tuple[int, int, int]:
    info = nv.nvmlDeviceGetPciInfo(handle)
    return int(info.domain), int(info.bus), int(info.device)


def handle_for(nv, index: int):
    """NVML's handle of torch's device ``index`` (by PCI address; NVML's own index ``index`` where torch cannot
    say, as on a machine whose one GPU is both). NVML must be initialised."""
    pci = torch_pci(index)
    if pci is not None:
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            if _pci(nv, h) == pci:
                return h
    return nv.nvmlDeviceGetHandleByIndex(index)


def _counters(nv, h) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, read in (("energy_mj", lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h)),
                      ("power_limited_ns", lambda: nv.nvmlDeviceGetViolationStatus(h, PERF_POLICY_POWER).violationTime),
                      ("thermal_limited_ns",
                       lambda: nv.nvmlDeviceGetViolationStatus(h, PERF_POLICY_THERMAL).violationTime)):
        try:
            out[key] = int(read())
        except Exception:  # not supported on this GPU (e.g. energy before Volta)
            pass
    return out


def snapshot() -> dict[tuple[int, int, int], dict[str, int]] | None:
    """Every NVML device's counters, keyed by PCI (domain, bus, device); None without NVML."""
    global _nvml_open
    nv = _pynvml()
    if nv is None:
        return None
    if _nvml_open is not nv:  # initialised once a process and left open (NVML counts its inits): without the
        try:                  # driver's persistence mode each init can cost the driver's start-up
            nv.nvmlInit()
        except Exception:
            return None
        _nvml_open = nv
    try:
        out = {}
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            out[_pci(nv, h)] = _counters(nv, h)
        return out
    except Exception:
        return None


def during(start: dict | None, end: dict | None, pci: tuple[int, int, int] | None,
           seconds: float) -> dict[str, Any] | None:
    """What the counters of device ``pci`` did between two snapshots: energy in J (and mean power in W over
    ``seconds``), seconds held down by the power limit and by temperature; None where the device or both
    snapshots are missing. A counter that went backwards (a driver reload) is left out."""
    if not start or not end or pci is None or pci not in start or pci not in end:
        return None
    a, b = start[pci], end[pci]
    out: dict[str, Any] = {}
    for key, name, scale in (("energy_mj", "energy_j", 1e-3), ("power_limited_ns", "power_limited_s", 1e-9),
                             ("thermal_limited_ns", "thermal_limited_s", 1e-9)):
        if key in a and key in b and b[key] >= a[key]:
            out[name] = round((b[key] - a[key]) * scale, 3)
    if "energy_j" in out and seconds > 0:
        out["mean_power_w"] = round(out["energy_j"] / seconds, 1)
    return out or None


def thermal_note(counters: dict[str, Any] | None, seconds: float) -> str | None:
    """A note for a record whose GPU was held down by temperature for a noticeable part of the run."""
    t = (counters or {}).get("thermal_limited_s")
    if t is None or seconds <= 0 or t <= THERMAL_NOTE_FRACTION * seconds:
        return None
    return (f"the GPU's clocks were held down by temperature for {t:.1f} s of this {seconds:.1f} s run: its "
            "timings may be below the card's sustained figures")
