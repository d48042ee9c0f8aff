"""The CUDA C prefetch kernels compile for sm_80 and sm_90 (nvcc and NVRTC); no GPU needed."""
import shutil
import subprocess

import pytest

from gpulab.l2 import cuda_l2


@pytest.mark.parametrize("arch", [80, 90])
def test_nvcc_cubin(arch, tmp_path):
    nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if shutil.os.path.exists("/usr/local/bin/nvcc") else None)
    if not nvcc:
        pytest.skip("nvcc is not installed")
    out = tmp_path / f"pf{arch}.cubin"
    p = subprocess.run([nvcc, f"-arch=sm_{arch}", "-cubin", "-o", str(out), str(cuda_l2.SOURCE)],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF"
    for name in cuda_l2.PREFETCH_KERNELS:
        assert name.encode() in data


@pytest.mark.parametrize("arch", [80, 90])
def test_nvrtc_cubin(arch):
    try:
        cubin = cuda_l2.compile_cubin(cuda_l2.SOURCE.read_text(), arch)
    except Exception as e:  # libnvrtc missing on this machine
        pytest.skip(f"NVRTC unavailable: {e}")
    assert cubin[:4] == b"\x7fELF"
    assert all(n.encode() in cubin for n in cuda_l2.PREFETCH_KERNELS)


def test_nvrtc_error_is_one_line():
    from gpulab.core.errors import DeviceError
    try:
        cuda_l2.compile_cubin("extern \"C\" __global__ void k() { this is not C++; }", 80)
    except DeviceError as e:
        assert "\n" not in str(e) and "sm_80" in str(e)
    except Exception as e:
        pytest.skip(f"NVRTC unavailable: {e}")
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
