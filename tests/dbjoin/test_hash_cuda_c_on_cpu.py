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


@pytest.mark.parametrize("dt", ["int32", "int64"])
@pytest.mark.parametrize("seed", range(4))
def test_cuda_c_slot_races(cuda_c, seed, dt):
    """Build keys that collide on few home slots, in one block: the CAS loop's lost races and re-probes."""
    rng = np.random.default_rng(seed)
    build = rng.integers(-40, 40, 200).astype(dt)
    probe = rng.integers(-50, 50, 300).astype(dt)
    cuda_c(seed)
    _check(hjc.CudaHashJoin().join(probe, build), probe, build)


def _decoded_table(plan):
    """{key: (build-row count, first row)} of the plan's table after a run, decoded from its 16-byte slots as
    hash_join.cu lays them out, and the duplicated-key counter (counters[2])."""
    words = np.array(plan._table).view(np.uint64)
    slots = words[: 2 * (plan.cap + 1)].reshape(-1, 2)
    is64 = plan.suffix == "i64"
    empty = np.iinfo(np.int64 if is64 else np.int32).min
    found = {}
    for s, (w0, w1) in enumerate(slots):
        w0, w1 = int(w0), int(w1)
        if is64:  # SlotI64 {encoded key, extra, row}: a claimed slot counts its claiming row implicitly
            ek, count, row = w0, (w1 & 0xFFFFFFFF) + (w0 != 0), w1 >> 32
            key = empty if s == plan.cap else int(np.uint64(ek ^ (1 << 63)).view(np.int64))
        else:  # SlotI32 {encoded key << 32 | count, row, pad}
            ek, count, row = w0 >> 32, w0 & 0xFFFFFFFF, w1 & 0xFFFFFFFF
            key = empty if s == plan.cap else int(np.uint32(ek ^ (1 << 31)).view(np.int32))
        if s != plan.cap and ek == 0:
            assert count == 0, f"an empty slot {s} with a count"
            continue
        if count:
            found[key] = (count, row)
    return found, int(np.array(plan._counters)[2])


@pytest.mark.parametrize("dt", ["int32", "int64"])
@pytest.mark.parametrize("seed", range(3))
def test_cuda_c_table_counts_every_build_row_once(cuda_c, dt, seed):
    """After the insert, each key's slot holds its exact number of build rows and one of its rows, and the
    duplicated-key counter counts each repeated key exactly once: the claim's implicit row (int64 slots), groups
    of a warp that share a key (one of which claims), later groups that find it, and the empty-marker key."""
    rng = np.random.default_rng(seed)
    lo = np.iinfo(dt).min
    build = np.concatenate([rng.integers(-30, 30, 500), np.full(40, 7), np.full(5, lo), rng.integers(100, 900, 200)])
    build = rng.permutation(build).astype(dt)
    probe = rng.integers(-30, 30, 900).astype(dt)
    cuda_c(seed)
    plan = hjc.HashJoinPlan(probe, build)
    _check(_host(plan.run()), probe, build)
    found, duplicated = _decoded_table(plan)
    keys, counts = np.unique(build, return_counts=True)
    assert {k: c for k, (c, _) in found.items()} == dict(zip(keys.tolist(), counts.tolist()))
    for k, (_, row) in found.items():
        assert build[row] == k, f"key {k}: its slot names build row {row}, which holds {build[row]}"
    assert duplicated == int((counts > 1).sum())


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


@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_cuda_c_strided_device_keys(cuda_c, dt):
    """A strided cupy view (every other key): the kernels read raw pointers, so the join must take a contiguous
    copy, or it joins the memory behind the view (0 pairs here instead of 3)."""
    import cupy as cp  # the fake, installed by the fixture

    cuda_c(200)
    lk = cp.asarray(np.arange(40, dtype=dt))[::2]  # keys 0, 2, ..., 38
    rk = cp.asarray(np.array([20, 30, 38, 7], dtype=dt))
    host_l = np.arange(0, 40, 2, dtype=dt)
    _check(hjc.CudaHashJoin().join(lk, rk), host_l, np.asarray(rk))
    assert hjc.CudaHashJoin().join(lk, rk, count_only=True).count == 3


def test_join_keys_must_be_one_dimensional(cuda_c):
    from gpulab.core.errors import InputError

    cuda_c(50)
    with pytest.raises(InputError, match="left join keys must be 1-D, got shape \\[3, 2\\]"):
        hjc.CudaHashJoin().join(np.zeros((3, 2), np.int32), np.zeros(4, np.int32))
