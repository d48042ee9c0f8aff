"""SortPlan (a bitonic sort captured as one CUDA graph) through the emulated cupy of test_driver_emulated.py.

The emulation's capture keeps what a stream is given between begin_capture and end_capture instead of running
it, and a graph launch queues it again: so these tests check the plan's own logic (one direct run before the
capture, everything the sort needs inside the captured sequence, replays that sort what the bound buffer holds
now, the fallback without a graph). Whether CUDA accepts the capture is for the GPU test in test_gpu.py.
"""
import numpy as np
import pytest

from gpulab.sort import reference as ref
from gpulab.sort.sort_plan import SortPlan

from .test_driver_emulated import DevArray, emulated, inputs  # noqa: F401 - emulated is a fixture

CASES = [("bitonic-fused", 20000, "int32", "asc", False), ("bitonic-fused", 5000, "float32", "desc", True),
         ("bitonic-shared", 3000, "int64", "asc", True), ("bitonic-global", 1025, "uint32", "desc", True),
         ("bitonic-fused@t14f4g5", 40000, "int32", "desc", False)]


@pytest.mark.parametrize("variant, n, dtype, order, kv", CASES)
def test_replays_sort_what_the_buffer_holds(emulated, variant, n, dtype, order, kv):
    sched, bit = emulated(0)
    rng = np.random.default_rng(n)
    x = inputs(n, dtype, rng).view(DevArray)
    plan = SortPlan(bit, x, variant, order, kv)
    assert plan.graph is not None and plan.graph_error is None
    calls = []
    real = bit.launch_all
    bit.launch_all = lambda *a, **k: calls.append(1) or real(*a, **k)
    for round_ in range(3):
        if round_:
            x[:] = inputs(n, dtype, rng)  # new contents of the bound buffer
        out, perm = plan.run()
        plan.stream.synchronize()
        assert ref.mismatch(np.asarray(out), ref.sort(np.asarray(x), order)) is None, round_
        if kv:
            assert perm.dtype == np.int64 and np.array_equal(np.asarray(perm), ref.argsort(np.asarray(x), order))
        else:
            assert perm is None
    assert calls == [] and plan.graph.launches == 3  # replays only: no launch through the driver


def test_without_a_graph_it_launches_directly(emulated):
    sched, bit = emulated(1)
    x = inputs(5000, "int32", np.random.default_rng(0)).view(DevArray)
    plan = SortPlan(bit, x, "bitonic-fused", "asc", kv=True, use_graph=False)
    assert plan.graph is None
    out, perm = plan.run()
    plan.stream.synchronize()
    assert ref.mismatch(np.asarray(out), ref.sort(np.asarray(x))) is None
    assert np.array_equal(np.asarray(perm), ref.argsort(np.asarray(x)))


def test_a_failed_capture_is_reported_and_falls_back(emulated, monkeypatch):
    sched, bit = emulated(2)
    x = inputs(3000, "float32", np.random.default_rng(1)).view(DevArray)
    real = bit.launch_all

    def refuse_in_capture(*a, **k):
        if hasattr(bit.cp.cuda.get_current_stream(), "_live"):
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(*a, **k)

    monkeypatch.setattr(bit, "launch_all", refuse_in_capture)
    plan = SortPlan(bit, x, "bitonic-shared", "desc")
    assert plan.graph is None and "operation not permitted when stream is capturing" in plan.graph_error
    assert not hasattr(plan.stream, "_live")  # the capture was ended
    out, _ = plan.run()
    plan.stream.synchronize()
    assert ref.mismatch(np.asarray(out), ref.sort(np.asarray(x), "desc")) is None


def test_empty_input_and_bad_arguments(emulated):
    from gpulab.core.errors import InputError

    sched, bit = emulated(0)
    plan = SortPlan(bit, np.zeros(0, np.int32).view(DevArray))
    out, perm = plan.run()
    assert out.shape == (0,) and perm is None and plan.graph is None
    with pytest.raises(InputError, match="expected a cupy array"):
        SortPlan(bit, np.zeros(3, np.int32))
    with pytest.raises(InputError, match="order must be asc or desc"):
        SortPlan(bit, np.zeros(3, np.int32).view(DevArray), order="up")


def test_bench_graph_sort_keeps_one_plan_per_buffer(emulated):
    """sort bench --graph: the timed function captures once per input buffer and replays after; its row says so."""
    from gpulab.core import results
    from gpulab.sort.bench import BenchArgs, _graph_sort

    sched, bit = emulated(3)
    rng = np.random.default_rng(9)
    a, b = (inputs(4000, "int32", rng).view(DevArray) for _ in range(2))
    rec, row = results.Record("t", device={"backend": "cpu"}), {"impl": "bitonic-fused"}
    cfn = _graph_sort(rec, row, bit, "bitonic-fused", BenchArgs(n=4000, order="desc", kv=True))
    for x in (a, a, b, a):
        out, perm = cfn(x)
        sched.drain()
        assert ref.mismatch(np.asarray(out), ref.sort(np.asarray(x), "desc")) is None
        assert np.array_equal(np.asarray(perm), ref.argsort(np.asarray(x), "desc"))
    assert row["timed"] == "graph replay" and rec.notes == []
