"""The CUDA C hash join: compiled by nvcc here (sm_90, sm_80); run against pandas on a GPU (-m gpu)."""
import shutil
import subprocess

import numpy as np
import pytest

from gpulab.dbjoin import reference, tables
from gpulab.dbjoin.hash_join_cuda import SOURCE_PATH

from .cases import CASE_IDS, CASES
from .test_cpu_joins import _check

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if shutil.os.path.exists("/usr/local/cuda/bin/nvcc") else None)
KERNELS = [f"hj_{k}_{t}" for k in ("fill", "insert", "group_alloc", "group_scatter", "probe") for t in ("i32", "i64")]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_nvcc_compiles_every_kernel(arch, tmp_path):
    cubin = tmp_path / f"hash_join_{arch}.cubin"
    proc = subprocess.run([NVCC, f"-arch={arch}", "-cubin", "-std=c++17", "-Werror", "all-warnings", "-o",
                           str(cubin), str(SOURCE_PATH)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = cubin.read_bytes()
    for name in KERNELS:  # extern "C": unmangled entry points that cupy.RawModule looks up
        assert name.encode() in data, f"{name} missing from the {arch} cubin"


def test_source_needs_no_headers():
    """NVRTC (cupy.RawModule) compiles it without a CUDA toolkit include path."""
    assert "#include" not in SOURCE_PATH.read_text()


def test_without_gpu_is_a_device_error():
    from gpulab.core.errors import DeviceError
    from gpulab.dbjoin.hash_join_cuda import CudaHashJoin

    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is visible")
    except ImportError:
        pass
    except Exception:
        pass
    with pytest.raises(DeviceError):
        CudaHashJoin().join(np.array([1], np.int32), np.array([1], np.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_cuda_hash_cases(dt, name):
    import torch

    from gpulab.dbjoin.hash_join_cuda import CudaHashJoin

    lk, rk = CASES[dt][name]
    res = CudaHashJoin().join(torch.from_numpy(lk).cuda(), torch.from_numpy(rk).cuda())
    _check(res, lk, rk)
    assert CudaHashJoin().join(torch.from_numpy(lk).cuda(), torch.from_numpy(rk).cuda(), count_only=True).count \
        == reference.output_size(lk, rk)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["int32", "int64"])
@pytest.mark.parametrize("dup,lf", [("unique", 0.5), ("unique", 0.9), ("zipf:0.7", 0.5), ("zipf:1.1", 0.25)])
def test_cuda_hash_large(dt, dup, lf):
    import cupy as cp

    from gpulab.dbjoin.hash_join_cuda import CudaHashJoin

    n = 1_000_000 if dup == "unique" else 30_000  # zipf: keep the output (pandas, sorting) small
    left, right = tables.generate(n, None if dup == "unique" else n // 2, 0.5, dup, 9, dt)
    # planted empty-marker keys on both sides
    left.key[:7] = np.iinfo(dt).min
    right.key[-3:] = np.iinfo(dt).min
    hj = CudaHashJoin(lf)
    res = hj.join(cp.asarray(left.key), cp.asarray(right.key))
    _check(res, left.key, right.key)
    if dup != "unique":
        assert hj.retries >= 1  # duplicates on the build side overflow the first capacity guess


@pytest.mark.gpu
def test_cuda_hash_agrees_with_cpu_model_on_output_set():
    import cupy as cp

    from gpulab.dbjoin.hash_join_cuda import CudaHashJoin
    from gpulab.dbjoin.hash_join_model import ModelHashJoin

    left, right = tables.generate(100_000, 80_000, 0.7, "zipf:0.9", 2, "int64")
    a = CudaHashJoin().join(cp.asarray(left.key), cp.asarray(right.key))
    b = ModelHashJoin().join(left.key, right.key)
    assert reference.compare(a, b, left.key, right.key)[0]
