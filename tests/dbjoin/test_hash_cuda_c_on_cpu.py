"""hash_join.cu itself, run on this CPU (tests/cuda_on_cpu), under the real host code (CudaHashJoin, HashJoinPlan
with graph capture and replay, through fake_cupy): the CAS insert racing on shared slots (threads of three
blocks in flight switch before every atomic, in a seeded random order), the empty-key slot, duplicate
grouping, the warp-shuffle block scan that reserves output positions, and the capacity retry, with the exact
argument types the kernels declare. Checked against pandas on every join case. The GPU memory model and
speed are left to the GPU tests."""
import numpy as np
import pytest

from gpulab.dbjoin import hash_join_cuda as hjc
from gpulab.dbjoin import reference, tables

from ..cuda_on_cpu.module import GXX
from .cases import CASE_IDS, CASES
from .test_cpu_joins import _check
from .test_hash_plan_fake import _host

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not installed")


@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_cuda_c_joins(cuda_c, dt, name):
    lk, rk = CASES[dt][name]
    module = cuda_c(len(lk) * 7 + len(rk))
    _check(hjc.CudaHashJoin().join(lk, rk), lk, rk)
    assert hjc.CudaHashJoin().join(lk, rk, count_only=True).count == reference.output_size(lk, rk)
    plan = hjc.HashJoinPlan(lk, rk)
    if plan.empty:
        return
    assert plan.graph is not None, plan.graph_error
    _check(_host(plan.run()), lk, rk)
    _check(_host(plan.run()), lk, rk)  # the graph replayed
    counted = hjc.HashJoinPlan(lk, rk, count_only=True)
    assert counted.run().count == counted.run().count == reference.output_size(lk, rk)
    assert module.launches > 0


@pytest.mark.parametrize("dt, dup, seed", [("int32", "unique", 0), ("int64", "zipf:1.3", 1), ("int32", "zipf:2", 2)])
def test_cuda_c_several_blocks(cuda_c, dt, dup, seed):
    """Thousands of rows: several blocks in every kernel, output positions reserved block by block."""
    left, right = tables.generate(3000, 2000, 0.5, dup, seed, dt)
    module = cuda_c(seed)
    plan = hjc.HashJoinPlan(left.key, right.key)
    _check(_host(plan.run()), left.key, right.key)
    _check(_host(plan.run()), left.key, right.key)
    assert module.get_function(f"hj_probe_{'i32' if dt == 'int32' else 'i64'}").launches >= 2


@pytest.mark.parametrize("seed", range(4))
def test_cuda_c_slot_races(cuda_c, seed):
    """Build keys that collide on few home slots, in one block: the CAS loop's lost races and re-probes."""
    rng = np.random.default_rng(seed)
    build = rng.integers(-40, 40, 200).astype(np.int32)
    probe = rng.integers(-50, 50, 300).astype(np.int32)
    cuda_c(seed)
    _check(hjc.CudaHashJoin().join(probe, build), probe, build)


# (build keys, probe keys, retries, final capacity). The first probe's capacity is the probe row count.
RETRY_CASES = {
    # 60 probe rows: two rows of a key with 30 build rows take positions 0-59, so the next row's single match falls
    # exactly at the capacity: it must not be written (the device arrays' guard bytes would show it), and the
    # retry gets all 61 pairs
    "one-past": ([7] * 30 + [5], [7, 7, 5] + list(range(100, 157)), 1, 61),
    # unique build keys and one match per probe row: the output is exactly full, no reason to probe again
    "exactly-full": ([3, -8, 12, 40, 41, 999, -1000], [12, 3, 3, -8, 40, 41, 999, -1000, 12, 41, 3], 0, 11),
}


@pytest.mark.parametrize("case", RETRY_CASES)
@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_cuda_c_first_probe_capacity_and_retry(cuda_c, dt, case):
    build, probe, retries, capacity = RETRY_CASES[case]
    build, probe = np.array(build, dtype=dt), np.array(probe, dtype=dt)
    cuda_c(0 if case == "one-past" else 1)
    hj = hjc.CudaHashJoin()
    _check(hj.join(probe, build), probe, build)
    assert hj.retries == retries
    plan = hjc.HashJoinPlan(probe, build)
    _check(_host(plan.run()), probe, build)
    assert plan.retries == retries and plan.capacity == capacity


def test_non_integer_keys_are_refused_before_widening(cuda_c):
    """float32 keys beside int32 ones are an error, not silently widened to int64 with the others."""
    from gpulab.core.errors import InputError

    cuda_c(0)
    with pytest.raises(InputError, match="keys must be int32 or int64, got float32 and int32"):
        hjc.CudaHashJoin().join(np.zeros(3, np.float32), np.zeros(3, np.int32))
