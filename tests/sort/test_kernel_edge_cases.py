"""Edge cases of the sorts and their bench that the other sort tests leave open (found by mutation testing).

* bitonic.cu's float key transform on -0.0/+0.0 ties in key-value mode (the permutation must keep them in
  input order: numpy compares them equal), run as CUDA C on this CPU (tests/cuda_on_cpu);
* the pipelined host sort of a variant without a tile (its chunks' values come from the to_key kernel at
  the chunk's offset), key-value, with ties and a partial last chunk full of maximal keys;
* the bench's metric arithmetic (keys/s, GB/s counting reads and writes, fraction of the copy ceiling,
  speedup over numpy, p10/p90, the bitonic roofline) against plain-Python formulas;
* the n < 2**31 bound of keys.check_array at the boundary.
"""
import sys

import numpy as np
import pytest

from gpulab.core import timing
from gpulab.core.errors import InputError
from gpulab.sort import keys as K
from gpulab.sort import reference as ref
from gpulab.sort import schedule as S

from ..cuda_on_cpu.module import GXX
from .test_cuda_c_on_cpu import cuda_c  # noqa: F401  (a fixture)
from .test_driver_emulated import DevArray, Scheduler, fake_cupy

needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not installed")


# -- CUDA C on the CPU

ZEROS = np.array([0.0, -0.0, 1.0, -0.0, 0.0, -1.0, np.nan, -0.0, 0.0, np.nan, -0.0], dtype=np.float32)


@needs_gxx
def test_signed_zero_ties_keep_input_order_in_cuda_c(cuda_c):  # noqa: F811
    """+0.0 and -0.0 are one key: the stable permutation keeps them in input order (global and tile paths)."""
    _, _, bit = cuda_c(5, eager=True)
    for variant in ("bitonic-global", "bitonic-shared"):
        for order in K.ORDERS:
            keys, perm = bit.sort(ZEROS.copy().view(DevArray), variant, order, kv=True)
            assert ref.mismatch(np.asarray(keys), ref.sort(ZEROS, order)) is None, (variant, order)
            assert np.array_equal(np.asarray(perm), ref.argsort(ZEROS, order)), (variant, order)


@needs_gxx
@pytest.mark.parametrize("dtype, n, chunks, order", [
    ("int32", 777, 4, "asc"),    # ties: the values (global indices) decide, across chunk offsets
    ("int32", 777, 4, "desc"),
    ("uint32", 1000, 2, "asc"),  # a partial last chunk full of maximal keys (0xFFFFFFFF) behind the padding
])
def test_sort_host_without_tile_key_value(cuda_c, dtype, n, chunks, order):  # noqa: F811
    _, _, bit = cuda_c(n + chunks)
    rng = np.random.default_rng(n)
    if dtype == "uint32":
        x = np.where(rng.random(n) < 0.5, np.uint32(0xFFFFFFFF), rng.integers(0, 50, n)).astype(np.uint32)
    else:
        x = rng.integers(-3, 4, n).astype(dtype)
    out = np.empty_like(x)
    perm = np.empty(n, np.uint32)
    bit.sort_host(x, out, "bitonic-global", order, chunks, perm)
    assert ref.mismatch(out, ref.sort(x, order)) is None
    assert np.array_equal(perm.astype(np.int64), ref.argsort(x, order))


# -- the keys' bound

class _Shape:
    """Something with ndim, dtype and shape: check_array's view of an array (no 2**31 allocation)."""

    def __init__(self, n):
        self.ndim, self.dtype, self.shape = 1, np.dtype(np.int32), (n,)


def test_check_array_bound_is_exclusive():
    K.check_array(_Shape(2**31 - 1))
    with pytest.raises(InputError, match="n must be < 2\\*\\*31"):
        K.check_array(_Shape(2**31))


# -- bench metrics

def _fake_timings(monkeypatch, medians):
    """timing.benchmark returns (median, p10, p90) from ``medians`` in call order (and still calls fn once)."""
    calls = iter(medians)

    def fake(fn, device="cpu", **kw):
        fn()
        med, p10, p90 = next(calls)
        return timing.Timing(median=med, p10=p10, p90=p90, mean=med, min=p10, reps=3)

    monkeypatch.setattr(timing, "benchmark", fake)


@pytest.mark.parametrize("dtype, kv", [("int32", False), ("int64", True)])
def test_bench_row_metrics_math(out_dir, monkeypatch, dtype, kv):
    from gpulab.core import ceilings
    from gpulab.sort.bench import BenchArgs, run

    monkeypatch.setattr(ceilings, "copy_bandwidth_gbs", lambda *a, **k: 50.0)
    _fake_timings(monkeypatch, [(10.0, 8.0, 13.0), (4.0, 3.0, 6.0)])
    n = 1001
    rec = run(BenchArgs(n=n, dtype=dtype, reps=3, kv=kv, impl="numpy,cpu-parallel"))
    assert rec.ok, rec.checks
    rows = {r["impl"]: r for r in rec.rows}
    item = np.dtype(dtype).itemsize
    nbytes = 2 * n * item + (8 * n if kv else 0)  # keys read + written, int64 indices written
    for impl, (med, p10, p90) in (("numpy", (10.0, 8.0, 13.0)), ("cpu-parallel", (4.0, 3.0, 6.0))):
        r = rows[impl]
        sec = med / 1e3
        assert (r["median_ms"], r["p10_ms"], r["p90_ms"]) == (med, p10, p90)
        assert r["gkeys_s"] == pytest.approx(n / sec / 1e9)
        assert r["eff_gbs"] == pytest.approx(nbytes / sec / 1e9)
        assert r["frac_copy"] == pytest.approx(nbytes / sec / 1e9 / 50.0)
        assert r["speedup_vs_numpy"] == pytest.approx(10.0 / med)
    assert rows["cpu-parallel"]["speedup_vs_numpy"] == pytest.approx(2.5)
    assert rec.summary["best"] == "cpu-parallel"


def test_bench_bitonic_roofline_math(out_dir, monkeypatch):
    """On a (faked) GPU: roofline_ms = the bytes the passes move (keys and uint32 values, read and written) plus
    the kv widening (4 + 8 bytes a key), at the copy ceiling; frac_roofline = roofline / median."""
    from gpulab.core import ceilings, options
    from gpulab.sort import bench
    from gpulab.sort.cuda_sort import BitonicCuda

    monkeypatch.setattr(options, "resolve_device", lambda *a, **k: "cuda")
    monkeypatch.setattr(ceilings, "copy_bandwidth_gbs", lambda *a, **k: 100.0)
    cp = fake_cupy(Scheduler(0, eager=True))
    cp.asarray = lambda x: np.array(x).view(DevArray)
    cp.asnumpy = np.asarray
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(BitonicCuda, "_module", None)
    _fake_timings(monkeypatch, [(2.0, 1.5, 2.5), (5.0, 4.0, 6.0)])
    n = 3001
    rec = bench.run(bench.BenchArgs(n=n, reps=2, kv=True, dtype="float32", impl="bitonic-fused,bitonic-global"))
    assert rec.ok, rec.checks
    for r, med in zip(rec.rows, (2.0, 5.0)):
        passes = S.passes_over_memory(n, r["impl"])
        assert r["passes"] == passes
        moved = passes * 2 * n * (4 + 4) + 12 * n
        assert r["roofline_ms"] == pytest.approx(moved / (100.0 * 1e6)), r["impl"]
        assert r["frac_roofline"] == pytest.approx(r["roofline_ms"] / med)
        assert r["eff_gbs"] == pytest.approx((2 * n * 4 + 8 * n) / (med / 1e3) / 1e9)
        assert r["frac_copy"] == pytest.approx(r["eff_gbs"] / 100.0)


@pytest.mark.parametrize("chunks", [0, 3, 6, -2])
def test_sort_host_chunks_must_be_a_power_of_two(chunks):
    from gpulab.sort.cuda_sort import check_host_args

    x = np.arange(10, dtype=np.int32)
    with pytest.raises(InputError, match="chunks must be a power of two"):
        check_host_args(x, np.empty_like(x), None, chunks)
    check_host_args(x, np.empty_like(x), None, 4)


def test_effective_variant_keeps_its_own_tile_and_falls_back_to_smaller_tiles():
    from gpulab.sort.cuda_sort import BitonicCuda, tile_smem_bytes

    bit = BitonicCuda.__new__(BitonicCuda)  # no GPU needed: only max_smem matters
    fused = S.get_variant("bitonic-fused@t13f3g4")  # (13, 4) is instantiated too, its own fuse comes first
    bit.max_smem = 227 * 1024
    v = bit.effective_variant(fused, 4, True)
    assert (v.tile_log, v.tile_fuse, v.global_fuse) == (13, 3, 4)
    bit.max_smem = tile_smem_bytes(12, 8, True)  # only tiles of <= 2^12 keys fit: t12f3
    v = bit.effective_variant(fused, 8, True)
    assert (v.tile_log, v.tile_fuse) == (12, 3)
