"""The CUDA C prefetch kernels compile for A100 (sm_80), RTX 30xx (sm_86), L40S / RTX 40xx (sm_89) and H100
(sm_90) (nvcc and NVRTC), the sm_90-only bulk prefetch only where it exists, and the prefetch kernels load
through the cuda-python < 12.6 module layout too; no GPU needed."""
import shutil
import subprocess
import sys
import types

import pytest

from gpulab.core.errors import DeviceError
from gpulab.l2 import cuda_l2

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if shutil.os.path.exists("/usr/local/bin/nvcc") else None)


def _nvcc(arch: int, kind: str, tmp_path) -> bytes:
    """prefetch_l2.cu compiled by nvcc for sm_<arch> to a cubin or PTX (``kind``); skips without nvcc."""
    if not NVCC:
        pytest.skip("nvcc is not installed")
    out = tmp_path / f"pf{arch}.{kind}"
    p = subprocess.run([NVCC, f"-arch=sm_{arch}", f"-{kind}", "-o", str(out), str(cuda_l2.SOURCE)],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_nvcc_cubin(arch, tmp_path):
    data = _nvcc(arch, "cubin", tmp_path)
    assert data[:4] == b"\x7fELF"
    for name in cuda_l2.PREFETCH_KERNELS:
        assert name.encode() in data


def _nvrtc_missing(e: DeviceError) -> bool:
    """compile_cubin's one-line errors for a machine without cuda-python or libnvrtc (not a compile failure)."""
    return "is not available" in str(e) or "is not usable" in str(e)


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_nvrtc_cubin(arch):
    try:
        cubin = cuda_l2.compile_cubin(cuda_l2.SOURCE.read_text(), arch)
    except DeviceError as e:  # cuda-python or libnvrtc missing on this machine (any other error fails)
        if not _nvrtc_missing(e):
            raise
        pytest.skip(f"NVRTC unavailable: {e}")
    assert cubin[:4] == b"\x7fELF"
    assert all(n.encode() in cubin for n in cuda_l2.PREFETCH_KERNELS)


def test_nvrtc_error_is_one_line():
    from gpulab.core.errors import DeviceError
    try:
        cuda_l2.compile_cubin("extern \"C\" __global__ void k() { this is not C++; }", 80)
    except DeviceError as e:
        if _nvrtc_missing(e):  # no cuda-python (the cuda12/cuda13 extra) or no libnvrtc
            pytest.skip(str(e))
        assert "\n" not in str(e) and "sm_80" in str(e)
    else:
        pytest.fail("bad source compiled")


def test_window_value_fields():
    try:
        v = cuda_l2._window_value(4096, 1 << 20, 0.25, True)
    except Exception as e:
        pytest.skip(f"cuda-python unavailable: {e}")
    w = v.accessPolicyWindow
    assert (int(w.base_ptr), int(w.num_bytes), w.hitRatio) == (4096, 1 << 20, 0.25)
    assert "Persisting" in w.hitProp.name and "Streaming" in w.missProp.name


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_arch_specific_ptx_is_guarded(arch, tmp_path):
    """cp.async.bulk.prefetch (sm_90+) is compiled out below sm_90 (the kernel is empty there, and
    PrefetchKernels.available says so); the evict_last hint (sm_80+) is kept on every target."""
    ptx = _nvcc(arch, "ptx", tmp_path).decode()
    assert ("cp.async.bulk.prefetch.L2" in ptx) == (arch >= 90)
    assert "prefetch.global.L2::evict_last" in ptx and "prefetch.global.L2 " in ptx


def _legacy_cuda_python(monkeypatch, driver, nvrtc):
    """Make the process look like cuda-python < 12.6 (the cuda12 extra allows 12.4 and 12.5): no
    cuda.bindings, the driver API as cuda.cuda, NVRTC as cuda.nvrtc."""
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # `import cuda.bindings` raises ImportError
    for name in ("driver", "nvrtc", "runtime"):
        monkeypatch.setitem(sys.modules, f"cuda.bindings.{name}", None)
    if driver is not None:
        monkeypatch.setitem(sys.modules, "cuda.cuda", driver)
    if nvrtc is not None:
        monkeypatch.setitem(sys.modules, "cuda.nvrtc", nvrtc)


def _real_nvrtc():
    try:
        from cuda.bindings import nvrtc
        nvrtc.nvrtcVersion()
    except Exception as e:  # noqa: BLE001 - cuda-python or libnvrtc missing here
        pytest.skip(f"NVRTC unavailable: {e}")
    return nvrtc


def test_nvrtc_and_driver_from_cuda_python_before_12_6(monkeypatch):
    nvrtc = _real_nvrtc()
    driver = types.ModuleType("cuda.cuda")
    _legacy_cuda_python(monkeypatch, driver, nvrtc)
    assert cuda_l2._nvrtc() is nvrtc and cuda_l2._driver() is driver
    cubin = cuda_l2.compile_cubin(cuda_l2.SOURCE.read_text(), 86)  # through cuda.nvrtc
    assert cubin[:4] == b"\x7fELF" and all(n.encode() in cubin for n in cuda_l2.PREFETCH_KERNELS)


def test_no_cuda_python_is_one_line_device_error(monkeypatch):
    _legacy_cuda_python(monkeypatch, None, None)
    monkeypatch.setitem(sys.modules, "cuda.cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.nvrtc", None)
    with pytest.raises(DeviceError, match="need cuda-python"):
        cuda_l2._driver()
    with pytest.raises(DeviceError, match="NVRTC .* is not available"):
        cuda_l2.compile_cubin("", 80)


@pytest.mark.parametrize("major,minor", [(8, 0), (8, 6), (8, 9), (9, 0)])
def test_prefetch_kernels_for_each_arch_with_legacy_modules(monkeypatch, major, minor):
    """PrefetchKernels on a (faked) device of each architecture, with cuda-python < 12.6 modules: NVRTC
    compiles for that sm_XY, the driver loads the cubin, and the bulk prefetch is offered on sm_90 only."""
    nvrtc = _real_nvrtc()
    loaded = {}

    def load(cubin):
        loaded["cubin"] = cubin
        return (0, "module")

    driver = types.ModuleType("cuda.cuda")
    driver.cuModuleLoadData = load
    driver.cuModuleGetFunction = lambda mod, name: (0, (mod, name))
    prop = types.SimpleNamespace(l2CacheSize=40 << 20, persistingL2CacheMaxSize=30 << 20,
                                 accessPolicyMaxWindowSize=128 << 20, major=major, minor=minor)
    rt = types.SimpleNamespace(cudaFree=lambda p: (0,), cudaGetDevice=lambda: (0, 0),
                               cudaGetDeviceProperties=lambda dev: (0, prop))
    _legacy_cuda_python(monkeypatch, driver, nvrtc)
    monkeypatch.setattr(cuda_l2, "_rt", lambda: rt)
    k = cuda_l2.PrefetchKernels()
    cc = major * 10 + minor
    assert k.arch == cc and loaded["cubin"][:4] == b"\x7fELF"
    assert set(k.functions) == set(cuda_l2.PREFETCH_KERNELS)
    assert k.available("prefetch_l2") and k.available("prefetch_l2_evict_last")
    assert k.available("prefetch_l2_bulk") == (cc >= 90)
