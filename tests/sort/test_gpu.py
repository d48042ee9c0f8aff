"""On a GPU: every CUDA C variant equals numpy exactly (all dtypes, distributions, orders, key-value)."""
import numpy as np
import pytest

from gpulab.sort import keys as K
from gpulab.sort import reference as ref
from gpulab.sort.bench import DISTS, BenchArgs, make_data, run
from gpulab.sort.schedule import VARIANTS

pytestmark = pytest.mark.gpu
SIZES = [0, 1, 2, 3, 1023, 1024, 1025, 4097, 8191, 8193, 70001, 1 << 17, 1_000_003]


@pytest.fixture(scope="module")
def cuda():
    cp = pytest.importorskip("cupy")
    from gpulab.sort.cuda_sort import BitonicCuda

    return cp, BitonicCuda()


def inputs(n, dtype, rng):
    x = make_data(n, dtype, "uniform", seed=n)
    if dtype == "float32" and n >= 16:
        x[rng.integers(0, n, n // 10 + 1)] = np.nan
        x[rng.integers(0, n, 4)] = [np.inf, -np.inf, -0.0, 0.0]
    return x


def check(cp, bit, x, variants, order, kv):
    """Every variant against one reference (computed once: the numpy sorts dominate the run time)."""
    want_k = ref.sort(x, order)
    want_p = ref.argsort(x, order) if kv else None
    xc = cp.asarray(x)
    for variant in variants:
        k, p = bit.sort(xc, variant, order, kv)
        assert ref.mismatch(cp.asnumpy(k), want_k) is None, (variant, x.dtype, x.shape, order, kv)
        if kv:
            assert np.array_equal(cp.asnumpy(p), want_p), (variant, x.dtype, x.shape, order)


@pytest.mark.parametrize("dtype", K.DTYPES)
def test_sizes_orders_kv(cuda, dtype):
    cp, bit = cuda
    rng = np.random.default_rng(0)
    for n in SIZES:
        x = inputs(n, dtype, rng)
        for order in K.ORDERS:
            for kv in (False, True):
                check(cp, bit, x, list(VARIANTS), order, kv)


@pytest.mark.parametrize("dist", DISTS)
def test_distributions(cuda, dist):
    cp, bit = cuda
    for dtype in K.DTYPES:
        x = make_data(300_001, dtype, dist, seed=2)
        for order in K.ORDERS:
            check(cp, bit, x, list(VARIANTS), order, kv=(order == "asc"))


def test_fused_10m_int32(cuda):
    cp, bit = cuda
    x = make_data(10_000_000, "int32", "uniform", seed=9)
    check(cp, bit, x, ["bitonic-fused"], "asc", False)


def test_bench_gpu_pinned(out_dir):
    rec = run(BenchArgs(n=1 << 20, reps=3, transfer="pinned"))
    assert rec.ok, {k: v for k, v in rec.checks.items() if not v["passed"]}
    rows = {r["impl"]: r for r in rec.rows}
    assert rows["bitonic-fused"]["e2e_ms"] > 0 and rec.metrics["transfer"]["h2d_gbs"] > 0
