"""``gpulab sort bench`` end to end on this machine, and its one-line errors."""
import numpy as np
import pytest
import yaml

from gpulab.cli import main
from gpulab.sort import reference as ref
from gpulab.sort.bench import BenchArgs, DISTS, make_data, ncu_argv, ncu_impls, numpy_sort, run, validate
from gpulab.core.errors import InputError
from tests.conftest import HAS_CUDA


def gpulab(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_bench_writes_result(out_dir, capsys):
    code, out, err = gpulab(capsys, "--out", str(out_dir), "sort", "bench", "--n", "3000", "--reps", "2",
                            "--dtype", "float32", "--order", "desc", "--kv",
                            "--impl", "numpy,cpu-parallel,torch,bitonic-fused,bitonic-global")
    assert code == 0, err
    files = list(out_dir.glob("sort-bench-*.yaml"))
    assert len(files) == 1
    data = yaml.safe_load(files[0].read_text())
    assert data["ok"] is True
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"numpy", "cpu-parallel", "torch", "bitonic-fused", "bitonic-global"}
    assert rows["numpy"]["correct"] is True and rows["numpy"]["median_ms"] > 0
    assert rows["cpu-parallel"]["correct"] is True and "cpu-parallel.correct" in data["checks"]
    assert rows["torch"]["correct"] is True
    if data["device"]["backend"] == "cpu":  # the bitonic variants ran as their numpy model
        assert rows["bitonic-fused"]["status"] == "model only" and rows["bitonic-fused"]["correct"] is True
        assert "bitonic-fused.model.correct" in data["checks"]
        assert any("bitonic-fused" in n for n in data["notes"])
    assert "sort-bench" in out


def test_bench_all_dists_default_impls_cpu(out_dir):
    for dist in DISTS:
        rec = run(BenchArgs(n=1500, dtype="int32", dist=dist, reps=1, impl="numpy,cpu-parallel,bitonic-shared"))
        assert rec.ok, rec.checks
        assert rec.rows[0]["speedup_vs_numpy"] == pytest.approx(1.0)


def test_bench_n_zero(out_dir):
    rec = run(BenchArgs(n=0, reps=1, impl="numpy,torch,bitonic-fused"))
    assert rec.ok
    assert rec.rows[0]["gkeys_s"] is None


def test_make_data_distributions():
    x = make_data(1000, "int64", "sorted")
    assert (np.diff(x) >= 0).all()
    assert (np.diff(make_data(1000, "uint32", "reversed").astype(np.int64)) <= 0).all()
    assert len(np.unique(make_data(1000, "float32", "few-unique"))) <= 16
    assert len(np.unique(make_data(1000, "int32", "all-equal"))) == 1
    assert np.array_equal(make_data(50, "int32", "uniform", 1), make_data(50, "int32", "uniform", 1))


@pytest.mark.parametrize("args, msg", [
    (["--n", "-3"], "--n must be >= 0, got -3"),
    (["--dtype", "float16"], "--dtype must be one of"),
    (["--dist", "zipf"], "--dist must be one of"),
    (["--impl", "numpy,quicksort"], "unknown implementation 'quicksort'"),
    (["--impl", "bitonic-fused@t16f4g5"], "bitonic-fused@t16f4g5: no kernel for tile t16f4"),
    (["--impl", "numpy@t13f3g4"], "unknown implementation 'numpy@t13f3g4'"),
    (["--order", "up"], "--order must be asc or desc"),
    (["--transfer", "dma"], "--transfer must be one of"),
    (["--reps", "0"], "--reps must be >= 1"),
    (["--impl", "torch,numpy", "--ncu"], "--ncu profiles the GPU implementations"),
    (["--overlap-chunks", "-1", "--transfer", "pinned"], "--overlap-chunks must be >= 0, got -1"),
    (["--overlap-chunks", "6", "--transfer", "pinned"], "--overlap-chunks must be a power of two (or 0: off), got 6"),
    (["--overlap-chunks", "8"], "--overlap-chunks 8 needs --transfer pageable or pinned"),
    (["--overlap-chunks", "2", "--transfer", "pageable", "--impl", "numpy,torch"],
     "--overlap-chunks 2 needs bitonic-shared or bitonic-fused in --impl"),
    (["--overlap-chunks", "8", "--transfer", "pinned", "--n", "5000"],
     "--overlap-chunks 8: chunks of 1024 keys (n=5000) are smaller than the 2048-key tile of bitonic-shared"),
    (["--overlap-chunks", "8", "--transfer", "pinned", "--n", "20000", "--impl", "bitonic-fused"],
     "--overlap-chunks 8: chunks of 4096 keys (n=20000) are smaller than the 16384-key tile of bitonic-fused"),
])
def test_bad_input_is_one_line(capsys, out_dir, args, msg):
    code, out, err = gpulab(capsys, "--out", str(out_dir), "sort", "bench", *args)
    assert code == 1
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not list(out_dir.glob("*.yaml"))


@pytest.mark.skipif(HAS_CUDA, reason="the implementations named here run on a GPU")
@pytest.mark.parametrize("args, msg", [
    (["--impl", "cupy"], "none of --impl cupy can run here (cupy: skipped (no CUDA GPU))"),
    (["--impl", "bitonic-fused", "--n", "70000"], "the numpy model runs only at n <= 65536"),
])
def test_nothing_that_can_run_is_an_error_not_an_empty_record(capsys, out_dir, args, msg):
    code, out, err = gpulab(capsys, "--out", str(out_dir), "--device", "cpu", "sort", "bench", *args)
    assert code == 1 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not list(out_dir.glob("*.yaml"))


def test_bench_overlap(out_dir, capsys):
    """--overlap-chunks: on a GPU the pipelined end to end, else the chunked numpy model; exact either way."""
    code, out, err = gpulab(capsys, "--out", str(out_dir), "sort", "bench", "--n", "20000", "--reps", "2", "--kv",
                            "--dtype", "float32", "--transfer", "pageable", "--overlap-chunks", "2",
                            "--impl", "numpy,bitonic-shared,bitonic-fused")
    assert code == 0, err
    data = yaml.safe_load(next(out_dir.glob("sort-bench-*.yaml")).read_text())
    assert data["ok"] is True and data["config"]["overlap_chunks"] == 2
    for impl in ("bitonic-shared", "bitonic-fused"):
        if data["device"]["backend"] == "cpu":
            assert f"{impl}.overlap.model.correct" in data["checks"]
        else:
            row = next(r for r in data["rows"] if r["impl"] == impl)
            assert row["overlap_correct"] is True and row["overlap_ms"] > 0
    if data["device"]["backend"] == "cpu":
        assert any(n.startswith("--overlap-chunks 2: skipped (no CUDA GPU)") for n in data["notes"])


def test_bench_tune(out_dir, capsys):
    """--tune: a row per tuning configuration of bitonic-fused, each checked (the numpy model here, the kernels
    on a GPU), with its passes over memory."""
    from gpulab.sort import schedule as S

    code, out, err = gpulab(capsys, "--out", str(out_dir), "sort", "bench", "--n", "3001", "--reps", "1",
                            "--impl", "numpy,bitonic-fused,bitonic-fused@t13f3g5", "--tune", "--kv")
    assert code == 0, err
    data = yaml.safe_load(next(out_dir.glob("sort-bench-*.yaml")).read_text())
    assert data["ok"] is True and data["config"]["tune"] is True
    rows = {r["impl"]: r for r in data["rows"]}
    default = S.get_variant("bitonic-fused").config  # timed as bitonic-fused itself
    want = {"numpy", "bitonic-fused"} | {f"bitonic-fused@{c}" for c in S.TUNE_CONFIGS if c != default}
    assert set(rows) == want and data["config"]["impls"].count("bitonic-fused@t13f3g5") == 1
    for impl, row in rows.items():
        if impl != "numpy":
            assert row["correct"] is True and row["passes"] == 1  # 3001 keys: one tile sort
            # the tile bitonic.cu has for 32-bit keys with values (t15 and w512 are for keys alone)
            from gpulab.sort.bench import MODEL_SMEM
            from gpulab.sort.cuda_sort import fit_variant

            assert row["config"] == fit_variant(S.get_variant(impl), 4, True, MODEL_SMEM).config
    if data["device"]["backend"] == "cpu":
        assert "bitonic-fused@t15f4g5.model.correct" in data["checks"]


def test_tune_times_every_configuration_even_without_bitonic_fused_in_impl():
    """--tune with an --impl that omits bitonic-fused still times the default configuration (TUNE_CONFIGS holds
    it, as bitonic-fused's own row): otherwise fused_best_config is the best of the others only."""
    from gpulab.sort import schedule as S

    a = validate(BenchArgs(n=3001, impl="numpy", tune=True))
    default = S.get_variant("bitonic-fused").config
    assert default in S.TUNE_CONFIGS
    assert set(a.impls) == {"numpy", "bitonic-fused"} | {f"bitonic-fused@{c}" for c in S.TUNE_CONFIGS
                                                          if c != default}


def test_ncu_without_gpu(capsys, out_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code, out, err = gpulab(capsys, "--out", str(out_dir), "sort", "bench", "--n", "10", "--ncu")
    assert code == 1 and "--ncu needs a CUDA GPU" in err


def test_validate_defaults_to_all():
    a = validate(BenchArgs(impl=None))
    assert a.impls[0] == "bitonic-global" and "cupy" in a.impls
    with pytest.raises(InputError):
        validate(BenchArgs(impl=" , "))


def test_ncu_child_command_profiles_the_same_input():
    """The --ncu children sort the same input (seed included), each with one of the selected GPU
    implementations only."""
    a = validate(BenchArgs(n=5000, dtype="float32", dist="few-unique", order="desc", kv=True, seed=7, ncu=True,
                           impl="numpy,torch,bitonic-fused,cupy", transfer="pinned", tune=True))
    impls = ncu_impls(a)
    assert impls[:2] == ["bitonic-fused", "cupy"] and "bitonic-fused@t13f3g4" in impls
    assert "numpy" not in impls and "torch" not in impls
    for impl in impls:
        argv = ncu_argv(a, impl)
        flags = dict(zip(argv[2::2], argv[3::2]))
        assert argv[:2] == ["sort", "bench"] and argv[-1] == "--kv"
        assert {k: flags[k] for k in ("--n", "--dtype", "--dist", "--seed", "--order", "--reps", "--impl")} == {
            "--n": "5000", "--dtype": "float32", "--dist": "few-unique", "--seed": "7", "--order": "desc",
            "--reps": "1", "--impl": impl}
        child = validate(BenchArgs(n=5000, impl=flags["--impl"]))  # the child accepts its own --impl
        assert child.impls == [impl]


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("kv", [False, True])
def test_numpy_baseline_does_the_requested_job(order, kv):
    x = make_data(2001, "float32", "few-unique", seed=1)
    keys, perm = numpy_sort(x, order, kv)()
    assert ref.mismatch(keys, ref.sort(x, order)) is None
    assert (perm is None) if not kv else np.array_equal(perm, ref.argsort(x, order))


@pytest.mark.parametrize("n", [0, 1])
def test_bench_overlap_at_most_one_key(out_dir, n):
    """n <= 1 with --overlap-chunks: one chunk (or none), no tile constraint; checked exactly."""
    rec = run(BenchArgs(n=n, reps=1, kv=True, order="desc", transfer="pinned", overlap_chunks=2,
                        impl="numpy,bitonic-shared,bitonic-fused"))
    assert rec.ok, rec.checks


def _as_if_on_a_gpu(monkeypatch):
    """run() on this CPU as if a CUDA device were selected: the copy ceiling and device resolution faked."""
    from gpulab.core import ceilings, options

    monkeypatch.setattr(options, "resolve_device", lambda *a, **k: "cuda")
    monkeypatch.setattr(ceilings, "copy_bandwidth_gbs", lambda *a, **k: 100.0)


def test_ncu_profiles_each_gpu_implementation_on_its_own(out_dir, monkeypatch):
    """bitonic-global and bitonic-shared launch the same bitonic_pass_k32_kv0_f1 kernel: profiled in one child
    their launches were merged into one row (the seed's 67% -> 93% unreadable); each gets its own child and rows."""
    from gpulab.core import ncu
    from gpulab.sort import bench

    _as_if_on_a_gpu(monkeypatch)
    monkeypatch.setattr(bench, "_cupy", lambda: None)  # the bitonic rows run their model; only --ncu matters here
    pct = {"bitonic-global": 67.0, "bitonic-shared": 93.0}
    calls = []

    def fake_profile(argv, kernel_regex=None, metrics=()):
        impls = argv[argv.index("--impl") + 1].split(",")
        calls.append(impls)
        recs = []
        for impl in impls:  # a launch of the shared pass kernel per implementation, at its own throughput
            recs.append(ncu.KernelRecord(len(recs), "bitonic_pass_k32_kv0_f1", {
                "dram__throughput.avg.pct_of_peak_sustained_elapsed": pct[impl], "dram__bytes_read.sum": 1e6}))
        return recs

    monkeypatch.setattr(ncu, "profile_gpulab", fake_profile)
    rec = run(BenchArgs(n=3000, reps=1, impl="numpy,bitonic-global,bitonic-shared", ncu=True))
    assert calls == [["bitonic-global"], ["bitonic-shared"]]
    rows = {(r["impl"], r["kernel"]): r for r in rec.metrics["ncu"]}
    assert set(rows) == {("bitonic-global", "bitonic_pass_k32_kv0_f1"), ("bitonic-shared", "bitonic_pass_k32_kv0_f1")}
    for impl, p in pct.items():
        row = rows[(impl, "bitonic_pass_k32_kv0_f1")]
        assert row["launches"] == 1 and row["dram__throughput.avg.pct_of_peak_sustained_elapsed"] == p
        assert row["dram__bytes_read.sum"] == 1e6


def test_ncu_child_sorts_once_per_implementation(out_dir, monkeypatch):
    """Under ncu the child's kernels are those of one sort per implementation (a second, untimed check sort
    doubled every kernel's launches and DRAM bytes); that one sort is still checked."""
    import sys

    from gpulab.core import ncu, timing
    from gpulab.sort import bench
    from gpulab.sort.cuda_sort import BitonicCuda

    from .test_driver_emulated import DevArray, Scheduler, fake_cupy

    _as_if_on_a_gpu(monkeypatch)
    cp = fake_cupy(Scheduler(0, eager=True))
    cp.asarray = lambda x: np.array(x).view(DevArray)
    cp.asnumpy = np.asarray
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(BitonicCuda, "_module", None)
    monkeypatch.setenv(ncu.UNDER_NCU_ENV, "1")
    cpu_benchmark = timing.benchmark
    monkeypatch.setattr(timing, "benchmark", lambda fn, device="cpu", **k: cpu_benchmark(fn, device="cpu", **k))
    sorts = []
    real_sort = BitonicCuda.sort
    monkeypatch.setattr(BitonicCuda, "sort", lambda self, *a, **k: sorts.append(a[1]) or real_sort(self, *a, **k))
    rec = run(BenchArgs(n=3000, reps=5, kv=True, order="desc", dtype="float32", impl="bitonic-fused,bitonic-global"))
    assert sorts == ["bitonic-fused", "bitonic-global"]
    assert rec.ok and rec.checks["bitonic-fused.correct"]["passed"] and rec.checks["bitonic-global.correct"]["passed"]


def test_pass_split_gives_each_pass_kind_its_bandwidth():
    from gpulab.sort.bench import _pass_split

    times = {"tile_sort": {"launches": 1, "ms": 0.1}, "global_f4": {"launches": 20, "ms": 1.0},
             "from_key": {"launches": 1, "ms": 0.05}}
    split = _pass_split(times, pass_bytes=80_000_000, copy_gbs=4000.0)
    assert split["tile_sort"] == {"launches": 1, "ms": 0.1, "gbs": 800.0, "of_copy": 0.2}
    assert split["global_f4"]["gbs"] == 1600.0 and split["global_f4"]["of_copy"] == 0.4
    assert split["from_key"] == {"launches": 1, "ms": 0.05}  # a transform: no pass bandwidth
    assert "of_copy" not in _pass_split(times, 80_000_000, None)["tile_sort"]


def test_review_bench_option_checks(out_dir):
    """--graph without a bitonic sort, a negative seed, configured names that spell the default, configurations
    spelled twice, and bitonic-global given a tile."""
    from gpulab.core.errors import InputError
    from gpulab.sort.bench import BenchArgs, validate

    with pytest.raises(InputError, match="--graph times the bitonic sorts"):
        validate(BenchArgs(n=10, impl="numpy", graph=True))
    with pytest.raises(InputError, match="--seed must be >= 0"):
        validate(BenchArgs(n=10, impl="numpy", seed=-1))
    a = validate(BenchArgs(n=10, impl="bitonic-fused,bitonic-fused@t14f4g5,numpy"))
    assert a.impls == ["bitonic-fused", "numpy"]
    for bad in ("bitonic-fused@t014f4g5", "bitonic-fused@t14f4g5w1024", "bitonic-fused@t\u0661\u0664f4g5",
                "bitonic-global@t14f4g5"):
        with pytest.raises(InputError):
            validate(BenchArgs(n=10, impl=bad))


def test_overlap_takes_configured_names_and_the_cpu_model_runs_the_tile_the_kernels_have(out_dir):
    from gpulab.sort.bench import BenchArgs, run, validate

    validate(BenchArgs(n=40000, impl="bitonic-fused@t13f3g4", transfer="pinned", overlap_chunks=2))
    rec = run(BenchArgs(n=65536, dtype="int64", kv=True, impl="bitonic-fused@t15f4g5", reps=1))
    (row,) = rec.rows
    assert row["config"] != "t15f4g5" and row["correct"] is True
    assert any("has no t15f4g5 tile" in n for n in rec.notes)
