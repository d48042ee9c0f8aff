"""NVML reads for the records, against a stand-in pynvml: PCI matching, counters over a run, the thermal note."""
import sys
import types

import pytest

from gpulab.core import device, nvml, results

PCI = [(0, 0x3B, 0), (0, 0x5E, 0)]


def fake_pynvml(energy=(1000, 5000), power_ns=(0, 0), thermal_ns=(0, 0), unsupported=()):
    """Two GPUs in NVML's (PCI) order; counters per device; names in ``unsupported`` raise as NVML does."""
    nv = types.ModuleType("pynvml")
    nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM = 0, 1
    nv.calls = []
    nv.nvmlInit = lambda: nv.calls.append("init")
    nv.nvmlShutdown = lambda: nv.calls.append("shutdown")
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(domain=PCI[h][0], bus=PCI[h][1], device=PCI[h][2])
    nv.nvmlSystemGetDriverVersion = lambda: b"580.1"

    def maybe(name, value):
        if name in unsupported:
            raise RuntimeError(f"NVML_ERROR_NOT_SUPPORTED: {name}")
        return value

    nv.nvmlDeviceGetTotalEnergyConsumption = lambda h: maybe("energy", energy[h])
    nv.nvmlDeviceGetViolationStatus = lambda h, policy: types.SimpleNamespace(
        violationTime=maybe("violation", (power_ns if policy == nvml.PERF_POLICY_POWER else thermal_ns)[h]))
    nv.nvmlDeviceGetClockInfo = lambda h, kind: 1000 + 100 * h + kind
    nv.nvmlDeviceGetMaxClockInfo = lambda h, kind: 2000 + 100 * h + kind
    nv.nvmlDeviceGetPowerManagementLimit = lambda h: 700_000 if h == 1 else 350_000
    return nv


def test_snapshot_keys_every_device_by_pci(monkeypatch):
    nv = fake_pynvml(thermal_ns=(7, 8))
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    snap = nvml.snapshot()
    assert snap == {PCI[0]: {"energy_mj": 1000, "power_limited_ns": 0, "thermal_limited_ns": 7},
                    PCI[1]: {"energy_mj": 5000, "power_limited_ns": 0, "thermal_limited_ns": 8}}
    assert nv.calls == ["init"]  # NVML stays open for the next snapshot
    nvml.snapshot()
    assert nv.calls == ["init"]


def test_unsupported_counters_are_left_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(unsupported=("energy",)))
    assert nvml.snapshot()[PCI[0]] == {"power_limited_ns": 0, "thermal_limited_ns": 0}


def test_no_nvml_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert nvml.snapshot() is None
    assert nvml.during(None, None, PCI[0], 1.0) is None


def test_during_matches_the_used_device():
    start = {PCI[0]: {"energy_mj": 0, "power_limited_ns": 0, "thermal_limited_ns": 0},
             PCI[1]: {"energy_mj": 1_000, "power_limited_ns": 5, "thermal_limited_ns": 0}}
    end = {PCI[0]: {"energy_mj": 999_999, "power_limited_ns": 0, "thermal_limited_ns": 0},
           PCI[1]: {"energy_mj": 701_000, "power_limited_ns": 2_500_000_005, "thermal_limited_ns": 100}}
    got = nvml.during(start, end, PCI[1], 2.0)
    assert got == {"energy_j": 700.0, "power_limited_s": 2.5, "thermal_limited_s": 0.0, "mean_power_w": 350.0}
    assert nvml.during(start, end, (0, 1, 0), 2.0) is None  # not an NVML device
    assert nvml.during(start, end, None, 2.0) is None  # torch did not use a GPU
    back = {PCI[1]: {"energy_mj": 10, "power_limited_ns": 5}}  # a counter reset: left out
    assert nvml.during(start, back, PCI[1], 2.0) == {"power_limited_s": 0.0}


def test_handle_and_info_follow_the_pci_address(monkeypatch):
    """torch's device 0 is NVML's device 1 (as under CUDA_VISIBLE_DEVICES=1): the probe reports device 1."""
    nv = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setattr(nvml, "torch_pci", lambda index=None: PCI[1])
    assert nvml.handle_for(nv, 0) == 1
    info = device._nvml_info(0)
    assert info["sm_clock_mhz"] == 1100 and info["power_limit_w"] == 700.0 and info["driver"] == "580.1"
    monkeypatch.setattr(nvml, "torch_pci", lambda index=None: None)  # torch cannot say: NVML's own index
    assert nvml.handle_for(nv, 0) == 0 and device._nvml_info(0)["power_limit_w"] == 350.0


def test_torch_pci_never_starts_cuda(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert nvml.torch_pci() is None
    calls = []

    def spy(name, value=None):
        return lambda *a: calls.append(name) or value

    cuda = types.SimpleNamespace(is_initialized=lambda: False, init=spy("init"), current_device=spy("current_device", 0),
                                 get_device_properties=spy("get_device_properties"), is_available=spy("is_available"))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert nvml.torch_pci() is None and calls == []
    cuda.is_initialized = lambda: True  # once torch has started CUDA: the current device's PCI address
    cuda.get_device_properties = lambda i: types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x5E, pci_device_id=0)
    assert nvml.torch_pci() == PCI[1] and calls == ["current_device"]


@pytest.mark.parametrize("thermal_ns, noted", [(0, False), (4 * 10**9, True)])
def test_record_carries_the_counters_and_a_thermal_note(monkeypatch, tmp_path, thermal_ns, noted):
    snaps = iter([{PCI[0]: {"energy_mj": 0, "thermal_limited_ns": 0}},
                  {PCI[0]: {"energy_mj": 50_000, "thermal_limited_ns": thermal_ns}}])
    monkeypatch.setattr(nvml, "snapshot", lambda: next(snaps))
    monkeypatch.setattr(nvml, "torch_pci", lambda index=None: PCI[0])
    rec = results.Record("x", device={"backend": "cuda"})
    rec.finished = rec.started + __import__("datetime").timedelta(seconds=10)
    data = results.load(rec.save(tmp_path))
    assert data["gpu_counters"]["energy_j"] == 50.0 and data["gpu_counters"]["mean_power_w"] == 5.0
    assert any("held down by temperature for 4.0 s of this 10.0 s run" in n for n in data["notes"]) == noted


def test_record_without_nvml_has_none(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    data = results.load(results.Record("x", device={"backend": "cpu"}).save(tmp_path))
    assert data["gpu_counters"] is None


@pytest.mark.gpu
def test_counters_on_the_gpu():
    """On the device: torch's device is found among NVML's, and a second of matmuls uses energy."""
    import time

    import torch

    pytest.importorskip("pynvml")
    start = nvml.snapshot()
    assert start, "NVML gave no devices"
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    pci = nvml.torch_pci()
    assert pci in start, (pci, list(start))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    got = nvml.during(start, nvml.snapshot(), pci, time.perf_counter() - t0)
    assert got is not None and got.get("energy_j", 1.0) > 0, got
