"""Join-aggregate (COUNT/SUM per key): pandas merge+groupby == pandas groupby+merge == torch == Triton."""
import os

import numpy as np
import pytest

from gpulab.dbjoin import aggregate as A
from gpulab.dbjoin import reference, tables

from .cases import CASE_IDS, CASES

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()
interpreted = pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="no GPU and TRITON_INTERPRET is not 1")
I32 = np.iinfo(np.int32)


def payloads(n: int, seed: int) -> np.ndarray:
    """Random int32 payloads with the extremes mixed in (the limb split must be exact at both ends)."""
    p = np.random.default_rng(seed).integers(I32.min, I32.max, n, dtype=np.int32, endpoint=True)
    p[: min(n, 3)] = [I32.min, I32.max, -1][: min(n, 3)]
    return p


def case(dt: str, name: str):
    lk, rk = CASES[dt][name]
    return lk, payloads(len(lk), 1), rk, payloads(len(rk), 2)


def _assert_equal(result, ref, mode="sum"):
    ok, detail = A.compare_agg(result, ref, mode)
    assert ok, detail


def test_definition_by_hand():
    """count = cL*cR, sum_left = SL*cR, sum_right = SR*cL; keys on one side only are absent."""
    lk, lp = np.array([5, 5, -3, 9], np.int32), np.array([10, 20, 7, 1], np.int32)
    rk, rp = np.array([5, 5, 5, -3, 4], np.int32), np.array([1, 2, 3, -100, 8], np.int32)
    for res in (A.pandas_aggregate(lk, lp, rk, rp), A.pandas_aggregate(lk, lp, rk, rp, how="pre"),
                A.torch_aggregate(*(torch.from_numpy(x) for x in (lk, lp, rk, rp)))):
        c = res.numpy_sorted()
        assert c["key"].tolist() == [-3, 5]
        assert c["count"].tolist() == [1, 6]
        assert c["sum_left"].tolist() == [7, 90]
        assert c["sum_right"].tolist() == [-100, 12]


@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_pandas_plans_and_torch_agree(dt, name):
    lk, lp, rk, rp = case(dt, name)
    ref = A.pandas_aggregate(lk, lp, rk, rp)
    _assert_equal(A.pandas_aggregate(lk, lp, rk, rp, how="pre"), ref)
    _assert_equal(A.torch_aggregate(*(torch.from_numpy(x) for x in (lk, lp, rk, rp))), ref)
    cnt = A.pandas_aggregate(lk, lp, rk, rp, "count")
    assert cnt.sum_left is None
    _assert_equal(cnt, ref, "count")
    _assert_equal(A.torch_aggregate(*(torch.from_numpy(x) for x in (lk, lp, rk, rp)), mode="count"), ref, "count")
    assert int(np.sum(ref.numpy_sorted()["count"])) == reference.output_size(lk, rk)  # COUNT sums to |join|


class DeviceColumn:
    """Like a cupy array: np.asarray refuses it, .get() copies it to the host."""

    def __init__(self, a):
        self.a = np.asarray(a)

    def __array__(self, *args, **kw):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()`")

    def __len__(self):
        return len(self.a)

    def get(self):
        return self.a.copy()


def test_device_columns_are_read_with_get():
    """The CUDA hash aggregate returns cupy columns: comparing them must not need np.asarray."""
    lk, lp, rk, rp = case("int32", "dup-both-negative")
    ref = A.pandas_aggregate(lk, lp, rk, rp)
    c = ref.numpy_sorted()
    got = A.AggResult(*(DeviceColumn(c[n]) for n in ("key", "count", "sum_left", "sum_right")))
    _assert_equal(got, ref)


def test_compare_catches_differences():
    lk, lp, rk, rp = case("int32", "dup-both-negative")
    ref = A.pandas_aggregate(lk, lp, rk, rp)
    c = ref.numpy_sorted()
    for col in ("count", "sum_left", "sum_right"):
        bad = {k: v.copy() for k, v in c.items()}
        bad[col][3] += 1
        ok, detail = A.compare_agg(A.AggResult(**bad), ref)
        assert not ok and col in detail
    ok, _ = A.compare_agg(A.AggResult(c["key"][1:], c["count"][1:], c["sum_left"][1:], c["sum_right"][1:]), ref)
    assert not ok
    dup = A.AggResult(np.r_[c["key"][:-1], c["key"][0]], c["count"], c["sum_left"], c["sum_right"])
    assert not A.compare_agg(dup, ref)[0]


def _devs(*arrays):
    dev = "cuda" if HAS_CUDA else "cpu"
    return [torch.from_numpy(a).to(dev) for a in arrays]


# every corner case, but the large generated ones only once (interpreter time)
TC_CASES = [(dt, n) for dt, n in CASE_IDS if not (dt == "int64" and n in ("unique-half", "build-larger", "zipf"))]


# both ways of forming count and sum over the matches (the kernel's AGG_DOT): "dot", a second tl.dot (the GPU's
# form for int8 aggregate products), and "sum", int64 reductions (fp16/bf16/fp32); fp32 codes take either here
AGG_PRODUCTS = ["dot", "sum"]


# "sum" (the GPU's form for float codes) on every case; "dot" on the small ones (the large generated cases add
# interpreter time, and multi_tile_and_count below runs "dot" over many tiles)
LARGE = ("unique-half", "build-larger", "zipf")
TC_PRODUCT_CASES = [(dt, n, "sum") for dt, n in TC_CASES] + [(dt, n, "dot") for dt, n in TC_CASES if n not in LARGE]


@interpreted
@pytest.mark.parametrize("dt,name,product", TC_PRODUCT_CASES)
def test_tensorcore_aggregate_interpreted(dt, name, product):
    from gpulab.dbjoin.tensorcore_aggregate import TensorCoreAggregate

    lk, lp, rk, rp = case(dt, name)
    ref = A.pandas_aggregate(lk, lp, rk, rp)
    tc = TensorCoreAggregate("fp32", block=16, rows_per_partition=8, agg_product=product)  # many partitions
    assert tc.agg_dot is (product == "dot")
    _assert_equal(tc.aggregate(*_devs(lk, lp, rk, rp)), ref)


@interpreted
@pytest.mark.parametrize("dt,name", [("int32", "dup-both-negative"), ("int32", "sentinel"), ("int64", "zipf")])
def test_tensorcore_aggregate_on_the_counting_partition(dt, name, monkeypatch):
    """The aggregate on the GPU's partition (the Triton counting sort, whose order inside a partition is arbitrary;
    forced here on the interpreter)."""
    import functools

    from gpulab.dbjoin import tensorcore_aggregate as TA

    monkeypatch.setattr(TA, "partition", functools.partial(TA.partition, fused=True))
    lk, lp, rk, rp = case(dt, name)
    tc = TA.TensorCoreAggregate("fp32", block=16, rows_per_partition=8)
    _assert_equal(tc.aggregate(*_devs(lk, lp, rk, rp)), A.pandas_aggregate(lk, lp, rk, rp))


@interpreted
@pytest.mark.parametrize("product", AGG_PRODUCTS)
@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_tensorcore_aggregate_multi_tile_and_count(dt, product):
    """One partition of several tiles: duplicates of a key spread over tiles must still give one output row."""
    from gpulab.dbjoin.tensorcore_aggregate import TensorCoreAggregate

    rng = np.random.default_rng(3)
    lk = rng.integers(-6, 6, 90).astype(dt)
    rk = np.concatenate([rng.integers(-6, 3, 70), [np.iinfo(dt).min] * 3]).astype(dt)
    lk[:4] = np.iinfo(dt).min
    lp, rp = payloads(len(lk), 4), payloads(len(rk), 5)
    ref = A.pandas_aggregate(lk, lp, rk, rp)
    tc = TensorCoreAggregate("fp32", block=16, rows_per_partition=1000, agg_product=product)
    _assert_equal(tc.aggregate(*_devs(lk, lp, rk, rp)), ref)
    assert tc.last_partitions == 1
    cnt = TensorCoreAggregate("fp32", block=32, mode="count", agg_product=product).aggregate(*_devs(lk, lp, rk, rp))
    assert cnt.sum_left is None
    _assert_equal(cnt, ref, "count")


@pytest.mark.parametrize("code,block,product,agg_dot", [
    ("int8", 64, None, True), ("int8", 32, None, True), ("int8", 128, None, True),
    ("int8", 16, None, False),  # the aggregate product of int8 codes at block 16 is fp16
    ("fp16", 64, None, False), ("bf16", 32, None, False), ("fp32", 16, None, False), ("fp16", 16, None, False),
    ("fp16", 64, "dot", True), ("int8", 64, "sum", False), ("fp32", 16, "dot", True)])
def test_tensorcore_aggregate_chooses_the_second_dot_for_int8_only(code, block, product, agg_dot, monkeypatch):
    """The kernel gets AGG_DOT True (a second tl.dot) only where the aggregate product is int8, unless forced: the
    fp16/bf16 chained dot gave wrong groups and an illegal address on an H200 (Triton 3.6), int8's was correct.
    The launch is recorded, not run, so every code type is checked here."""
    from gpulab.dbjoin import tensorcore_aggregate_kernel as K
    from gpulab.dbjoin.tensorcore_aggregate import TensorCoreAggregate

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **consts: launches.append(consts)

    monkeypatch.setattr(K, "tc_agg_kernel", Recorder())
    tc = TensorCoreAggregate(code, block=block, agg_product=product)
    assert tc.agg_dot is agg_dot
    got = tc.aggregate(*(torch.tensor(v, dtype=torch.int32) for v in ([1, 2], [3, 4], [2, 5], [6, 7])))
    assert len(got.key) == 0  # nothing ran
    assert len(launches) == 1
    assert launches[0]["AGG_DOT"] is agg_dot and launches[0]["ADT"] == tc._dtype(tc.agg_dtype)


def test_tensorcore_aggregate_rejects_bad_options():
    from gpulab.core.errors import InputError
    from gpulab.dbjoin.tensorcore_aggregate import TensorCoreAggregate

    with pytest.raises(InputError, match="--aggregate"):
        TensorCoreAggregate("fp32", mode="avg")
    with pytest.raises(InputError, match="tc-block"):
        TensorCoreAggregate("fp32", block=8)
    with pytest.raises(InputError, match="agg_product must be one of dot, sum or None"):
        TensorCoreAggregate("fp32", agg_product="limbs")
    with pytest.raises(InputError, match="--aggregate"):
        A.pandas_aggregate(np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32),
                           np.zeros(1, np.int32), "max")
    with pytest.raises(InputError, match="lengths differ"):
        TensorCoreAggregate("fp32").aggregate(*(torch.zeros(n, dtype=torch.int32) for n in (3, 2, 3, 3)))


def test_compiler_problem_of_old_triton():
    """Triton 3.2 aborts the process compiling the aggregate kernel at BM <= 32: refused before the launch."""
    from gpulab.dbjoin.tensorcore_aggregate import compiler_problem

    why = compiler_problem(32, "3.2.0")
    assert why and "--tc-block 32" in why and "triton>=3.3" in why and "\n" not in why
    assert compiler_problem(16, "3.2.0") and compiler_problem(16, "3.0.0")
    for block, tv in ((64, "3.2.0"), (128, "3.2.0"), (16, "3.3.1"), (32, "3.6.0"), (16, "")):
        assert compiler_problem(block, tv) is None, (block, tv)


# few (code, key) kernels: each is one Triton compile on the GPU, inside the device script's pytest budget (these
# run in a pytest process of their own there: a crash here must not fail the join tests); fp16/bf16 codes take the
# reductions (AGG_DOT False), int8 at block >= 32 the second dot
@pytest.mark.gpu
@pytest.mark.parametrize("code,dt", [("fp16", "int32"), ("int8", "int32"), ("fp16", "int64"), ("int8", "int64"),
                                     ("bf16", "int64")])
def test_tensorcore_aggregate_gpu_codes(code, dt):
    from gpulab.dbjoin.tensorcore_aggregate import TensorCoreAggregate

    tc = TensorCoreAggregate(code, block=64)
    for name in ("dup-both-negative", "sentinel", "sentinel-only", "zipf", "all-match", "no-match", "left-empty"):
        lk, lp, rk, rp = case(dt, name)
        _assert_equal(tc.aggregate(*_devs(lk, lp, rk, rp)), A.pandas_aggregate(lk, lp, rk, rp))
    for dup in ("unique", "zipf:0.7"):
        left, right = tables.generate(100_000, 80_000, 0.5, dup, 5, dt)
        args = (left.key, left.payload, right.key, right.payload)
        ref = A.pandas_aggregate(*args)
        _assert_equal(tc.aggregate(*_devs(*args)), ref)
        _assert_equal(A.torch_aggregate(*_devs(*args)), ref)


@pytest.mark.gpu
def test_tensorcore_aggregate_gpu_1m_count_and_block16():
    """1M x 1M (fp16 sums, int8 counts at block 128) and int8 keys at block 16 (its aggregate product is fp16)."""
    from gpulab.dbjoin.tensorcore_aggregate import TensorCoreAggregate

    left, right = tables.generate(1_000_000, None, 0.5, "unique", 0, "int32")
    args = (left.key, left.payload, right.key, right.payload)
    ref = A.pandas_aggregate(*args, how="pre")
    _assert_equal(TensorCoreAggregate("fp16", block=64).aggregate(*_devs(*args)), ref)
    _assert_equal(TensorCoreAggregate("int8", block=128, mode="count").aggregate(*_devs(*args)), ref, "count")
    lk, lp, rk, rp = case("int32", "sentinel")
    tc = TensorCoreAggregate("int8", block=16, mode="count")
    assert tc.agg_dtype == "fp16" and not tc.agg_dot  # an fp16 aggregate product: the reductions, no second dot
    _assert_equal(tc.aggregate(*_devs(lk, lp, rk, rp)), A.pandas_aggregate(lk, lp, rk, rp), "count")


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_payloads_fit_int32_or_are_refused(lib):
    """Both aggregates' payload check (cupy arrays carry numpy dtypes): integers whose values fit int32 pass,
    wider values and non-integers are one-line errors."""
    import torch

    from gpulab.core.errors import InputError
    from gpulab.dbjoin.aggregate import check_int32_payload

    arr = (lambda v, dt: np.array(v, dtype=dt)) if lib == "numpy" else \
        (lambda v, dt: torch.tensor(v, dtype=getattr(torch, dt)))
    for v, dt in (([2**31 - 1, -(2**31)], "int64"), ([], "int64"), ([7], "uint8"), ([-5], "int32")):
        check_int32_payload(arr(v, dt), "left")
    for v, dt, msg in (([2**31], "int64", "right payloads have values outside the int32 range"),
                       ([-(2**31) - 1], "int64", "right payloads have values outside the int32 range"),
                       ([1.5], "float32", "right payloads must be integers, got float32"),
                       ([True], "bool", "right payloads must be integers, got bool")):
        with pytest.raises(InputError, match=msg):
            check_int32_payload(arr(v, dt), "right")


def test_pandas_is_not_checked_against_itself_when_it_is_the_reference(monkeypatch, tmp_path):
    """A join too large to list: the reference is pandas' groupby-then-merge plan, the pandas-agg row's own; the
    row was 'checked' against itself. Now it is timed and marked as the reference; torch's row is still checked."""
    from gpulab.cli import invoke
    from gpulab.dbjoin import agg_bench

    monkeypatch.setattr(agg_bench, "LITERAL_MAX_PAIRS", 10)  # this small join counts as too large
    out = tmp_path / "res"
    invoke(["--out", str(out), "join", "bench", "--rows", "300", "--dup", "zipf:1.1", "--aggregate", "sum",
            "--impl", "torch,pandas", "--reps", "1", "--warmup", "0"])
    import yaml

    (f,) = out.glob("join-*.yaml")
    rec = yaml.safe_load(f.read_text())
    rows = {r["impl"]: r for r in rec["rows"]}
    assert rows["pandas-agg"]["correct"] is None and "pandas-agg" not in rec["checks"]
    assert rows["torch-agg"]["correct"] is True and rec["checks"]["torch-agg"]["passed"]
    assert any("pandas-agg is the reference here" in n for n in rec["notes"])
    invoke(["--out", str(out / "alone"), "join", "bench", "--rows", "300", "--dup", "zipf:1.1", "--aggregate", "sum",
            "--impl", "pandas", "--reps", "1", "--warmup", "0"])  # the reference alone ran: not "none ran here"
    (f,) = (out / "alone").glob("join-*.yaml")
    alone = yaml.safe_load(f.read_text())
    assert alone["summary"]["correct"] is None and alone["rows"][0]["reference"] is True
