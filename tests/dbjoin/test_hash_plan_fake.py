"""The host side of the CUDA hash join on this CPU machine: CudaHashJoin and HashJoinPlan run against
fake_cupy (host memory, stream capture recorded and replayed, the numba model's kernels on the CUDA
kernels' arguments and table layout). This checks buffer layout, the one memset (table + counters), the
count copy, capture and replay, the capacity retry and the no-graph fallback. The CUDA C kernels run on the
CPU in test_hash_cuda_c_on_cpu.py; NVRTC, real stream capture and the timings are checked only by the GPU tests
(-m gpu). The ``fake`` fixture is in conftest.py."""
import numpy as np
import pytest

from gpulab.dbjoin import hash_join_cuda as hjc
from gpulab.dbjoin import reference

from .cases import CASE_IDS, CASES
from .test_cpu_joins import _check


def _host(res):
    if res.left is None:
        return reference.JoinResult(res.count)
    return reference.JoinResult(res.count, np.array(res.left), np.array(res.right))


@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_plan_and_eager_on_fake_device(fake, dt, name):
    lk, rk = CASES[dt][name]
    _check(hjc.CudaHashJoin().join(lk, rk), lk, rk)
    assert hjc.CudaHashJoin().join(lk, rk, count_only=True).count == reference.output_size(lk, rk)
    plan = hjc.HashJoinPlan(lk, rk)
    if plan.empty:
        assert plan.graph is None and plan.run().count == 0
        return
    assert plan.graph is not None, plan.graph_error
    first = _host(plan.run())
    _check(first, lk, rk)
    second = plan.run()  # the graph replayed
    _check(second, lk, rk)
    assert np.array_equal(reference.canonical(*first.numpy_pairs()), reference.canonical(*second.numpy_pairs()))
    counted = hjc.HashJoinPlan(lk, rk, count_only=True)
    assert counted.run().count == counted.run().count == reference.output_size(lk, rk)


def test_graph_is_the_whole_pipeline(fake):
    lk, rk = CASES["int64"]["zipf"]
    plan = hjc.HashJoinPlan(lk, rk)
    plan.run()  # duplicates: this first run grows the outputs and re-captures
    fake._State.launches.clear()
    plan.run()
    plan.run()
    assert plan.retries == 1
    assert fake._State.launches == []  # replays launch no kernel from the host: the graph holds them
    assert plan.graph.launches >= 2
    # memset (table + counters), insert, group_alloc, group_scatter, probe, count copy: six recorded ops
    assert len(plan.graph.ops) == 6


def test_memset_empties_table_and_counters(fake):
    """Garbage left in the table, the counters and slot_off before a run does not change the result."""
    lk, rk = CASES["int32"]["sentinel"]
    plan = hjc.HashJoinPlan(lk, rk)
    plan._table[...] = np.uint64(0xDEADBEEFDEADBEEF)
    plan._slot_off[...] = 12345
    plan._grouped[...] = -7
    _check(_host(plan.run()), lk, rk)


def test_plan_duplicates_retry_once_then_replay(fake):
    lk, rk = CASES["int32"]["all-match"]  # 1200 pairs, 40 probe rows: the first capacity is short
    plan = hjc.HashJoinPlan(lk, rk)
    _check(_host(plan.run()), lk, rk)
    assert plan.retries == 1 and plan.capacity == 1200 and plan.graph is not None
    _check(_host(plan.run()), lk, rk)
    assert plan.retries == 1
    times = plan.replay_times_ms(3)
    assert len(times) == 3 and all(t > 0 for t in times)
    _check(plan.run(), lk, rk)


def test_phase_times_split_one_run_and_keep_the_outputs(fake):
    lk, rk = CASES["int32"]["all-match"]
    plan = hjc.HashJoinPlan(lk, rk)
    plan.run()  # grows the outputs to the exact size first
    fake._State.launches.clear()
    phases = plan.phase_times_ms(2)
    assert tuple(phases) == hjc.PHASES and all(t > 0 for t in phases.values())
    # 3 runs (one untimed) of the pipeline launched directly, not replayed: 4 kernels each
    assert len(fake._State.launches) == 3 * 4
    _check(_host(plan.run()), lk, rk)
    assert plan.phase_times_ms(0) == {}


def test_plan_follows_its_buffers(fake):
    lk, rk = CASES["int64"]["unique-half"]
    plan = hjc.HashJoinPlan(lk, rk)
    _check(_host(plan.run()), lk, rk)
    lk2 = np.full_like(lk, rk[0])
    plan._probe[...] = lk2  # the left (probe) buffer rewritten in place
    _check(_host(plan.run()), lk2, rk)


def test_capture_failure_falls_back_to_direct_launches(fake):
    fake._State.fail_capture_at = "group_alloc"
    lk, rk = CASES["int64"]["unique-half"]  # unique build keys: no retry, so no second capture
    plan = hjc.HashJoinPlan(lk, rk)
    assert plan.graph is None and "group_alloc" in plan.graph_error
    assert not plan.stream.capturing
    fake._State.fail_capture_at = None
    _check(_host(plan.run()), lk, rk)
    assert plan.replay_times_ms(2) == []
    no_graph = hjc.HashJoinPlan(lk, rk, use_graph=False)
    assert no_graph.graph is None and no_graph.graph_error is None
    _check(no_graph.run(), lk, rk)


def test_eager_retry_resets_only_the_output_counter(fake):
    lk, rk = CASES["int64"]["zipf"]
    hj = hjc.CudaHashJoin()
    _check(hj.join(lk, rk), lk, rk)
    assert hj.retries == 1


@pytest.mark.parametrize("sms,threads,want", [(108, 2048, 864),   # A100: 8 blocks of 256 per SM
                                              (132, 2048, 1056),  # H100 SXM
                                              (82, 1536, 492),    # RTX 3090 (sm_86): 6 per SM
                                              (142, 1536, 852),   # L40S (sm_89)
                                              (128, None, 1024)])  # no thread count in the properties
def test_wave_blocks_follow_threads_per_sm(sms, threads, want):
    props = {"multiProcessorCount": sms}
    if threads is not None:
        props["maxThreadsPerMultiProcessor"] = threads
    assert hjc.wave_blocks(props) == want


def test_group_grid_is_one_wave_of_this_device(fake):
    """The grid-stride group kernels get one wave of the (fake: 2 SMs of 1536 threads, as sm_86/sm_89) device,
    not the 8 blocks per SM that fit only on 2048-thread SMs (A100, H100)."""
    assert hjc._group_grid(10**6) == (2 * 6,)
    assert hjc._group_grid(1000) == (4,)  # fewer rows than a wave: one block per 256 rows
