"""On a GPU: every CUDA C variant equals numpy exactly (all dtypes, distributions, orders, key-value), and so
does the chunked pipelined host sort (pinned and pageable)."""
import numpy as np
import pytest

from gpulab.sort import keys as K
from gpulab.sort import reference as ref
from gpulab.sort.bench import DISTS, BenchArgs, make_data, run
from gpulab.sort.schedule import TUNE_CONFIGS, VARIANTS

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


@pytest.mark.parametrize("dtype", K.DTYPES)
def test_tune_configs(cuda, dtype):
    """Every configuration that ``sort bench --tune`` times, at sizes that cross its tiles and fused passes."""
    cp, bit = cuda
    names = [f"bitonic-fused@{c}" for c in TUNE_CONFIGS]
    for n in (3, 1025, 16385, 70001, 1_000_003):
        x = inputs(n, dtype, np.random.default_rng(n))
        for order in K.ORDERS:
            for kv in (False, True):
                check(cp, bit, x, names, order, kv)


def test_fused_10m_int32(cuda):
    cp, bit = cuda
    x = make_data(10_000_000, "int32", "uniform", seed=9)
    check(cp, bit, x, ["bitonic-fused"], "asc", False)


# (variant, n, dtype, chunks, order, kv): several chunks with a partial last one, one chunk, 64 chunks
HOST_CASES = [
    ("bitonic-fused", 70001, "int32", 8, "asc", True),
    ("bitonic-fused", 70001, "float32", 4, "desc", True),
    ("bitonic-fused", 16385, "uint32", 2, "asc", False),
    ("bitonic-fused", 1_000_003, "int64", 64, "asc", True),
    ("bitonic-fused", 5000, "int32", 1, "desc", True),
    ("bitonic-shared", 5000, "float32", 4, "asc", True),
    ("bitonic-shared", 1 << 17, "int32", 16, "desc", False),
    ("bitonic-global", 1025, "int64", 8, "asc", True),
]


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
def test_sort_host_pipelined(cuda, pinned):
    """The chunked pipelined host -> host sort equals numpy exactly (keys and the stable permutation)."""
    cp, bit = cuda
    import cupyx

    rng = np.random.default_rng(1)
    for variant, n, dtype, chunks, order, kv in HOST_CASES:
        x = inputs(n, dtype, rng)
        alloc = (lambda dt: cupyx.empty_pinned((n,), dtype=dt)) if pinned else (lambda dt: np.empty(n, dtype=dt))
        hin, hout = alloc(x.dtype), alloc(x.dtype)
        hin[:] = x
        perm = alloc(np.uint32) if kv else None
        bit.sort_host(hin, hout, variant, order, chunks, perm)
        case = (variant, n, dtype, chunks, order, kv, pinned)
        assert ref.mismatch(hout, ref.sort(x, order)) is None, case
        if kv:
            assert np.array_equal(perm.astype(np.int64), ref.argsort(x, order)), case


def test_sort_host_chunk_smaller_than_tile(cuda):
    from gpulab.core.errors import InputError

    cp, bit = cuda
    x = np.arange(20000, dtype=np.int32)
    with pytest.raises(InputError, match="smaller than the"):
        bit.sort_host(x, np.empty_like(x), "bitonic-fused", "asc", 16)  # 2048-key chunks: below either tile


def test_bench_gpu_overlap(out_dir):
    for transfer, kv in (("pinned", False), ("pageable", True)):
        rec = run(BenchArgs(n=300_001, reps=3, transfer=transfer, kv=kv, overlap_chunks=4,
                            impl="bitonic-shared,bitonic-fused,numpy"))
        assert rec.ok, {k: v for k, v in rec.checks.items() if not v["passed"]}
        for row in rec.rows[:2]:
            assert row["overlap_correct"] is True and row["overlap_ms"] > 0 and row["e2e_ms"] > 0
        assert "bitonic-fused.overlap.correct" in rec.checks


def test_bench_gpu_pinned(out_dir):
    rec = run(BenchArgs(n=1 << 20, reps=3, transfer="pinned"))
    assert rec.ok, {k: v for k, v in rec.checks.items() if not v["passed"]}
    rows = {r["impl"]: r for r in rec.rows}
    assert rows["bitonic-fused"]["e2e_ms"] > 0 and rec.metrics["transfer"]["h2d_gbs"] > 0


def test_bench_gpu_kv_end_to_end_brings_the_permutation_back(out_dir):
    """With --kv every GPU implementation's end to end copies keys and permutation back, and both are checked."""
    rec = run(BenchArgs(n=100_003, reps=3, kv=True, order="desc", transfer="pageable",
                        impl="bitonic-fused,cupy,torch"))
    assert rec.ok, {k: v for k, v in rec.checks.items() if not v["passed"]}
    for impl in ("bitonic-fused", "cupy", "torch"):
        assert rec.checks[f"{impl}.e2e.correct"]["passed"]
    assert all(r["e2e_ms"] > 0 for r in rec.rows)


def test_pass_times_follow_the_schedule(cuda):
    """The per-kind split the bench records (passes_ms): one timed entry per launch kind of the schedule."""
    from gpulab.sort import schedule as S

    cp, bit = cuda
    x = cp.asarray(make_data(1_000_003, "int32", "uniform", seed=5))
    v = bit.effective_variant(S.get_variant("bitonic-fused"), 4, False)
    times = bit.pass_times(x, v, "asc", reps=2)
    want = {}
    for launch in S.schedule(1_000_003, v):
        kind = f"global_f{launch.fp}" if launch.kind == "global" else launch.kind
        want[kind] = want.get(kind, 0) + 1
    assert {k: t["launches"] for k, t in times.items()} == want and all(t["ms"] > 0 for t in times.values())


@pytest.mark.parametrize("variant, n, dtype, order, kv", [
    ("bitonic-fused", 1_000_003, "int32", "asc", False), ("bitonic-fused", 70001, "float32", "desc", True),
    ("bitonic-shared", 1 << 17, "int64", "asc", True), ("bitonic-global", 4097, "uint32", "desc", False)])
def test_sort_plan_graph(cuda, variant, n, dtype, order, kv):
    """SortPlan: CUDA accepts the capture, and every replay sorts what the bound buffer holds then."""
    from gpulab.sort.sort_plan import SortPlan

    cp, bit = cuda
    rng = np.random.default_rng(n)
    xc = cp.asarray(inputs(n, dtype, rng))
    plan = SortPlan(bit, xc, variant, order, kv)
    assert plan.graph is not None, plan.graph_error
    for round_ in range(3):
        if round_:
            xc[:] = cp.asarray(inputs(n, dtype, rng)[::-1].copy())
        k, p = plan.run()
        x = cp.asnumpy(xc)
        assert ref.mismatch(cp.asnumpy(k), ref.sort(x, order)) is None, round_
        if kv:
            assert np.array_equal(cp.asnumpy(p), ref.argsort(x, order)), round_


def test_bench_gpu_graph(out_dir):
    """sort bench --graph: the bitonic rows are graph replays, checked like the others, end to end too."""
    rec = run(BenchArgs(n=1 << 20, reps=5, graph=True, transfer="pinned",
                        impl="bitonic-shared,bitonic-fused,cupy"))
    assert rec.ok, {k: v for k, v in rec.checks.items() if not v["passed"]}
    rows = {r["impl"]: r for r in rec.rows}
    assert rows["bitonic-fused"]["timed"] == "graph replay" and rows["bitonic-shared"]["timed"] == "graph replay"
    assert rec.checks["bitonic-fused.e2e.correct"]["passed"]
