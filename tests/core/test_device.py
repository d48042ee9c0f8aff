import builtins

import pytest

from gpulab.core import device


def test_probe_fields():
    rec = device.probe()
    for key in ("backend", "gpu", "cpu", "python", "versions", "os"):
        assert key in rec
    assert rec["backend"] in ("cpu", "cuda")
    assert set(device.PACKAGES) <= set(rec["versions"])
    assert "CPU" in device.describe({"backend": "cpu", "cpu": {"model": "X", "usable_cores": 2}})
    assert device.describe({"backend": "cuda", "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}}) \
        == "NVIDIA H100 (sm_90)"


def test_probe_survives_missing_packages(monkeypatch):
    real_import = builtins.__import__

    def no_gpu_packages(name, *args, **kwargs):
        if name.split(".")[0] in ("torch", "pynvml", "cuda"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gpu_packages)
    device.probe.cache_clear()
    try:
        rec = device.probe()
    finally:
        device.probe.cache_clear()
    assert rec["backend"] == "cpu" and rec["gpu"] is None


def test_package_version_of_missing_package():
    assert device.package_version("surely-not-installed-pkg") is None


@pytest.mark.gpu
def test_probe_on_gpu_reports_l2():
    rec = device.probe()
    gpu = rec["gpu"]
    assert rec["backend"] == "cuda"
    assert gpu["l2_bytes"] and gpu["sm_count"] > 0 and gpu["compute_capability"]


@pytest.mark.gpu
def test_ceilings_on_gpu():
    from gpulab.core import ceilings

    assert ceilings.copy_bandwidth_gbs("cuda", nbytes=64 << 20, reps=3) > 0
    assert ceilings.h2d_bandwidth_gbs(True, nbytes=16 << 20, reps=3) > 0


@pytest.mark.parametrize("device,cc,want", [("cuda", (8, 0), True), ("cuda:1", (8, 9), True), ("cuda", (9, 0), True),
                                            ("cuda", (7, 5), False), ("cuda", (7, 0), False), ("cpu", (9, 0), False)])
def test_bf16_native_follows_the_hardware(monkeypatch, device, cc, want):
    """is_bf16_supported() says True on a T4/V100 too (emulation counts): vajra's activation dtype, seam's and
    kvstitch's bf16 autocast follow the compute capability instead."""
    import torch

    from gpulab.core.device import bf16_native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    assert bf16_native(device) is want
    assert bf16_native(torch.device(device)) is want


def test_version_release():
    from gpulab.core.device import version_release

    assert version_release("3.6.0+git1") == (3, 6, 0) and version_release("4.57.0.dev0") == (4, 57, 0)
    assert version_release("5.0.0rc1") == (5, 0, 0) and version_release("2.14.1+cu130") == (2, 14, 1)
    assert version_release("") == () and version_release(None) == () and version_release("dev") == ()


def test_sm_count_per_device_and_remembered(monkeypatch):
    """core.device.sm_count: 0 off CUDA; a CUDA device's SMs, asked once per device index (the current device
    where the device names none)."""
    import types

    import torch

    from gpulab.core import device as D

    assert D.sm_count("cpu") == 0 and D.sm_count(torch.device("cpu")) == 0
    asked = []
    monkeypatch.setattr(D, "_SM_COUNTS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: asked.append(i) or types.SimpleNamespace(multi_processor_count=100 + i))
    assert D.sm_count("cuda") == D.sm_count("cuda:1") == 101 and D.sm_count(torch.device("cuda", 0)) == 100
    assert asked == [1, 0]


def test_copy_bandwidth_counts_read_and_write(monkeypatch):
    """C4: a copy of N bytes moves 2N (read + write); the ceiling every frac_copy divides by is 2N / t."""
    from types import SimpleNamespace

    from gpulab.core import ceilings

    monkeypatch.setattr(ceilings, "benchmark", lambda fn, **kw: SimpleNamespace(median=2.0))  # ms
    nbytes = 4 << 20
    assert ceilings.copy_bandwidth_gbs("cpu", nbytes=nbytes, reps=1) == pytest.approx(2 * nbytes / 2e-3 / 1e9)
