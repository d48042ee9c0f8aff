"""The cupy driver (cuda_sort.py) on this CPU, against an emulated cupy: the driver's own code, checked.

``FakeCupy`` stands in for cupy: device arrays are host numpy arrays (``.data.ptr`` is their
address, so ``memcpyAsync`` is a memmove), every kernel launch checks its argument types (the
exact numpy scalars bitonic.cu expects) and grid, then runs the kernel's semantics through the
numpy model (schedule._step, tile_steps, keys.to_ukey). Launches and copies are queued per stream;
a synchronize runs them in a random order that respects only stream order and event waits, so a
missing wait_event shows up as a wrong result. The CUDA C itself runs under the same driver in
test_cuda_c_on_cpu.py; real concurrency and timing only on a GPU.
"""
import ctypes
import sys
import time
import types

import numpy as np
import pytest

from gpulab.sort import keys as K
from gpulab.sort import reference as ref
from gpulab.sort import schedule as S
from gpulab.sort.cuda_sort import BitonicCuda, tile_smem_bytes

CODE_NAME = {c: name for name, c in K.DTYPE_CODE.items()}
U32, I32 = np.uint32, np.int32
SIGNATURES = {"to": (U32, I32, I32, I32, U32), "from": (U32, I32, I32), "pass": (U32, I32, I32),
              "tile": (U32, I32, I32, I32, I32, I32, U32), "widen": (U32,)}


class DevArray(np.ndarray):
    """A host array standing in for a cupy array."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


class Event:
    done = False
    t = None  # when the emulation reached it (perf_counter), for get_elapsed_time


class Stream:
    def __init__(self, sched, non_blocking=False):
        self.sched, self.queue, self.ptr = sched, [], id(self)
        sched.streams[self.ptr] = self

    def __enter__(self):
        self.sched.current.append(self)
        return self

    def __exit__(self, *exc):
        self.sched.current.pop()

    def record(self):
        e = Event()
        self.queue.append(("record", e))
        return e

    def wait_event(self, e):
        self.queue.append(("wait", e))

    def synchronize(self):
        assert not hasattr(self, "_live"), "synchronize() while capturing (an error in CUDA)"
        self.sched.drain()

    def begin_capture(self):  # what is queued from now on is kept in a graph instead of run
        assert not hasattr(self, "_live"), "already capturing"
        self._live, self.queue = self.queue, []

    def end_capture(self):
        ops, self.queue = self.queue, self._live
        del self._live
        return Graph(ops)


class Graph:
    """A captured sequence of one stream's work; each launch queues it again on the given stream."""

    def __init__(self, ops):
        self.ops, self.launches = ops, 0

    def launch(self, stream):
        self.launches += 1
        stream.queue.extend(self.ops)


class Scheduler:
    """Runs the queued work of every stream in a random order allowed by stream order and events."""

    def __init__(self, seed, eager=False):
        self.rng = np.random.default_rng(seed)
        self.eager = eager  # run at once (cupy's own array operations are stream-ordered, not emulated)
        self.streams = {}
        self.current = [Stream(self)]

    def enqueue(self, op, stream=None):
        if self.eager:
            op()
        else:
            (stream or self.current[-1]).queue.append(("op", op))

    def drain(self):
        while any(s.queue for s in self.streams.values()):
            ready = [s for s in self.streams.values() if s.queue and (s.queue[0][0] != "wait" or s.queue[0][1].done)]
            assert ready, "deadlock: every stream waits for an event that is never recorded"
            kind, item = ready[self.rng.integers(len(ready))].queue.pop(0)
            if kind == "record":
                item.done, item.t = True, time.perf_counter()
            elif kind == "op":
                item()


class Kernel:
    """One bitonic.cu kernel: checks the launch, queues its numpy semantics on the current stream."""

    def __init__(self, sched, name):
        self.sched, self.name = sched, name
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem=0):
        kind = self.name.split("_")[1]
        assert tuple(type(a) for a in args[-len(SIGNATURES[kind]):]) == SIGNATURES[kind], (self.name, args)
        assert all(isinstance(a, DevArray) for a in args[:-len(SIGNATURES[kind])]), self.name
        run = {"to": self.to_key, "from": self.from_key, "pass": self.pass_step, "tile": self.tile,
               "widen": self.widen}[kind]
        self.sched.enqueue(lambda: run(grid[0] * block[0], grid[0], shared_mem, *args))

    def to_key(self, threads, blocks, smem, x, keys, vals, n, code, desc, kv, base):
        assert keys.shape[0] == x.shape[0] == n
        name = CODE_NAME[int(code)]
        keys[:n] = K.to_ukey(np.asarray(x[:n]).view(name), bool(desc))
        if kv:
            vals[:n] = base + np.arange(n, dtype=np.uint32)

    def widen(self, threads, blocks, smem, vals, out, n):
        assert out.dtype == np.int64 and vals.dtype == np.uint32 and out.shape[0] == n <= vals.shape[0]
        out[:n] = vals[:n]

    def from_key(self, threads, blocks, smem, keys, out, n, code, desc):
        assert keys.shape[0] == out.shape[0] == n
        out[:n] = K.from_ukey(np.asarray(keys[:n]), CODE_NAME[int(code)], bool(desc)).view(keys.dtype)

    def pass_step(self, threads, blocks, smem, keys, vals, n, p_hi, flip):
        fp = int(self.name[-1])
        assert keys.shape[0] == n and threads >= S.global_groups(int(n), int(p_hi), fp)
        S._step(keys, vals if "_kv1_" in self.name else None, int(n), int(p_hi), fp, bool(flip), groups=threads)

    def tile(self, threads, blocks, smem, keys, vals, src, dst, n, mode, arg, io, code, desc, base):
        t, f = (int(p[1:]) for p in self.name.split("_")[-2:])
        kv = "_kv1_" in self.name
        assert keys.shape[0] == n and blocks << t >= n and smem == tile_smem_bytes(t, keys.dtype.itemsize, kv)
        assert src.dtype == dst.dtype == keys.dtype and src.shape[0] == dst.shape[0] == n
        assert io in (0, 1, 2, 3) and (mode == 0 or not io & 1), "only a tile sort loads the input bits"
        if io & 1:  # the input transform on the way in, as to_key
            self.to_key(threads, blocks, smem, src, keys, vals, n, code, desc, int(kv), base)
        v = S.Variant("emulated", t, f, 1)
        for p_hi, fp, flip in S.tile_steps(S.Launch("tile_sort" if mode == 0 else "tile_merge", int(arg)), v):
            S._step(keys, vals if kv else None, int(n), p_hi, fp, flip)
        if io & 2:  # the output transform on the way out; the kernel leaves the keys array unwritten
            self.from_key(threads, blocks, smem, keys, dst, n, code, desc)
            keys.view(np.uint8)[:] = 0xCD


def fake_cupy(sched, get_function=None):
    """The part of cupy's API that cuda_sort.py uses; kernels from ``get_function(name)`` (default: the numpy
    model's)."""
    def empty(n, dtype):
        a = np.empty(n, dtype=dtype).view(DevArray)
        a.view(np.uint8)[:] = 0xAB  # garbage: a read of memory that was never written shows up
        return a

    def memcpy_async(dst, src, nbytes, kind, stream_ptr):
        sched.enqueue(lambda: ctypes.memmove(dst, src, nbytes), sched.streams[stream_ptr])

    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, deviceGetAttribute=lambda attr, dev: 227 * 1024, CUDARuntimeError=RuntimeError,
        memcpyHostToDevice=1, memcpyDeviceToHost=2, memcpyAsync=memcpy_async)
    cuda = types.SimpleNamespace(runtime=runtime, Device=lambda: types.SimpleNamespace(id=0),
                                 Stream=lambda non_blocking=False: Stream(sched, non_blocking),
                                 get_current_stream=lambda: sched.current[-1],
                                 get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3)
    module = types.SimpleNamespace(get_function=get_function or (lambda name: Kernel(sched, name)))
    return types.SimpleNamespace(cuda=cuda, RawModule=lambda code, options: module, ndarray=DevArray, empty=empty,
                                 uint32=np.uint32, int64=np.int64, ascontiguousarray=lambda x: x,
                                 zeros=lambda n, dtype: np.zeros(n, dtype).view(DevArray))


@pytest.fixture
def emulated(monkeypatch):
    def make(seed, eager=False):
        sched = Scheduler(seed, eager)
        monkeypatch.setitem(sys.modules, "cupy", fake_cupy(sched))
        monkeypatch.setattr(BitonicCuda, "_module", None)
        return sched, BitonicCuda()
    return make


# (variant, n, dtype, chunks, order, kv): several chunks with a partial last one, one chunk, more chunks than streams
CASES = [
    ("bitonic-fused", 20000, "float32", 2, "asc", True),
    ("bitonic-fused", 40000, "int32", 4, "desc", False),
    ("bitonic-shared", 5000, "int64", 4, "asc", True),
    ("bitonic-shared", 3000, "uint32", 1, "desc", True),
    ("bitonic-global", 1025, "float32", 16, "desc", True),  # 9 chunks on 8 streams in turn
    ("bitonic-fused@t14f4g5", 70001, "int32", 4, "asc", True),  # a partial last chunk of 4465 keys
    ("bitonic-fused", 1, "float32", 2, "desc", True),  # fewer keys than chunks: one chunk, no launch
]


def inputs(n, dtype, rng):
    if dtype == "float32":
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.integers(0, n, n // 8)] = np.nan  # maximal keys, also in the last partial chunk
        return x
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, n, endpoint=True, dtype=dtype) // 2**20 * 2**20  # with ties


@pytest.mark.parametrize("variant, n, dtype, chunks, order, kv", CASES)
def test_sort_host_emulated(emulated, variant, n, dtype, chunks, order, kv):
    rng = np.random.default_rng(n)
    x = inputs(n, dtype, rng)
    for seed in range(2):
        sched, bit = emulated(seed)
        out = np.empty_like(x)
        perm = np.empty(n, np.uint32) if kv else None
        bit.sort_host(x, out, variant, order, chunks, perm)
        assert ref.mismatch(out, ref.sort(x, order)) is None, (variant, n, chunks, seed)
        if kv:
            assert np.array_equal(perm.astype(np.int64), ref.argsort(x, order)), (variant, n, chunks, seed)
        assert not any(s.queue for s in sched.streams.values())


@pytest.mark.parametrize("variant, n, dtype, order, kv", [
    ("bitonic-shared", 3000, "float32", "desc", True),
    ("bitonic-fused", 20000, "int32", "asc", False),      # transforms inside the first tile sort and last merge
    ("bitonic-fused", 5000, "int64", "desc", True),       # one tile sort carries both transforms
    ("bitonic-fused@t14f4g5", 40000, "uint32", "asc", True),
    ("bitonic-global", 3000, "int32", "desc", True),      # no tile launch: the transform kernels
    ("bitonic-fused", 1, "float32", "asc", True),         # no launch at all
])
def test_sort_emulated(emulated, variant, n, dtype, order, kv):
    """The whole-array sort (same transforms and launches) through the emulation."""
    sched, bit = emulated(0, eager=True)
    x = inputs(n, dtype, np.random.default_rng(3))
    keys, perm = bit.sort(x.view(DevArray), variant, order, kv=kv)
    assert ref.mismatch(np.asarray(keys), ref.sort(x, order)) is None
    if kv:
        assert np.array_equal(np.asarray(perm), ref.argsort(x, order))


def test_pass_times_split_one_sort_by_launch_kind(emulated):
    """BitonicCuda.pass_times: every launch of one sort is timed once, under its kind, and the launches per kind
    are the schedule's; the sorts it runs stay correct."""
    sched, bit = emulated(0, eager=True)
    x = inputs(20000, "int32", np.random.default_rng(4))
    v = S.get_variant("bitonic-fused")
    times = bit.pass_times(x.view(DevArray), v, "asc", kv=False, reps=2)
    want: dict[str, int] = {}
    for launch in S.schedule(20000, v):
        kind = f"global_f{launch.fp}" if launch.kind == "global" else launch.kind
        want[kind] = want.get(kind, 0) + 1
    assert {k: t["launches"] for k, t in times.items()} == want  # transforms fused: no to_key/from_key launch
    assert all(t["ms"] > 0 for t in times.values())
    glob = bit.pass_times(x.view(DevArray), "bitonic-global", "desc", kv=True, reps=1)
    assert glob["to_key"]["launches"] == glob["from_key"]["launches"] == 1 and "tile_sort" not in glob
    assert bit.pass_times(x[:0].view(DevArray), v) == {}
    keys, _ = bit.sort(x.view(DevArray), v, "asc")
    assert ref.mismatch(np.asarray(keys), ref.sort(x, "asc")) is None
