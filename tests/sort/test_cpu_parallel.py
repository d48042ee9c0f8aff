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
