"""The CPU emulation of CUDA C itself, on small kernels (samples.cu) with numpy references: shuffles, shared
memory (static and dynamic), atomics under contention, 3-D coordinates, early exit, and that it can fail: a
missing __syncthreads changes the result and a deadlock is an error, not a hang."""
from pathlib import Path
import types

import numpy as np
import pytest

from .module import GXX, CpuModule, DeviceHeap

SAMPLES = Path(__file__).with_name("samples.cu")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not installed")


class Dev(np.ndarray):
    """A host array passed where a kernel takes a device pointer."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def dev(a):
    return np.ascontiguousarray(a).view(Dev)


@pytest.mark.parametrize("n, block", [(1, 32), (100, 64), (1000, 256), (4096, 1024)])
def test_block_scan(build_dir, n, block):
    mod = CpuModule(SAMPLES, build_dir, seed=n)
    x = np.random.default_rng(n).integers(0, 1000, n, dtype=np.uint32)
    out, total = dev(np.zeros(n, np.uint64)), dev(np.zeros(1, np.uint64))
    grid = (n + block - 1) // block
    mod.get_function("block_scan")((grid,), (block,), (dev(x), out, np.uint32(n), total))
    assert int(total[0]) == int(x.sum())
    # each block: its base (reserved by one atomicAdd, blocks in any order) plus its own inclusive scan
    parts = [slice(b * block, min(n, (b + 1) * block)) for b in range(grid)]
    bases = [int(out[p][0]) - int(x[p][0]) for p in parts]
    for p, base in zip(parts, bases):
        assert np.array_equal(out[p], base + np.cumsum(x[p], dtype=np.uint64))
    by_base = sorted(range(grid), key=lambda b: bases[b])
    assert [bases[b] for b in by_base] == np.cumsum([0] + [int(x[parts[b]].sum()) for b in by_base[:-1]]).tolist()


def test_blocks_run_in_a_random_order(build_dir):
    """out[b] = the order in which block b took a ticket: not always 0, 1, 2, ... (a kernel may not rely on it)."""
    orders = set()
    for seed in range(4):
        out = dev(np.zeros(8, np.int32))
        CpuModule(SAMPLES, build_dir, seed=seed).get_function("ticket")((8,), (32,), (out, dev(np.zeros(1, np.int32))))
        assert sorted(out.tolist()) == list(range(8))
        orders.add(tuple(out.tolist()))
    assert len(orders) > 1


def test_a_write_past_the_dynamic_shared_memory_is_an_error(build_dir):
    x = np.arange(128, dtype=np.int32)
    k = CpuModule(SAMPLES, build_dir).get_function("reverse_tiles")
    with pytest.raises(RuntimeError, match=r"block \(0,0,0\) wrote dynamic shared memory at byte 508, past the 508"):
        k((1,), (128,), (dev(x), dev(np.zeros_like(x)), np.int32(1)), shared_mem=127 * 4)


def test_dynamic_shared_memory_and_the_missing_syncthreads(build_dir):
    x = np.arange(4 * 128, dtype=np.int32)
    want = x.reshape(4, 128)[:, ::-1].ravel()
    wrong = 0
    for seed in range(3):
        mod = CpuModule(SAMPLES, build_dir, seed=seed)
        for sync in (1, 0):
            out = dev(np.zeros_like(x))
            mod.get_function("reverse_tiles")((4,), (128,), (dev(x), out, np.int32(sync)), shared_mem=128 * 4)
            if sync:
                assert np.array_equal(out, want)
            else:
                wrong += not np.array_equal(out, want)
    assert wrong == 3, "without __syncthreads a thread must be able to read its mirror's slot before it is written"


@pytest.mark.parametrize("seed", range(3))
def test_cas_insert_under_contention(build_dir, seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(1, 40, 600).astype(np.int32)  # 600 threads, at most 39 distinct keys, 64 slots
    cap = 64
    table, hits = dev(np.zeros(cap, np.int32)), dev(np.zeros(cap, np.int32))
    CpuModule(SAMPLES, build_dir, seed=seed).get_function("cas_insert")(
        (3,), (256,), (dev(keys), np.int32(keys.size), table, np.uint32(cap), hits))
    stored = table[table != 0]
    assert sorted(stored.tolist()) == sorted(set(keys.tolist())), "every distinct key exactly once"
    for s in np.flatnonzero(table):
        assert hits[s] == np.count_nonzero(keys == table[s])


def test_deadlock_is_an_error(build_dir):
    mod = CpuModule(SAMPLES, build_dir)
    with pytest.raises(RuntimeError, match=r"deadlock in block \(0,0,0\): 16 of 32 threads wait at __syncthreads, "
                                           r"16 at a warp shuffle"):
        mod.get_function("deadlock")((1,), (32,), (dev(np.zeros(32, np.int32)),))


@pytest.mark.parametrize("keep", [0, 1, 37, 64])
def test_exited_threads_leave_the_barrier(build_dir, keep):
    out = dev(np.full(64, -1, np.int32))
    CpuModule(SAMPLES, build_dir, seed=keep).get_function("early_exit")((1,), (64,), (out, np.int32(keep)))
    assert np.array_equal(out, np.r_[np.full(keep, keep), np.full(64 - keep, -1)])


def test_coordinates_3d(build_dir):
    grid, block = (3, 2, 2), (4, 3, 2)
    out = dev(np.zeros(12 * 24, np.uint32))
    CpuModule(SAMPLES, build_dir).get_function("coordinates")(grid, block, (out,))
    want = [(bx << 25) | (by << 20) | (bz << 15) | (tx << 10) | (ty << 5) | tz
            for bz in range(2) for by in range(2) for bx in range(3)
            for tz in range(2) for ty in range(3) for tx in range(4)]
    assert out.tolist() == want


def test_launch_checks(build_dir):
    mod = CpuModule(SAMPLES, build_dir)
    k = mod.get_function("reverse_tiles")
    assert k.params == [(8, 0), (8, 0), (4, 1)]
    x, out = dev(np.zeros(64, np.int32)), dev(np.zeros(64, np.int32))
    with pytest.raises(TypeError, match="argument 2: a signed integer of 4 bytes needs a numpy scalar, got int"):
        k((1,), (64,), (x, out, 1))
    with pytest.raises(TypeError, match="argument 2: a signed integer of 4 bytes, got numpy int64"):
        k((1,), (64,), (x, out, np.int64(1)))
    with pytest.raises(TypeError, match="argument 0: a pointer parameter needs a device array"):
        k((1,), (64,), (np.int32(0), out, np.int32(1)))
    with pytest.raises(TypeError, match="takes 3 arguments, got 2"):
        k((1,), (64,), (x, out))
    with pytest.raises(ValueError, match="2048 threads per block"):
        k((1,), (2048,), (x, out, np.int32(1)))
    with pytest.raises(ValueError, match="dynamic shared memory"):
        k((1,), (64,), (x, out, np.int32(1)), shared_mem=64 * 1024)
    k.max_dynamic_shared_size_bytes = 64 * 1024
    k((1,), (64,), (x, out, np.int32(1)), shared_mem=64 * 1024)
    with pytest.raises(KeyError, match="no kernel named 'nope'"):
        mod.get_function("nope")


def test_a_faulting_access_is_an_error_and_the_next_launch_runs(build_dir):
    mod = CpuModule(SAMPLES, build_dir)
    out = dev(np.zeros(64, np.int32))
    with pytest.raises(RuntimeError, match=r"illegal memory access \(SIGSEGV\) in block \(0,0,0\) thread \(9,0,0\)"):
        mod.get_function("wild_write")((1,), (64,), (out, np.int32(9)))
    out[:] = 0
    mod.get_function("wild_write")((1,), (64,), (out, np.int32(-1)))
    assert out.tolist() == [1] * 64


def test_a_write_past_a_heap_array_fails_the_launch(build_dir):
    heap = DeviceHeap(Dev)
    mod = CpuModule(SAMPLES, build_dir, heap=heap)
    x = heap.asarray(np.arange(64, dtype=np.int32))
    out = heap.empty(63, np.int32)  # one element short of the 64 threads
    with pytest.raises(RuntimeError, match=r"reverse_tiles wrote past the end of a 252-byte array \(guard byte 0\)"):
        mod.get_function("reverse_tiles")((1,), (64,), (x, out, np.int32(1)), shared_mem=256)


def test_inline_ptx_is_recorded_or_refused():
    from .module import CompileError, translate

    src = 'void f(const char* p, unsigned n) { asm volatile("prefetch.global.L2::evict_last [%0], %1;" ::"l"(p + 1), "r"(n) : "memory"); }'
    assert translate(src) == ('void f(const char* p, unsigned n) { cuda_on_cpu::ptx("prefetch.global.L2::evict_last '
                              '[%0], %1;", {(unsigned long long)(p + 1), (unsigned long long)(n)}); }')
    with pytest.raises(CompileError, match="inline PTX with outputs is not emulated"):
        translate('int g(int x) { int y; asm("mov.u32 %0, %1;" : "=r"(y) : "r"(x)); return y; }')


def test_static_shared_memory_starts_as_garbage_in_every_block(build_dir):
    out = dev(np.zeros(6, np.uint32))
    CpuModule(SAMPLES, build_dir).get_function("read_unwritten_shared")((3,), (32,), (out,))
    assert out.tolist() == [0xEEEEEEEE] * 6  # block 1 does not see block 0's 7 and 9


@pytest.mark.parametrize("width", [32, 8])
def test_shuffles_follow_cuda_semantics(build_dir, width):
    out = dev(np.zeros(128, np.int32))
    CpuModule(SAMPLES, build_dir).get_function("shuffles")((1,), (32,), (out, np.int32(width)))
    lane = np.arange(32)
    seg = lane - lane % width
    own = lane * 10
    want_sync = (seg + 3 % width) * 10
    want_up = np.where(lane % width >= 2, (lane - 2) * 10, own)
    want_down = np.where(lane % width + 2 < width, (lane + 2) * 10, own)
    x = lane ^ 5
    want_xor = np.where(x // width == lane // width, x * 10, own)
    assert out.reshape(4, 32).tolist() == [want_sync.tolist(), want_up.tolist(), want_down.tolist(), want_xor.tolist()]


def test_warp_votes_follow_cuda_semantics(build_dir):
    """__ballot_sync and __match_any_sync (32- and 64-bit): masks of the calling warp's lanes, exited lanes
    left out."""
    keep = 20
    out = dev(np.zeros(192, np.uint32))
    CpuModule(SAMPLES, build_dir).get_function("votes")((1,), (64,), (out, np.int32(keep)))
    live = [range(32), range(32, 32 + keep)]

    def mask(w, pred):
        return sum(1 << (t - 32 * w) for t in live[w] if pred(t))

    for w in (0, 1):
        for t in live[w]:
            assert out[t] == mask(w, lambda u: u % 3 == 0), t
            assert out[64 + t] == mask(w, lambda u: u % 4 == t % 4), t
            assert out[128 + t] == mask(w, lambda u: u % 5 == t % 5), t


def test_blocks_in_flight_interleave(build_dir):
    """Three blocks at a time: a non-atomic read-modify-write across blocks loses updates under some seed; one
    block at a time, never."""
    lost = []
    for in_flight in (1, 3):
        results = []
        for seed in range(4):
            counter = dev(np.zeros(1, np.int32))
            CpuModule(SAMPLES, build_dir, seed=seed, blocks_in_flight=in_flight).get_function("racy_count")(
                (12,), (64,), (counter,))
            results.append(int(counter[0]))
        lost.append(any(r < 12 for r in results))
        assert all(r <= 12 for r in results)
    assert lost == [False, True]
