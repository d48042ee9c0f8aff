"""The CUDA hash aggregate (hash_join.cu's ha_* kernels, CudaHashAggregate): on this CPU the kernels themselves
run under the CUDA C emulation (tests/cuda_on_cpu) with the host code through fake_cupy, against pandas on
every join case, both modes, both build sides; on a GPU (-m gpu) with cupy, up to 200k rows."""
import numpy as np
import pytest

from gpulab.dbjoin import aggregate as A
from gpulab.dbjoin import hash_aggregate_cuda as hac
from gpulab.dbjoin import tables

from .cases import CASE_IDS
from .test_aggregate import case, payloads


def _check(result, args, mode="sum"):
    ok, detail = A.compare_agg(result, A.pandas_aggregate(*args, mode), mode)
    assert ok, detail


@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_hash_aggregate_cuda_c(cuda_c, dt, name):
    args = case(dt, name)
    module = cuda_c(len(args[0]) * 3 + len(args[2]))
    _check(hac.CudaHashAggregate().aggregate(*args), args)
    _check(hac.CudaHashAggregate(mode="count").aggregate(*args), args, "count")
    lk, lp, rk, rp = args  # the other table as the build side
    _check(hac.CudaHashAggregate(load_factor=0.9).aggregate(rk, rp, lk, lp), (rk, rp, lk, lp))
    assert module.launches > 0 or len(lk) == 0 or len(rk) == 0


@pytest.mark.parametrize("dt, dup, seed", [("int32", "unique", 0), ("int64", "zipf:1.1", 1)])
def test_hash_aggregate_cuda_c_several_blocks(cuda_c, dt, dup, seed):
    left, right = tables.generate(2500, 1800, 0.5, dup, seed, dt)
    args = (left.key, payloads(len(left), seed), right.key, payloads(len(right), seed + 7))
    cuda_c(seed)
    _check(hac.CudaHashAggregate().aggregate(*args), args)


def test_hash_aggregate_sums_wrap_modulo_2_64(cuda_c):
    """One key with 2^17 x 2^16 rows of payload INT32_MAX: the sums overflow int64 and wrap as pandas' do."""
    lk, rk = np.full(1 << 12, 5, np.int32), np.full(1 << 11, 5, np.int32)
    args = (lk, np.full(len(lk), np.iinfo(np.int32).max, np.int32), rk, np.full(len(rk), -7, np.int32))
    cuda_c(0)
    _check(hac.CudaHashAggregate().aggregate(*args), args)


def test_hash_aggregate_bad_input(cuda_c):
    from gpulab.core.errors import InputError

    cuda_c(0)
    z = np.zeros(3, np.int32)
    with pytest.raises(InputError, match="key and payload lengths differ: left 3 vs 2, right 3 vs 3"):
        hac.CudaHashAggregate().aggregate(z, z[:2], z, z)
    with pytest.raises(InputError, match="keys must be int32 or int64"):
        hac.CudaHashAggregate().aggregate(z.astype(np.float32), z, z, z)
    with pytest.raises(InputError, match="--aggregate"):
        hac.CudaHashAggregate(mode="max")


def test_table_layout_matches_source():
    from gpulab.dbjoin.hash_join_cuda import SOURCE_PATH

    text = SOURCE_PATH.read_text()
    assert "struct AggSlot { unsigned long long key; unsigned int cnt_b; unsigned int cnt_p; unsigned long long sum_b;" \
        in text and hac.AGG_SLOT_BYTES == 32
    assert hac.table_words(10) * 8 == 11 * 32 + 8
    for name in hac.KERNELS:
        assert f"ha_{name}_##SUFFIX" in text


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_hash_aggregate_gpu(dt):
    import cupy as cp

    for name in ("dup-both-negative", "sentinel", "sentinel-only", "zipf", "all-match", "no-match", "left-empty"):
        args = case(dt, name)
        _check(hac.CudaHashAggregate().aggregate(*(cp.asarray(a) for a in args)), args)
    left, right = tables.generate(200_000, None, 0.5, "unique", 0, dt)  # 1M runs in the bench step
    args = (left.key, left.payload, right.key, right.payload)
    ref = A.pandas_aggregate(*args, how="pre")
    got = hac.CudaHashAggregate().aggregate(*(cp.asarray(a) for a in args))
    assert A.compare_agg(got, ref)[0]
    got = hac.CudaHashAggregate(mode="count").aggregate(*(cp.asarray(a) for a in args))
    assert A.compare_agg(got, ref, "count")[0]
