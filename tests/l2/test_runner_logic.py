"""The prefetch ordering of PolicyRunner.infer, with recording stand-ins for streams, events and kernels."""
import pytest
import torch

from gpulab.l2 import policy as P
from gpulab.l2.bench import PolicyRunner, RunConfig
from gpulab.l2.models import Layer, Request
from gpulab.l2.policy import Region


class _Stream:
    def __init__(self, name, log):
        self.name, self.log, self.cuda_stream = name, log, hash(name)

    def wait_event(self, ev):
        self.log.append(("wait", self.name, ev.i))

    def wait_stream(self, other):
        self.log.append(("join", self.name, other.name))


class _Event:
    def __init__(self, i, log):
        self.i, self.log = i, log

    def record(self, stream):
        self.log.append(("record", stream.name, self.i))


class _Kernels:
    def __init__(self, log):
        self.log = log

    def launch(self, kind, ptr, nbytes, stream):
        self.log.append(("prefetch", kind, ptr, nbytes))


class _Arena:
    base_ptr = 1 << 30


class _Model:
    arena = _Arena()


def _runner(sizes, budget, lookahead=1):
    log = []
    layers = []
    off = 0
    for i, n in enumerate(sizes):
        layers.append(Layer(f"l{i}", (lambda x, i=i: (log.append(("layer", i)), x + 1)[1]), Region(f"l{i}", off, n)))
        off += n
    r = PolicyRunner.__new__(PolicyRunner)
    r.cfg = RunConfig(lookahead=lookahead)
    r.model = _Model()
    r.requests = [Request(torch.zeros(2), layers)]
    r.main, r.side = _Stream("main", log), _Stream("side", log)
    r.events = [_Event(i, log) for i in range(len(sizes))]
    plan = [P.group_by_layer(P.prefetch_schedule(sizes, l2_budget_bytes=budget, lookahead=lookahead), len(sizes))]
    r.schedule = lambda i, policy: plan[i]
    r.prefetch_kind, r._kernels = "prefetch_l2", _Kernels(log)
    return r, log


def test_prefetch_next_layer_while_current_runs():
    r, log = _runner([256, 512, 768], budget=10_000)
    y = r.infer(0, "prefetch")
    assert float(y[0]) == 3.0
    base = _Arena.base_ptr
    assert log == [
        ("record", "main", 0), ("wait", "side", 0), ("prefetch", "prefetch_l2", base + 256, 512), ("layer", 0),
        ("record", "main", 1), ("wait", "side", 1), ("prefetch", "prefetch_l2", base + 768, 768), ("layer", 1),
        ("layer", 2),
        ("join", "main", "side"),
    ]


def test_no_prefetch_for_default_and_persist():
    for pol in ("default", "persist"):
        r, log = _runner([256, 512], budget=10_000)
        r.infer(0, pol)
        assert log == [("layer", 0), ("layer", 1)]


def test_budget_limits_prefetch_bytes():
    r, log = _runner([256, 512, 768], budget=640)  # room for 384 of layer 1, then 128 of layer 2
    r.infer(0, "persist+prefetch")
    pf = [e for e in log if e[0] == "prefetch"]
    assert pf == [("prefetch", "prefetch_l2", _Arena.base_ptr + 256, 384),
                  ("prefetch", "prefetch_l2", _Arena.base_ptr + 768, 128)]


def test_unaligned_piece_is_aligned_down_inside_the_arena():
    r, log = _runner([256, 512], budget=10_000)
    r._launch_prefetch(256 + 40, 100)
    assert log[-1] == ("prefetch", "prefetch_l2", _Arena.base_ptr + 256, 140)


def test_auto_drops_a_policy_whose_l2_setup_fails():
    """auto's extra candidates whose set-up fails here (a persisting set-aside refused, e.g. under MIG) are left
    out with a note; a policy asked for by name is not probed (its own error ends the run, in one line)."""
    import contextlib

    from gpulab.core.errors import DeviceError
    from gpulab.l2.bench import installable

    class Runner:
        tried = []

        def installed(self, p):
            self.tried.append(p)
            if P.uses_persist(p):
                raise DeviceError("cudaDeviceSetLimit(PersistingL2CacheSize): cudaErrorNotSupported")
            return contextlib.nullcontext()

    notes = []
    cands = ["default", "prefetch", "persist", "persist+prefetch"]
    assert installable(Runner(), cands, ["prefetch"], notes) == ["default", "prefetch"]
    assert Runner.tried == ["persist", "persist+prefetch"]
    assert len(notes) == 2 and "'persist' left out" in notes[0] and "cudaErrorNotSupported" in notes[0]
    Runner.tried.clear()
    assert installable(Runner(), ["default", "persist"], ["persist"], []) == ["default", "persist"]
    assert Runner.tried == []  # asked for by name: not probed; measuring it fails with its one-line error


def test_persisting_window_hit_ratio_fits_the_granted_set_aside(monkeypatch):
    """PersistingL2 reads the set-aside back after setting it; when the driver grants less than asked, the window's
    hitRatio drops to granted / window (never above the ratio asked for), and the old limit is restored."""
    from gpulab.l2 import cuda_l2

    state = {"limit": 0, "windows": {}}

    def set_limit(n):
        state["limit"] = min(int(n), 24 << 20)  # the driver grants at most 24 MiB here

    monkeypatch.setattr(cuda_l2, "get_persisting_limit", lambda: state["limit"])
    monkeypatch.setattr(cuda_l2, "set_persisting_limit", set_limit)
    monkeypatch.setattr(cuda_l2, "set_access_policy_window",
                        lambda s, base, n, ratio: state["windows"].__setitem__(s, (base, n, ratio)))
    monkeypatch.setattr(cuda_l2, "clear_access_policy_window", lambda s: state["windows"].pop(s))
    monkeypatch.setattr(cuda_l2, "reset_persisting_lines", lambda: state.setdefault("order", []).append("reset"))
    monkeypatch.setattr(cuda_l2, "synchronize_device", lambda: state.setdefault("order", []).append("sync"))
    mib = 1 << 20
    with cuda_l2.PersistingL2(32 * mib, 4096, 32 * mib, 1.0, [7, 8]) as ctx:
        assert ctx.granted_bytes == 24 * mib and ctx.installed_hit_ratio == 0.75
        assert state["windows"] == {7: (4096, 32 * mib, 0.75), 8: (4096, 32 * mib, 0.75)}
    # the queued kernels are waited for before the persisting lines are reset: a reset under running kernels
    # would let them mark lines persisting again, for the next policy measured
    assert state == {"limit": 0, "windows": {}, "order": ["sync", "reset"]}
    with cuda_l2.PersistingL2(16 * mib, 4096, 64 * mib, 0.25, [7]) as ctx:  # granted in full: the ratio asked
        assert ctx.granted_bytes == 16 * mib and ctx.installed_hit_ratio == 0.25


def test_summarize_ncu_weights_the_hit_rate_by_sectors():
    """DRAM bytes per inference leave the pollution kernel out; the L2 hit rate is that of all sectors, so a
    prefetch kernel with few sectors does not count like a GEMM with many."""
    from gpulab.core.ncu import KernelRecord
    from gpulab.l2.bench import summarize_ncu

    def k(name, rd, hit, sectors):
        return KernelRecord(0, name, {"dram__bytes_read.sum": rd, "dram__bytes_write.sum": 1.0,
                                      "lts__t_sector_hit_rate.pct": hit, "lts__t_sectors.sum": sectors})

    recs = [k("gemm", 100.0, 90.0, 9000.0), k("touch", 50.0, 0.0, 1000.0), k("pollute_kernel", 1e9, 0.0, 1e9)] * 2
    s = summarize_ncu(recs, reps=2)
    assert s["kernels_per_inference"] == 2 and s["dram_read_bytes_per_inference"] == 150.0
    assert s["dram_write_bytes_per_inference"] == 2.0
    assert s["l2_hit_rate_pct"] == 81.0 and s["l2_hit_rate_weighting"] == "sectors"  # not (90 + 0) / 2
    assert [(k["kernel"], k["launches"]) for k in s["by_kernel"]] == [("gemm", 2), ("touch", 2)]
    for r in recs:
        r.metrics.pop("lts__t_sectors.sum", None)  # (the list holds each record twice)
    s = summarize_ncu(recs, reps=2)
    assert s["l2_hit_rate_pct"] == 45.0 and s["l2_hit_rate_weighting"] == "kernels"
    assert summarize_ncu([], reps=1)["l2_hit_rate_pct"] is None


def _bare_runner():
    """A PolicyRunner without a device: six 256 KiB layers, a 1 MiB L2, a persist plan of 512 KiB."""
    from types import SimpleNamespace

    r = PolicyRunner.__new__(PolicyRunner)
    r.cfg = RunConfig(lookahead=1, prefetch_budget=0.5)
    r.limits = {"l2_bytes": 1 << 20}
    layers, off = [], 0
    for i in range(6):
        layers.append(Layer(f"l{i}", lambda x: x, Region(f"l{i}", off, 256 << 10)))
        off += 256 << 10
    r.requests = [Request(torch.zeros(2), layers)]
    r._schedules = {}
    r.persist_plan = SimpleNamespace(set_aside_bytes=512 << 10)
    r.last_persist = None
    return r


def test_persist_aside_is_what_the_driver_granted_else_the_plan():
    from types import SimpleNamespace

    r = _bare_runner()
    assert r.persist_aside_bytes() == 512 << 10
    r.last_persist = SimpleNamespace(granted_bytes=384 << 10)
    assert r.persist_aside_bytes() == 384 << 10


@pytest.mark.parametrize("graph", [True, False])
def test_ncu_rows_retry_a_graph_run_eagerly(monkeypatch, graph):
    """--ncu per policy: a --graph child that profiled no kernel inside the NVTX range is run again launched eagerly
    (noted); a policy with no kernel either way, or whose child fails, is a failed check and no row. Without --graph
    nothing is retried."""
    from gpulab.core import results
    from gpulab.core.errors import GpulabError
    from gpulab.l2 import bench

    calls = []

    def child(cfg, pol, reps, graph=None):
        g = cfg.graph if graph is None else graph
        calls.append((pol, reps, g))
        if pol == "failing":
            raise GpulabError("ncu exited 1")
        return {"policy": pol, "graph": g, "kernels_per_inference": 0 if (g or pol == "empty") else 3}

    monkeypatch.setattr(bench, "_ncu_dram", child)
    cfg = RunConfig(workload="mlp", width=96, layers=3, graph=graph)
    rec = results.Record(name="l2-test", config={})
    rows = bench.ncu_rows(rec, cfg, ["default", "persist", "empty", "failing"], n_reqs=3)
    retried = [(p, 3, False) for p in ("default", "persist", "empty")]
    if graph:
        assert calls == [c for p in ("default", "persist", "empty") for c in ((p, 3, True), (p, 3, False))] + [
            ("failing", 3, True)]
        assert [r["policy"] for r in rows] == ["default", "persist"] and all(not r["graph"] for r in rows)
        assert sum("launched eagerly (--no-graph)" in n for n in rec.notes) == 2
        assert "with --graph or without" in rec.checks["ncu[empty]"]["detail"]
    else:
        assert calls == retried + [("failing", 3, False)]
        assert [r["policy"] for r in rows] == ["default", "persist"] and not rec.notes
        assert "with --graph" not in rec.checks["ncu[empty]"]["detail"]
    assert not rec.checks["ncu[empty]"]["passed"] and rec.checks["ncu[failing]"]["detail"] == "ncu exited 1"


def test_attach_ncu_rows_compares_dram_reads_only_between_runs_launched_alike():
    """DRAM reads against default's only where both children were launched the same way (graph or eager); the
    auto row shows the figures of the policy it chose."""
    from gpulab.core import results
    from gpulab.l2 import bench

    def ncu_row(pol, graph, read):
        return {"policy": pol, "graph": graph, "dram_read_bytes_per_inference": read,
                "dram_write_bytes_per_inference": 1.0, "l2_hit_rate_pct": 50.0}

    rec = results.Record(name="l2-test", config={})
    rec.rows = [{"policy": p} for p in ("default", "persist", "prefetch")] + [{"policy": "auto", "chose": "persist"}]
    bench.attach_ncu_rows(rec, [ncu_row("default", True, 200.0), ncu_row("persist", True, 100.0),
                                ncu_row("prefetch", False, 50.0)])
    by = {r["policy"]: r for r in rec.rows}
    assert by["default"]["dram_read_vs_default"] == 1.0 and by["persist"]["dram_read_vs_default"] == 0.5
    assert "dram_read_vs_default" not in by["prefetch"] and by["prefetch"]["dram_read_mib"] == 50.0 / bench.MIB
    assert by["auto"]["dram_read_vs_default"] == 0.5
    assert rec.notes == ["ncu[prefetch]: dram_read_vs_default left out (profiled launched eagerly, default as a CUDA "
                         "graph)"]


def test_ncu_rows_eager_retry_failing_says_why_it_ran(monkeypatch):
    from gpulab.core import results
    from gpulab.core.errors import GpulabError
    from gpulab.l2 import bench

    def child(cfg, pol, reps, graph=None):
        if graph is False:
            raise GpulabError("ncu exited 9")
        return {"policy": pol, "graph": True, "kernels_per_inference": 0}

    monkeypatch.setattr(bench, "_ncu_dram", child)
    rec = results.Record(name="l2-test", config={})
    assert bench.ncu_rows(rec, RunConfig(workload="mlp", width=96, layers=3, graph=True), ["default"], 1) == []
    assert rec.checks["ncu[default]"]["detail"] == ("the CUDA-graph run profiled no kernel inside the l2-measure NVTX "
                                                    "range, and the eager run failed: ncu exited 9")


def test_weight_rate_of_each_row_is_the_stream_mean_over_its_median():
    """weight_gbps: the weight bytes an inference reads (averaged over the subnets of the stream; the whole arena for
    a plain model) over the row's median latency."""
    from gpulab.l2.bench import add_weight_rates, build_workload, request_weight_bytes

    mlp = build_workload(RunConfig(workload="mlp", width=64, layers=2, batch=1), "cpu", torch.float32)
    assert request_weight_bytes(mlp) == mlp.arena.total_bytes
    mf = build_workload(RunConfig(workload="matformer", width=16, layers=2, batch=1, subnets=3), "cpu", torch.float32)
    per = [mf.subnet_weight_bytes(c) for c in mf.subnets]
    assert request_weight_bytes(mf) == pytest.approx(sum(per) / 3) and len(set(per)) > 1
    rows = [{"policy": "default", "median_ms": 2.0}, {"policy": "persist", "median_ms": 1.0},
            {"policy": "auto", "median_ms": None}]
    add_weight_rates(rows, 4e6)
    assert rows[0]["weight_gbps"] == 2.0 and rows[1]["weight_gbps"] == 4.0 and "weight_gbps" not in rows[2]


def test_policy_outputs_are_checked_from_buffers_their_own_run_wrote():
    """The matformer's requests run into buffers of their own, shared by every policy's run (and filled by the eager
    warm-ups before a graph is captured): a policy's checked output must come from its own run, not from what an
    earlier run left there, or `{policy}_same_output_as_default` (and `kernels_vs_reference`) could not fail."""
    import contextlib
    from types import SimpleNamespace

    from gpulab.l2.matformer import MatConfig, MatFormerSupernet
    from gpulab.l2.models import run_layers

    m = MatFormerSupernet(16, 2, [MatConfig((1, 2)), MatConfig.largest(2)], 2, torch.float32, "cpu")
    r = PolicyRunner.__new__(PolicyRunner)
    r.cfg = RunConfig(workload="matformer", width=16, layers=2, batch=2, subnets=2)
    r.requests = m.requests("torch")
    r.main = None
    r.installed = lambda policy: contextlib.nullcontext()
    r.torch = SimpleNamespace(cuda=SimpleNamespace(stream=lambda s: contextlib.nullcontext(), synchronize=lambda: None))
    ran = {}

    def infer(i, policy):  # 'broken' launches nothing (a replay that ran no kernel): its output is the last run's
        if policy == "broken":
            return ran[i]
        ran[i] = run_layers(r.requests[i].x, r.requests[i].layers)
        return ran[i]

    r.infer = infer
    good = r.outputs("default")
    assert all(bool(torch.isfinite(y).all()) for y in good)
    again = r.outputs("default")
    assert all(torch.equal(a, b) for a, b in zip(again, good))
    broken = r.outputs("broken")
    assert not any(torch.equal(a, b) for a, b in zip(broken, good))
