"""A tiny host-memory stand-in for the parts of cupy that hash_join_cuda uses, so that the host side of
CudaHashJoin and HashJoinPlan (buffer layout, memset/copy sizes and offsets, stream capture and replay,
the output-capacity retry) runs on a CPU machine.

Arrays are numpy arrays (real host addresses, so memsetAsync/memcpyAsync act on them through ctypes);
the "kernels" are the numba model's kernels (hash_join_model) called on the same memory, through the
argument tuples that hash_join_cuda builds for the CUDA kernels, or, after ``use_cuda_c(module)``, the
CUDA C kernels of hash_join.cu themselves, run on the CPU by tests/cuda_on_cpu. A stream that is capturing
records memsets, copies and kernel launches instead of running them, and refuses what CUDA refuses during
capture (allocation from the pool, synchronisation, device-to-host reads); Graph.launch replays them.
"""
from __future__ import annotations

import ctypes
import itertools
import time
import types

import numpy as np

int32, int64, uint64, uint8 = np.int32, np.int64, np.uint64, np.uint8


class CaptureError(RuntimeError):
    pass


class _Ptr:
    def __init__(self, ptr: int):
        self.ptr = ptr


class ndarray(np.ndarray):
    @property
    def data(self):  # cupy: a MemoryPointer with .ptr
        return _Ptr(self.__array_interface__["data"][0])

    def get(self):
        _refuse_while_capturing("a device-to-host read (ndarray.get)")
        return np.array(self)


class _State:
    streams: dict[int, "Stream"] = {}
    current: list["Stream"] = []
    launches: list[str] = []  # every kernel run or recorded, by name
    fail_capture_at: str | None = None  # a kernel name whose launch fails while capturing (tests)
    cuda_c = None  # a tests.cuda_on_cpu CpuModule of hash_join.cu: its kernels run instead of the model's


def _capturing() -> "Stream | None":
    for s in _State.streams.values():
        if s.capturing:
            return s
    return None


def _refuse_while_capturing(what: str) -> None:
    if _capturing() is not None:
        raise CaptureError(f"{what} while a stream is capturing")


def empty(shape, dtype=np.float64):
    _refuse_while_capturing("a pool allocation (cupy.empty)")
    return np.empty(shape, dtype).view(ndarray)


def asarray(a):
    _refuse_while_capturing("a pool allocation (cupy.asarray)")
    return np.array(a).view(ndarray)


def _dispatch(stream_ptr: int, op) -> None:
    s = _State.streams.get(stream_ptr)
    if s is not None and s.capturing:
        s.ops.append(op)
    else:
        op()


class Stream:
    _ids = itertools.count(1000)

    def __init__(self, null=False, non_blocking=False, ptds=False):
        _refuse_while_capturing("stream creation")
        self.ptr = 0 if null else next(self._ids)
        self.non_blocking = non_blocking
        self.capturing = False
        self.ops: list = []
        _State.streams[self.ptr] = self

    def __enter__(self):
        _State.current.append(self)
        return self

    def __exit__(self, *exc):
        _State.current.pop()
        return False

    def begin_capture(self, mode=None):
        if self.ptr == 0:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if self.capturing:
            raise RuntimeError("already capturing")
        self.capturing, self.ops = True, []

    def end_capture(self):
        if not self.capturing:
            raise RuntimeError("not capturing")
        self.capturing = False
        if self.ops is None:
            raise CaptureError("cudaErrorStreamCaptureInvalidated")
        graph = Graph(self.ops)
        self.ops = []
        return graph

    def synchronize(self):
        _refuse_while_capturing("stream synchronisation")

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event


NULL = Stream(null=True)


class Graph:
    def __init__(self, ops):
        self.ops = list(ops)
        self.launches = 0

    def launch(self, stream=None):
        self.launches += 1
        for op in self.ops:
            op()

    def upload(self, stream=None):
        pass


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()


def get_elapsed_time(a: Event, b: Event) -> float:
    return (b.t - a.t) * 1e3 + 1e-6


def get_current_stream() -> Stream:
    return _State.current[-1] if _State.current else NULL


class Device:
    def __init__(self, device=None):
        self.id = 0

    def synchronize(self):
        _refuse_while_capturing("device synchronisation")


class CUDARuntimeError(RuntimeError):
    pass


def _memset(ptr, value, size, stream):
    _dispatch(stream, lambda: ctypes.memset(ptr, value, size))


def _memcpy(dst, src, size, kind, stream):
    assert kind == 2  # cudaMemcpyDeviceToHost: the only copy the hash join makes
    _dispatch(stream, lambda: ctypes.memmove(dst, src, size))


runtime = types.SimpleNamespace(
    getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError,
    getDeviceProperties=lambda dev: {"multiProcessorCount": 2, "maxThreadsPerMultiProcessor": 1536},
    memsetAsync=_memset, memcpyAsync=_memcpy, memcpyDeviceToHost=2,
    memGetInfo=lambda: (1 << 30, 1 << 31))


# ---- kernels: the numba model's, on the CUDA kernels' arguments and memory layout

_EMPTY = {"i32": np.int64(np.iinfo(np.int32).min), "i64": np.int64(np.iinfo(np.int64).min)}
_SLOT = {"i32": np.dtype([("count", "<i4"), ("key", "<i4"), ("row", "<i4"), ("pad", "<i4")]),  # kc: count low
         "i64": np.dtype([("key", "<i8"), ("count", "<i4"), ("row", "<i4")])}


def _slots(table, cap, suffix):
    raw = np.asarray(table).view(np.uint8)[: (cap + 1) * 16]
    assert np.asarray(table).view(np.uint8).size >= (cap + 1) * 16 + 24, "no room for the counters"
    return raw.view(_SLOT[suffix])


def _model():
    from gpulab.dbjoin.hash_join_model import _compile

    return _compile()


def _kernel(name: str, suffix: str):
    k_insert, k_group_alloc, k_group_scatter, k_probe = _model()
    is64 = suffix == "i64"

    def i64(a):  # the model's counters are int64 (uint64 arithmetic with int64 becomes float in numba)
        return np.asarray(a).view(np.int64)

    def run(args):
        if name == "insert":
            keys, n, table, cap, build_slot, counters = args
            sl = _slots(table, int(cap), suffix)
            k_insert(np.asarray(keys[: int(n)]).astype(np.int64), sl["key"], sl["count"], sl["row"], int(cap),
                     _EMPTY[suffix], is64, np.asarray(build_slot), i64(counters))
        elif name == "group_alloc":
            n, build_slot, table, slot_off, counters = args
            cap = len(slot_off) - 1
            sl = _slots(table, cap, suffix)
            k_group_alloc(np.asarray(build_slot[: int(n)]), sl["count"], sl["row"], np.asarray(slot_off),
                          i64(counters))
        elif name == "group_scatter":
            n, build_slot, table, slot_off, grouped, counters = args
            cap = len(slot_off) - 1
            sl = _slots(table, cap, suffix)
            k_group_scatter(np.asarray(build_slot[: int(n)]), sl["count"], np.asarray(slot_off),
                            np.asarray(grouped), i64(counters))
        elif name == "probe":
            keys, n, table, cap, slot_off, grouped, out_p, out_b, capacity, counter, count_only = args
            sl = _slots(table, int(cap), suffix)
            k_probe(np.asarray(keys[: int(n)]).astype(np.int64), sl["key"], sl["count"], sl["row"], int(cap),
                    _EMPTY[suffix], is64, np.asarray(slot_off), np.asarray(grouped), np.asarray(out_p),
                    np.asarray(out_b), int(capacity), i64(counter), bool(count_only), 256)
        else:
            raise KeyError(name)

    return run


class _Function:
    def __init__(self, full_name: str):
        base, suffix = full_name[3:].rsplit("_", 1)
        self.name = base
        if _State.cuda_c is not None:
            kernel = _State.cuda_c.get_function(full_name)
            self._run = lambda grid, block, args, kw: kernel(grid, block, args, **kw)
        else:
            model = _kernel(base, suffix)
            self._run = lambda grid, block, args, kw: model(args)

    def __call__(self, grid, block, args, **kw):
        s = get_current_stream()
        if s.capturing and _State.fail_capture_at == self.name:
            s.ops = None  # the capture is invalidated, as CUDA does after an illegal call
            raise CaptureError(f"launch of {self.name} failed during capture")
        _State.launches.append(self.name)
        _dispatch(s.ptr, lambda: self._run(grid, block, args, kw))


class RawModule:
    def __init__(self, code=None, options=()):
        assert "hj_insert_##SUFFIX" in code

    def get_function(self, name):
        return _Function(name)


cuda = types.SimpleNamespace(runtime=runtime, Stream=Stream, Event=Event, Device=Device,
                             get_elapsed_time=get_elapsed_time, get_current_stream=get_current_stream,
                             graph=types.SimpleNamespace(Graph=Graph))


def from_dlpack(a):
    raise NotImplementedError


# cupyx
def empty_pinned(shape, dtype=np.float64):
    _refuse_while_capturing("a pinned allocation")
    return np.empty(shape, dtype)


cupyx = types.SimpleNamespace(empty_pinned=empty_pinned)


def use_cuda_c(module) -> None:
    _State.cuda_c = module


def reset() -> None:
    _State.streams = {0: NULL}
    _State.current = []
    _State.launches = []
    _State.fail_capture_at = None
    _State.cuda_c = None


def ascontiguousarray(a):
    """cupy's: the array itself when C-contiguous, else a contiguous copy (a pool allocation)."""
    if isinstance(a, ndarray) and a.flags.c_contiguous:
        return a
    _refuse_while_capturing("a pool allocation (cupy.ascontiguousarray)")
    return np.ascontiguousarray(a).view(ndarray)
