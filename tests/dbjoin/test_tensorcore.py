"""The Triton tensor-core join: CPU under TRITON_INTERPRET=1 (fp32 codes); fp16/bf16/int8 on a GPU."""
import os

import numpy as np
import pytest

from gpulab.dbjoin import reference, tables

from .cases import CASE_IDS, CASES
from .test_cpu_joins import _check

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()
interpreted = pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="no GPU and TRITON_INTERPRET is not 1")


def _np_fmix32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x85EBCA6B)
        x ^= x >> np.uint32(13)
        x *= np.uint32(0xC2B2AE35)
        x ^= x >> np.uint32(16)
    return x


def test_fmix32_matches_uint32_arithmetic():
    from gpulab.dbjoin.tensorcore_join import fmix32

    x = np.concatenate([np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1], np.int64),
                        np.random.default_rng(0).integers(0, 2**32, 1000)])
    got = fmix32(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, _np_fmix32(x).astype(np.int64))


def test_mix_is_injective_on_hard_keys():
    """Distinct keys keep distinct (lo, hi) words: extremes, +-1, keys differing only in high or low halves."""
    from gpulab.dbjoin.tensorcore_join import mix_key

    i64 = np.iinfo(np.int64)
    base = np.arange(-500, 500, dtype=np.int64)
    keys = np.unique(np.concatenate([base, base << 32, (base << 32) + 1, base + (1 << 32), [i64.min, i64.max,
                                     i64.min + 1, i64.max - 1, -(2**32), 2**32, 2**31, -(2**31)]]))
    lo, hi = mix_key(torch.from_numpy(keys))
    words = (hi.numpy().astype(np.uint64) << np.uint64(32)) | lo.numpy().astype(np.uint64)
    assert len(np.unique(words)) == len(keys)
    assert lo.min() >= 0 and lo.max() < 2**32 and hi.min() >= 0 and hi.max() < 2**32
    k32 = np.unique(np.concatenate([np.arange(-1000, 1000), [-(2**31), 2**31 - 1]])).astype(np.int32)
    lo32, hi32 = mix_key(torch.from_numpy(k32))
    assert hi32 is None and len(np.unique(lo32.numpy())) == len(k32)


def test_partition_layout():
    from gpulab.dbjoin.tensorcore_join import partition

    key = torch.from_numpy(tables.generate(500, None, 0.5, "unique", 1, "int64")[0].key)
    p = partition(key, 4)
    assert int(p.count.sum()) == 500 and len(p.count) == 16
    assert np.array_equal(np.sort(p.row.numpy()), np.arange(500))
    starts = p.start.numpy()
    assert np.array_equal(starts, np.concatenate([[0], np.cumsum(p.count.numpy())[:-1]]))
    part = p.lo.numpy().astype(np.int64) & 15
    for q in range(16):  # every row sits in its partition's range
        assert np.all(part[starts[q]:starts[q] + p.count.numpy()[q]] == q)


@interpreted
@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_tensorcore_interpreted(dt, name):
    from gpulab.dbjoin.tensorcore_join import TensorCoreJoin

    lk, rk = CASES[dt][name]
    dev = "cuda" if HAS_CUDA else "cpu"
    tc = TensorCoreJoin("fp32", block=16, rows_per_partition=8)  # many partitions: several programs per case
    _check(tc.join(torch.from_numpy(lk).to(dev), torch.from_numpy(rk).to(dev)), lk, rk)


@interpreted
@pytest.mark.parametrize("dup", ["left", "right", "both"])
@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_tensorcore_emits_by_row_by_column_and_in_full(dt, dup):
    """A tile's matches are written one per left row (right keys unique in it), one per right row (left keys
    unique) or in full (duplicates on both sides). With a partition inside one tile, every key that is
    repeated on one side and present on the other puts its tile on the path named by ``dup``."""
    from gpulab.dbjoin.tensorcore_join import TensorCoreJoin

    rng = np.random.default_rng(11)
    unique = rng.permutation(np.arange(-60, 60)).astype(dt)
    repeated = rng.permutation(np.repeat(np.arange(-80, 80, 3), 3)).astype(dt)  # 3 rows per key
    lk, rk = {"left": (repeated, unique), "right": (unique, repeated), "both": (repeated, repeated[::-1].copy())}[dup]
    dev = "cuda" if HAS_CUDA else "cpu"
    tc = TensorCoreJoin("fp32", block=32, rows_per_partition=8)
    _check(tc.join(torch.from_numpy(lk).to(dev), torch.from_numpy(rk).to(dev)), lk, rk)


@interpreted
@pytest.mark.parametrize("dt,name", [c for c in CASE_IDS if c[1] in ("dup-both-negative", "zipf", "sentinel",
                                                                     "all-match", "single", "int64-high-bits")])
def test_tensorcore_join_on_the_counting_partition(dt, name, monkeypatch):
    """The whole join on the GPU's partition (the Triton counting sort, forced here on the interpreter)."""
    import functools

    from gpulab.dbjoin import tensorcore_join as T

    monkeypatch.setattr(T, "partition", functools.partial(T.partition, fused=True))
    lk, rk = CASES[dt][name]
    dev = "cuda" if HAS_CUDA else "cpu"
    _check(T.TensorCoreJoin("fp32", block=16, rows_per_partition=8).join(torch.from_numpy(lk).to(dev),
                                                                         torch.from_numpy(rk).to(dev)), lk, rk)


@interpreted
def test_tensorcore_count_only_retry_and_multi_tile_partitions():
    from gpulab.dbjoin.tensorcore_join import TensorCoreJoin

    dev = "cuda" if HAS_CUDA else "cpu"  # CPU tensors only under the interpreter
    lk, rk = CASES["int32"]["all-match"]  # 1200 pairs > capacity guess 40: the kernel runs again
    tc = TensorCoreJoin("fp32", block=16)
    marks = []
    _check(tc.join(torch.from_numpy(lk).to(dev), torch.from_numpy(rk).to(dev), mark=marks.append), lk, rk)
    assert tc.retries == 1
    assert marks == ["partition_left", "partition_right", "join", "join_retry"]  # phase_times_ms's event points
    if not HAS_CUDA:
        assert tc.phase_times_ms(torch.from_numpy(lk), torch.from_numpy(rk)) == {}  # CUDA events only
    assert tc.join(torch.from_numpy(lk).to(dev), torch.from_numpy(rk).to(dev), count_only=True).count == 1200
    # one partition for everything: each program loops over several BM x BN tiles
    lk, rk = CASES["int64"]["unique-half"]
    tc = TensorCoreJoin("fp32", block=32, rows_per_partition=1000)
    _check(tc.join(torch.from_numpy(lk).to(dev), torch.from_numpy(rk).to(dev)), lk, rk)
    assert tc.last_partitions == 1


def test_tensorcore_rejects_bad_options():
    from gpulab.core.errors import InputError
    from gpulab.dbjoin.tensorcore_join import TensorCoreJoin

    with pytest.raises(InputError, match="tc-dtype"):
        TensorCoreJoin("fp64")
    with pytest.raises(InputError, match="tc-block"):
        TensorCoreJoin("fp16", block=48)


@pytest.mark.gpu
@pytest.mark.parametrize("code", ["fp16", "bf16", "int8", "fp32"])
@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_tensorcore_gpu_codes(code, dt):
    from gpulab.dbjoin.tensorcore_join import TensorCoreJoin

    for name in ("dup-both-negative", "sentinel", "zipf", "all-match", "no-match", "left-empty"):
        lk, rk = CASES[dt][name]
        res = TensorCoreJoin(code, block=64).join(torch.from_numpy(lk).cuda(), torch.from_numpy(rk).cuda())
        _check(res, lk, rk)
    for dup in ("unique", "zipf:0.7"):
        left, right = tables.generate(100_000, 80_000, 0.5, dup, 5, dt)
        tc = TensorCoreJoin(code, block=64)
        res = tc.join(torch.from_numpy(left.key).cuda(), torch.from_numpy(right.key).cuda())
        _check(res, left.key, right.key)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [32, 64])  # 128: ~10 s of compile; sm_90 AOT-checked in test_tensorcore_compile
def test_tensorcore_gpu_1m(block):
    from gpulab.dbjoin.tensorcore_join import TensorCoreJoin

    left, right = tables.generate(1_000_000, None, 0.5, "unique", 0, "int32")
    res = TensorCoreJoin("fp16", block=block).join(torch.from_numpy(left.key).cuda(), torch.from_numpy(right.key).cuda())
    _check(res, left.key, right.key)
    cnt = TensorCoreJoin("int8", block=block).join(torch.from_numpy(left.key).cuda(),
                                                    torch.from_numpy(right.key).cuda(), count_only=True)
    assert cnt.count == reference.output_size(left.key, right.key)
    phases = TensorCoreJoin("fp16", block=block).phase_times_ms(torch.from_numpy(left.key).cuda(),
                                                                torch.from_numpy(right.key).cuda(), reps=2)
    assert list(phases) == ["partition_left", "partition_right", "join"] and all(t > 0 for t in phases.values())


@interpreted
@pytest.mark.parametrize("dt", ["int32", "int64"])
@pytest.mark.parametrize("bits", [0, 3, 5])
def test_counting_partition_equals_torch_partition(dt, bits):
    """The Triton counting-sort partition (used on the GPU: mixing in the kernels, atomic counts and cursors) holds
    the same rows with the same mixed words in each partition as the torch reference (mix + stable sort); only
    the order inside a partition may differ."""
    from gpulab.dbjoin.tensorcore_join import partition

    info = np.iinfo(dt)
    keys = np.concatenate([CASES[dt]["sentinel"][0], CASES[dt]["unique-half"][0], [info.min, info.max, -1, 0, 0]])
    key = torch.from_numpy(keys.astype(dt))
    if HAS_CUDA:
        key = key.cuda()
    a, b = partition(key, bits, fused=True), partition(key, bits, fused=False)
    for f in ("start", "count"):
        assert torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()), f
    assert a.hi.shape == b.hi.shape and (dt == "int64" or int(a.hi.cpu()[0]) == 0)
    starts, counts = b.start.cpu().tolist(), b.count.cpu().tolist()
    cols = ("row", "lo", "hi") if dt == "int64" else ("row", "lo")
    for s0, c in zip(starts, counts):  # per partition: the same (row, lo, hi) triples
        rows = [sorted(zip(*(getattr(p, f).cpu()[s0:s0 + c].tolist() for f in cols))) for p in (a, b)]
        assert rows[0] == rows[1]
    assert torch.equal(torch.sort(a.row.cpu())[0], torch.arange(len(keys), dtype=torch.int32))


@interpreted
def test_strided_keys_and_float_keys():
    """A strided view (every other key) joins as its contiguous copy on the counting partition (the kernels read
    key + offset); float keys are refused (the encoding would truncate 1.5 to 1)."""
    import functools

    from gpulab.core.errors import InputError
    from gpulab.dbjoin import tensorcore_join as T

    dev = "cuda" if HAS_CUDA else "cpu"
    base = torch.arange(32, dtype=torch.int32, device=dev)
    right = torch.arange(0, 64, 4, dtype=torch.int32, device=dev)
    tc = T.TensorCoreJoin("fp32", block=16, rows_per_partition=8)
    for fused in (True, False):
        T_part = functools.partial(T.partition.__wrapped__ if hasattr(T.partition, "__wrapped__") else T.partition,
                                   fused=fused)
        orig = T.partition
        T.partition = T_part
        try:
            got = tc.join(base[::2], right, count_only=True).count
        finally:
            T.partition = orig
        assert got == reference.output_size(base[::2].cpu().numpy(), right.cpu().numpy()), fused
    with pytest.raises(InputError, match="left join keys must be int32 or int64, got float32"):
        tc.join(base.float(), right)


@interpreted
def test_an_output_that_cannot_fit_is_a_one_line_error(monkeypatch):
    """The retry with the exact output size checks that the pairs fit before allocating them."""
    from gpulab.core.errors import InputError
    from gpulab.dbjoin import tensorcore_join as T

    real = T._check_pairs_fit
    real(1000, torch.device("cpu"))
    with pytest.raises(InputError, match="pairs .* more than fits; use --count-only"):
        real(1 << 40, torch.device("cpu"))
    monkeypatch.setattr(T, "_check_pairs_fit", lambda total, dev: (_ for _ in ()).throw(
        InputError(f"the join output has {total} pairs")))
    keys = torch.zeros(8, dtype=torch.int32)  # 8 x 8 equal keys: 64 pairs, more than the first guess of 8
    with pytest.raises(InputError, match="has 64 pairs"):
        T.TensorCoreJoin("fp32", block=16, rows_per_partition=8).join(keys, keys)


def test_tensorcore_keys_must_be_one_dimensional():
    import torch

    from gpulab.core.errors import InputError
    from gpulab.dbjoin.tensorcore_join import check_key_dtypes

    with pytest.raises(InputError, match="right join keys must be 1-D"):
        check_key_dtypes(torch.zeros(3, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32))


@interpreted
@pytest.mark.parametrize("dt,name", [c for c in CASE_IDS if c[1] in ("dup-both-negative", "zipf", "sentinel",
                                                                     "all-match", "no-match", "left-empty")])
def test_tensorcore_plan_equals_pandas(dt, name):
    """The prepared plan (tensorcore-graph; launched eagerly here, as off CUDA or when capture fails): exact on
    every run, its output grown to the count when max(rows) was short (all-match: one retry, then none)."""
    from gpulab.dbjoin.tensorcore_join import TensorCoreJoin
    from gpulab.dbjoin.tensorcore_plan import TensorCorePlan

    lk, rk = CASES[dt][name]
    dev = "cuda" if HAS_CUDA else "cpu"
    lt, rt = torch.from_numpy(lk).to(dev), torch.from_numpy(rk).to(dev)
    plan = TensorCorePlan(TensorCoreJoin("fp32", block=16, rows_per_partition=8), lt, rt, use_graph=False)
    assert plan.graph is None and plan.graph_error is None
    for _ in range(2):
        _check(plan.run(), lk, rk)
    want_retries = int(reference.output_size(lk, rk) > max(len(lk), len(rk)))
    assert plan.retries == want_retries and (name != "all-match" or want_retries == 1)
    count = TensorCorePlan(TensorCoreJoin("fp32", block=16, rows_per_partition=8), lt, rt, count_only=True,
                           use_graph=False)
    assert count.run().count == reference.output_size(lk, rk) and count.retries == 0
    assert plan.replay_times_ms(3) == []  # no graph: nothing to replay


@interpreted
def test_tensorcore_plan_mixed_key_types_and_partition_buffers_reused():
    """int32 left and int64 right keys are joined as int64 (converted once, at prepare); each run repartitions
    into the same buffers (no allocation), and the partition equals a freshly allocated one."""
    from gpulab.dbjoin.tensorcore_join import PartitionSpace, TensorCoreJoin, partition_counting
    from gpulab.dbjoin.tensorcore_plan import TensorCorePlan

    lk, rk = CASES["int32"]["dup-both-negative"][0], CASES["int64"]["dup-both-negative"][1]
    dev = "cuda" if HAS_CUDA else "cpu"
    plan = TensorCorePlan(TensorCoreJoin("fp32", block=16, rows_per_partition=8), torch.from_numpy(lk).to(dev),
                          torch.from_numpy(rk).to(dev), use_graph=False)
    assert plan.has_hi
    ptrs = [t.data_ptr() for t in (plan.left.out.lo, plan.left.cursor, plan.right.out.row, plan.right.out.count)]
    _check(plan.run(), lk.astype(np.int64), rk)
    _check(plan.run(), lk.astype(np.int64), rk)
    assert [t.data_ptr() for t in (plan.left.out.lo, plan.left.cursor, plan.right.out.row,
                                   plan.right.out.count)] == ptrs
    key = torch.from_numpy(rk).to(dev)
    a = partition_counting(key, 3, PartitionSpace.allocate(len(rk), 3, True, key.device))
    b = partition_counting(key, 3)
    assert torch.equal(a.count, b.count) and torch.equal(a.start, b.start)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_tensorcore_plan_gpu_graph(dt):
    """On a GPU the plan is one CUDA graph: exact on every replay (after the retry that grows a short output),
    its replays timed by CUDA events, count-only too."""
    from gpulab.dbjoin.tensorcore_join import TensorCoreJoin
    from gpulab.dbjoin.tensorcore_plan import TensorCorePlan

    for name in ("dup-both-negative", "all-match", "sentinel"):
        lk, rk = CASES[dt][name]
        plan = TensorCorePlan(TensorCoreJoin("fp16", block=64), torch.from_numpy(lk).cuda(),
                              torch.from_numpy(rk).cuda())
        assert plan.graph is not None, plan.graph_error
        for _ in range(3):
            _check(plan.run(), lk, rk)
        times = plan.replay_times_ms(5)
        assert len(times) == 5 and all(t > 0 for t in times)
        _check(plan.run(), lk, rk)  # the outputs after the timed replays
    if dt == "int64":
        return  # 1M rows once (int32): the GPU tests' process has a time cap on the device
    left, right = tables.generate(1_000_000, None, 0.5, "unique", 0, dt)
    lt, rt = torch.from_numpy(left.key).cuda(), torch.from_numpy(right.key).cuda()
    plan = TensorCorePlan(TensorCoreJoin("fp16", block=64), lt, rt)
    _check(plan.run(), left.key, right.key)
    assert plan.retries == 0
    cnt = TensorCorePlan(TensorCoreJoin("int8", block=64), lt, rt, count_only=True)
    assert cnt.run().count == reference.output_size(left.key, right.key)


def test_tensorcore_plan_of_an_empty_table_has_its_bench_columns():
    """An empty side (join bench --right-rows 0): the plan runs to no pairs and still has the attributes the
    tensorcore-graph row reads (partitions: 0, as the eager join's last_partitions), not an AttributeError."""
    from gpulab.dbjoin.tensorcore_join import TensorCoreJoin
    from gpulab.dbjoin.tensorcore_plan import TensorCorePlan

    plan = TensorCorePlan(TensorCoreJoin("fp32", block=16), torch.arange(5, dtype=torch.int32),
                          torch.empty(0, dtype=torch.int32), use_graph=False)
    assert plan.run().count == 0 and plan.replay_times_ms(3) == []
    assert plan.partitions == 0 and plan.graph is None and plan.retries == 0
