import numpy as np
import pytest

from gpulab.core import timing


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9, 0.0, 1.0])
def test_quantile_matches_numpy(q):
    rng = np.random.default_rng(0)
    vals = sorted(rng.random(17).tolist())
    assert timing.quantile(vals, q) == pytest.approx(float(np.quantile(vals, q)))


def test_benchmark_cpu_uses_fake_clock(monkeypatch):
    """Each call advances a fake clock by a known amount; the summary must reproduce those numbers."""
    clock = {"t": 0.0}
    durations = iter([0.5, 0.5, 0.5] + [0.001 * k for k in range(1, 11)])  # 3 warm-up, 10 timed (seconds)

    def fake_perf_counter():
        return clock["t"]

    def fn():
        clock["t"] += next(durations)

    monkeypatch.setattr(timing.time, "perf_counter", fake_perf_counter)
    t = timing.benchmark(fn, device="cpu", warmup=3, reps=10)
    assert t.reps == 10
    assert t.median == pytest.approx(5.5)
    assert t.min == pytest.approx(1.0)
    assert t.p10 == pytest.approx(float(np.quantile(np.arange(1, 11), 0.1)))
    assert t.p90 == pytest.approx(float(np.quantile(np.arange(1, 11), 0.9)))
    assert t.unit == "ms"


def test_setup_runs_outside_timed_region(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])

    def setup():
        clock["t"] += 100.0  # must not be counted

    def fn():
        clock["t"] += 0.002

    t = timing.benchmark(fn, device="cpu", warmup=0, reps=5, setup=setup)
    assert t.median == pytest.approx(2.0)


def test_benchmark_rejects_zero_reps():
    with pytest.raises(ValueError, match="reps must be >= 1"):  # not summarize's "no samples" after 0 reps
        timing.benchmark(lambda: None, reps=0)


def test_summarize_empty_raises():
    with pytest.raises(ValueError):
        timing.summarize([])


@pytest.mark.gpu
def test_benchmark_cuda_events():
    import torch

    x = torch.randn(1 << 24, device="cuda")
    t = timing.benchmark(lambda: x.mul_(1.0), device="cuda", warmup=2, reps=10, flush_l2=True)
    assert t.reps == 10 and t.median > 0 and t.p10 <= t.median <= t.p90


@pytest.mark.gpu
def test_capture_graph_replays_on_new_input():
    import torch

    x = torch.arange(8, dtype=torch.float32, device="cuda")
    calls = []

    def fn():
        calls.append(1)
        return x * 2

    g, out = timing.capture_graph(fn, warmup=2)
    assert len(calls) == 3  # two warm-up calls and the captured one
    x.copy_(torch.full_like(x, 5.0))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(x, 10.0))


def test_marked_times_sums_each_name_per_run_and_takes_medians():
    """One untimed run, then reps: each name's pieces summed within a run (time from the previous mark), the
    median over runs, and the marks a name gets in one run."""
    from gpulab.core.timing import marked_times

    clock = {"t": 0.0}
    runs = []

    def event():
        return clock["t"]

    def run(mark):
        runs.append(len(runs))
        for name, ms in (("a", 1.0), ("b", 2.0 + len(runs)), ("a", 3.0)):
            clock["t"] += ms
            mark(name)

    got = marked_times(run, event, lambda x, y: y - x, lambda: None, reps=3)
    assert len(runs) == 4  # one untimed run first
    assert list(got) == ["a", "b"]
    assert got["a"] == {"launches": 2, "ms": 4.0}
    assert got["b"] == {"launches": 1, "ms": 5.0}  # runs 2..4 take 4, 5, 6 ms: the median
