"""Edge cases of gpulab.core that the other core tests leave open (found by mutation testing).

Each test pins one documented behaviour against a plain-Python or numpy reference: the summary
statistics of a timing, the early stop and warm-up of the timers, the bootstrap interval's level and
its drop rule, a re-recorded check, the ncu unit table and per-kernel
averages, the experiment labels and --no-flag options, and small option/path/device helpers.
"""
import numpy as np
import pytest

from gpulab.core import ncu, options, results, timing
from gpulab.core.errors import InputError
from gpulab.core.stats import paired_bootstrap

from .test_experiment import echo_command, write  # noqa: F401  (echo_command is a fixture)


# -- timing

def test_summarize_statistics_of_unsorted_odd_samples():
    samples = [7.0, 1.0, 3.0, 10.0, 2.0]  # unsorted, odd count
    t = timing.summarize(samples)
    assert t.mean == pytest.approx(np.mean(samples))
    assert t.min == 1.0
    assert t.median == pytest.approx(np.median(samples))
    assert t.p10 == pytest.approx(np.quantile(samples, 0.1))
    assert t.p90 == pytest.approx(np.quantile(samples, 0.9))
    assert t.reps == 5


def _fake_clock(monkeypatch, step_s):
    clock = {"t": 0.0, "calls": 0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])

    def fn():
        clock["t"] += step_s
        clock["calls"] += 1
    return clock, fn


def test_benchmark_max_seconds_stops_after_three_reps(monkeypatch):
    clock, fn = _fake_clock(monkeypatch, 1.0)  # every call takes 1 s: past the budget at once
    t = timing.benchmark(fn, device="cpu", warmup=1, reps=50, max_seconds=0.5)
    assert t.reps == 3 and clock["calls"] == 1 + 3
    assert t.median == pytest.approx(1000.0)


def test_wall_runs_warmup_untimed(monkeypatch):
    clock, fn = _fake_clock(monkeypatch, 0.004)
    t = timing.wall(fn, reps=3, warmup=2)
    assert clock["calls"] == 5 and t.reps == 3 and t.median == pytest.approx(4.0)


# -- stats

def test_bootstrap_interval_is_the_level_percentile_interval():
    """lo/hi are the (1-level)/2 and 1-(1-level)/2 percentiles of the resampled statistic (numpy reference)."""
    rng = np.random.default_rng(4)
    a = rng.normal(0.0, 1.0, 9)
    reps, seed = 300, 11
    for level in (0.5, 0.8, 0.95):
        r = paired_bootstrap({"a": a}, lambda m: m["a"], reps=reps, level=level, seed=seed)
        idx = np.random.default_rng(seed).integers(0, a.size, size=(reps, a.size))
        means = a[idx].mean(1)
        lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
        assert r["value"] == pytest.approx(a.mean())
        assert (r["lo"], r["hi"]) == (pytest.approx(lo), pytest.approx(hi)), level
        assert r["lo"] < r["hi"]


def test_bootstrap_keeps_interval_when_at_least_half_the_resamples_count():
    """Resamples whose statistic is None are dropped; an interval is given while at least half remain."""
    # two items 0 and 1: a resample's mean is 0 (p=1/4), 0.5 (1/2) or 1 (1/4); the stat drops mean 0
    r = paired_bootstrap({"a": [0.0, 1.0]}, lambda m: None if m["a"] < 0.25 else m["a"], reps=400, seed=1)
    assert r["lo"] is not None and r["hi"] is not None
    assert 0.5 <= r["lo"] <= r["hi"] <= 1.0


# -- results

def test_a_rechecked_name_keeps_the_latest_outcome():
    rec = results.Record(name="x")
    rec.check("a", True)
    assert rec.ok
    rec.check("a", False, detail="second look")
    assert not rec.ok and rec.checks["a"] == {"passed": False, "detail": "second look"}


# -- ncu

def _csv(units, values, names):
    head = ["ID", "Kernel Name", *names]
    rows = [",".join(f'"{c}"' for c in head), ",".join(f'"{c}"' for c in ["", "", *units])]
    for i, v in enumerate(values):
        rows.append(",".join(f'"{c}"' for c in [str(i), "k", *v]))
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("unit, value, base, scale", [
    ("msecond", "2", "nsecond", 1e6), ("second", "2", "nsecond", 1e9), ("usecond", "2", "nsecond", 1e3),
    ("Kbyte", "2", "byte", 1e3), ("Gbyte", "2", "byte", 1e9), ("KiB", "2", "byte", 1024.0),
    ("MiB", "2", "byte", 1024.0**2), ("Gbyte/second", "2", "byte/second", 1e9),
    ("Mbyte/second", "2", "byte/second", 1e6), ("Mcycle", "2", "cycle", 1e6), ("Ghz", "2", "hz", 1e9),
    ("%", "2", "%", 1.0), ("furlong", "2", "furlong", 1.0),  # an unknown unit is kept as is, unscaled
])
def test_ncu_units_convert_to_base(unit, value, base, scale):
    (r,) = ncu.parse_csv_raw(_csv([unit], [[value]], ["m.sum"]))
    assert r.metrics["m.sum"] == pytest.approx(float(value) * scale)
    assert r.units["m.sum"] == base


def test_ncu_summary_averages_avg_metrics_and_sums_totals():
    names = ["sm__cycles_active.avg", "dram__bytes.sum", "x.ratio", "y.pct"]
    text = _csv(["cycle", "byte", "", "%"], [["10", "100", "1", "50"], ["30", "300", "3", "n/a"], ["n/a", "5", "2", "70"]],
                names)
    (row,) = ncu.summarize_by_kernel(ncu.parse_csv_raw(text))
    assert row["launches"] == 3
    assert row["sm__cycles_active.avg"] == pytest.approx(20.0)  # mean of the launches that have it
    assert row["dram__bytes.sum"] == pytest.approx(405.0)
    assert row["x.ratio"] == pytest.approx(2.0)
    assert row["y.pct"] == pytest.approx(60.0)


def test_ncu_build_command_launch_skip_and_defaults():
    cmd = ncu.build_command(["t"], launch_skip=3, launch_count=2)
    assert cmd[cmd.index("--launch-skip") + 1] == "3" and cmd[cmd.index("--launch-count") + 1] == "2"
    assert cmd[cmd.index("--print-units") + 1] == "base"
    assert "--launch-skip" not in ncu.build_command(["t"]) and "--kernel-name" not in ncu.build_command(["t"])
    with pytest.raises(ValueError):
        ncu.build_command(["t"], clock_control="fast")


# -- experiment

def test_plan_labels_name_only_the_sweep_axes_and_false_flags_are_explicit(echo_command, tmp_path):  # noqa: F811
    from gpulab.core import experiment

    data = experiment.load_file(write(tmp_path, {"runs": [
        {"command": "echo", "params": {"n": [1, 2], "dtype": "int64", "fast": False}}]}))
    invs = experiment.plan(data)
    assert [i.label for i in invs] == ["echo [n=1]", "echo [n=2]"]
    assert invs[0].argv == ["echo", "--n", "1", "--dtype", "int64", "--no-fast"]


def test_expand_three_axes_last_fastest():
    from gpulab.core import experiment

    got = experiment.expand({"x": [1, 2, 3], "y": ["a", "b"], "z": 0})
    assert [(d["x"], d["y"]) for d in got] == [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "a"), (3, "b")]
    assert all(list(d) == ["x", "y", "z"] for d in got)


# -- options, paths, files, device

def test_resolve_device_auto_follows_cuda(monkeypatch):
    monkeypatch.setattr(options, "cuda_available", lambda: True)
    assert options.resolve_device("auto") == "cuda"
    monkeypatch.setattr(options, "cuda_available", lambda: False)
    assert options.resolve_device("auto") == "cpu"


def test_shared_data_honours_env(monkeypatch, tmp_path):
    from gpulab.core import paths

    monkeypatch.setenv("GPULAB_DATA", str(tmp_path))
    assert paths.shared_data("a", "b") == tmp_path / "a" / "b"
    monkeypatch.delenv("GPULAB_DATA")
    assert paths.shared_data("c") == paths.REPO_ROOT.parent / "shared" / "data" / "c"


def test_malformed_yaml_names_the_one_based_line_and_column(tmp_path):
    from gpulab.core.files import read_yaml_mapping

    p = tmp_path / "bad.yaml"
    p.write_text("a: 1\nb: 2\nc: [1,\n  d: }\n")  # the stray '}' is on line 4, column 6
    with pytest.raises(InputError, match="at line 4, column 6"):
        read_yaml_mapping(p, "missing")


def test_describe_gpu_and_cpu():
    from gpulab.core.device import describe

    assert describe({"backend": "cuda", "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}}) == \
        "NVIDIA H100 (sm_90)"
    assert describe({"backend": "cpu", "cpu": {"model": "Xeon", "usable_cores": 2}}) == "CPU: Xeon x2"


def test_series_names_choices_as_a_sentence_does():
    from gpulab.core.errors import series

    assert series(("table", "markdown", "csv", "json")) == "table, markdown, csv or json"
    assert series(["--no-gemms", "--no-decode"], "and") == "--no-gemms and --no-decode"
    assert series(["mlp"]) == "mlp"
