"""The numba/threaded sample sort baseline against numpy."""
import numpy as np
import pytest

from gpulab.sort import cpu_parallel
from gpulab.sort import reference as ref
from gpulab.sort.bench import make_data


@pytest.mark.parametrize("dtype", ["int32", "uint32", "float32", "int64"])
def test_sample_sort_matches_numpy(dtype):
    rng = np.random.default_rng(5)
    for n in (0, 1, 1000, 70001):  # 70001 > the 65536 threshold: partition + bucket sorts
        x = make_data(n, dtype, "uniform", seed=n)
        if dtype == "float32" and n > 10:
            x[rng.integers(0, n, 50)] = np.nan
            x[:3] = [-0.0, np.inf, -np.inf]
        for order in ("asc", "desc"):
            got = cpu_parallel.sort(x, order)
            assert ref.mismatch(got, ref.sort(x, order)) is None, (dtype, n, order)


@pytest.mark.parametrize("dist", ["few-unique", "all-equal", "reversed"])
def test_sample_sort_skewed_inputs(dist):
    x = make_data(100_000, "int32", dist, seed=1)
    assert ref.mismatch(cpu_parallel.sort(x), ref.sort(x)) is None


@pytest.mark.parametrize("dtype", ["int32", "uint32", "float32", "int64"])
@pytest.mark.parametrize("dist", ["uniform", "few-unique"])
def test_key_value_sort_matches_stable_argsort(dtype, dist):
    """Keys and rows equal numpy's stable argsort (ties in input order, both orders), past the parallel threshold."""
    rng = np.random.default_rng(7)
    for n in (0, 5, 70001):
        x = make_data(n, dtype, dist, seed=n + 3)
        if dtype == "float32" and n > 10:
            x[rng.integers(0, n, 50)] = np.nan
            x[:4] = [-0.0, 0.0, np.inf, -np.inf]
        for order in ("asc", "desc"):
            keys, rows = cpu_parallel.argsort(x, order)
            want = ref.argsort(x, order)
            assert rows.dtype == np.int64
            assert ref.mismatch(rows, want) is None, (dtype, dist, n, order)
            assert ref.mismatch(keys, ref.sort(x, order)) is None, (dtype, dist, n, order)


def test_thread_count_is_positive():
    assert cpu_parallel.threads() >= 1


@pytest.mark.parametrize("fn", [cpu_parallel.sort, cpu_parallel.argsort])
@pytest.mark.parametrize("bad, msg", [([3, 1, 2], "expected an array, got list"),
                                      (np.zeros((2, 3), np.int32), "expected a 1-D array"),
                                      (np.zeros(3, np.float16), "unsupported dtype float16")])
def test_bad_input_is_an_input_error(fn, bad, msg):
    from gpulab.core.errors import InputError

    with pytest.raises(InputError, match=msg):
        fn(bad)
    with pytest.raises(InputError, match="order must be asc or desc"):
        fn(np.zeros(3, np.int32), "up")


@pytest.mark.parametrize("nthreads", [2, 5, 16, 64])  # 8, 32, 64 and 256 buckets: splitter trees of 3 to 8 levels
@pytest.mark.parametrize("dtype, order", [("float32", "asc"), ("float32", "desc"), ("uint32", "desc"),
                                          ("int32", "asc"), ("int64", "desc")])
def test_sample_sort_any_bucket_count(nthreads, dtype, order):
    """The partition at bucket counts other than this machine's: the Eytzinger search must put every key in the
    bucket of its rank, with NaN (a third of the float keys, so some splitters are NaN) in the last bucket, uint32
    keys compared unsigned (half above 2^31) and int64 keys signed; descending through the mirrored layout."""
    rng = np.random.default_rng(nthreads)
    n = 70_001
    if dtype == "float32":
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.random(n) < 0.34] = np.nan
        x[:6] = [-0.0, 0.0, np.inf, -np.inf, np.nan, 1.0]
    elif dtype == "uint32":
        x = rng.integers(0, 2**32, n, dtype=np.uint32)
    elif dtype == "int32":
        x = rng.integers(-5, 5, n).astype(np.int32)  # few unique: splitters repeat
    else:
        x = rng.integers(-2**62, 2**62, n, dtype=np.int64)
    cpu_parallel.threads()  # builds the kernels
    got = cpu_parallel.sample_sort(x, nthreads, desc=order == "desc")
    assert ref.mismatch(got, ref.sort(x, order)) is None, (nthreads, dtype, order)


def test_byte_swapped_arrays_are_refused_as_by_every_sort():
    from gpulab.core.errors import InputError

    x = np.arange(70_001, dtype=np.int32)[::-1].astype(">i4")
    for fn in (cpu_parallel.sort, cpu_parallel.argsort):
        with pytest.raises(InputError, match="byte-swapped"):
            fn(x)


@pytest.mark.parametrize("nthreads", [2, 16])
def test_partition_balances_uniform_keys(nthreads):
    """Splitters at the sample's quantiles: on uniform keys no bucket holds twice its share (a tree of wrongly
    chosen splitters still sorts, so only this catches it), and the mirrored layout holds the same buckets."""
    x = np.random.default_rng(3).integers(-2**31, 2**31, 200_000).astype(np.int32)
    cpu_parallel.threads()
    out, starts = cpu_parallel._jit["partition"](x, nthreads, False)
    sizes = np.diff(starts)
    assert len(sizes) == max(8, 4 * nthreads) and sizes.sum() == len(x)
    assert sizes.max() < 2 * len(x) / len(sizes), sizes
    for b in range(len(sizes) - 1):  # every key of bucket b is <= every key of bucket b + 1
        assert out[starts[b]:starts[b + 1]].max() <= out[starts[b + 1]:starts[b + 2]].min()
    mirrored, starts_m = cpu_parallel._jit["partition"](x, nthreads, True)
    assert np.array_equal(starts_m, starts)
    n = len(x)
    for b in range(len(sizes)):
        lo, hi = starts[b], starts[b + 1]
        assert np.array_equal(np.sort(mirrored[n - hi:n - lo]), np.sort(out[lo:hi]))
