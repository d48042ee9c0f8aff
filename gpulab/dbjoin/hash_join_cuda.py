"""The CUDA C hash join (hash_join.cu) launched through cupy.RawModule; GPU only.

:class:`CudaHashJoin` builds on the smaller table and probes with the other; see hash_join.cu for
the kernels. Inputs are torch or cupy device arrays of int32/int64 keys; the result holds cupy int32
row-index arrays (or only the count). The only host synchronisation is reading the output size.

:class:`HashJoinPlan` is the prepared form (a "prepared statement"): made once for fixed device key
arrays, it allocates every buffer up front and captures the whole pipeline (one memset that empties
the table and its counters, insert, the two grouping kernels, probe, and an 8-byte copy of the
output size into pinned host memory) into one CUDA graph on its own stream; :meth:`HashJoinPlan.run`
replays the graph and reads that count. The output arrays have capacity = probe rows (exact for unique
build keys); when the count says more (duplicate build keys), the plan grows them to the exact size,
re-captures and re-runs, so every result is exact.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from gpulab.core.errors import DeviceError, InputError
from gpulab.dbjoin.reference import JoinResult

SOURCE_PATH = Path(__file__).with_name("hash_join.cu")
BLOCK = 256
SLOT_BYTES = 16  # SlotI32 {encoded key << 32 | count, row, pad} and SlotI64 {key, extra, row}
COUNTERS = 4  # uint64 after the slots (HJ_COUNTERS): [0] grouped rows, [1] output pairs, [2] repeated build keys
KERNEL_REGEX = "hj_"
KERNELS = ("insert", "group_alloc", "group_scatter", "probe")  # hj_<name>_i32 / hj_<name>_i64


def source() -> str:
    return SOURCE_PATH.read_text()


def check_load_factor(load_factor: float) -> None:
    """A one-line InputError unless 0.05 <= load_factor <= 0.95 (NaN included)."""
    if not 0.05 <= load_factor <= 0.95:
        raise InputError(f"--load-factor must be within [0.05, 0.95], got {load_factor}")


def table_capacity(n_build: int, load_factor: float) -> int:
    """Slots of the table (without the extra slot for the empty-marker key); cap + 1 <= 2^31 - 1, since
    build_slot and the group kernels hold slot indices (the extra slot's, cap, included) as int."""
    check_load_factor(load_factor)
    cap = max(int(math.ceil(n_build / load_factor)), 1)
    if cap > 2**31 - 2:
        raise InputError(f"a hash table of {cap} slots exceeds the int32 slot index; use fewer build rows "
                         "or a higher --load-factor")
    return cap


def table_words(cap: int) -> int:
    """uint64 words of the one allocation: cap + 1 slots of 16 bytes, then the COUNTERS counters."""
    return (cap + 1) * SLOT_BYTES // 8 + COUNTERS


# The argument tuple of every kernel, in the order of its extern "C" signature in hash_join.cu. Arrays are
# passed as device pointers, scalars with these exact numpy types (a CPU test checks both against the .cu).
def _args_insert(keys, n, table, cap, build_slot, counters):
    return (keys, np.int32(n), table, np.uint32(cap), build_slot, counters)


def _args_group_alloc(n, build_slot, table, slot_off, counters):
    return (np.int32(n), build_slot, table, slot_off, counters)


def _args_group_scatter(n, build_slot, table, slot_off, grouped, counters):
    return (np.int32(n), build_slot, table, slot_off, grouped, counters)


def _args_probe(keys, n, table, cap, slot_off, grouped, out_probe, out_build, capacity, counter, count_only):
    return (keys, np.int32(n), table, np.uint32(cap), slot_off, grouped, out_probe, out_build,
            np.uint64(capacity), counter, np.int32(count_only))


LAUNCH_ARGS = {"insert": _args_insert, "group_alloc": _args_group_alloc, "group_scatter": _args_group_scatter,
               "probe": _args_probe}


@lru_cache(maxsize=1)
def _module():
    try:
        import cupy as cp
    except ImportError:
        raise DeviceError("the CUDA hash join needs cupy (pip install 'gpulab[cuda13]')") from None
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise DeviceError("the CUDA hash join needs a CUDA GPU, and none is visible")
    except cp.cuda.runtime.CUDARuntimeError:
        raise DeviceError("the CUDA hash join needs a CUDA GPU, and none is visible") from None
    return cp.RawModule(code=source(), options=("--std=c++17",))


@lru_cache(maxsize=4)
def _kernels(suffix: str) -> dict[str, Any]:
    mod = _module()
    return {name: mod.get_function(f"hj_{name}_{suffix}") for name in KERNELS}


def wave_blocks(props: dict) -> int:
    """Blocks of BLOCK threads that the device holds resident at once (one wave: the grid of the grid-stride
    group kernels), from cupy's device properties: SMs x (max threads per SM // BLOCK). The threads per SM
    differ: 2048 on A100 and H100, 1536 on sm_86/sm_89 (RTX 30xx/40xx, L40S)."""
    per_sm = int(props.get("maxThreadsPerMultiProcessor") or 2048) // BLOCK
    return int(props["multiProcessorCount"]) * max(per_sm, 1)


@lru_cache(maxsize=8)
def _wave_blocks(device: int) -> int:
    import cupy as cp

    return wave_blocks(cp.cuda.runtime.getDeviceProperties(device))


def _as_cupy(a: Any):
    import cupy as cp

    if isinstance(a, cp.ndarray):
        return cp.ascontiguousarray(a)  # the kernels read raw pointers: a strided view would be read as memory
    if hasattr(a, "__dlpack__") and hasattr(a, "is_cuda"):
        if not a.is_cuda:
            raise InputError("the CUDA hash join needs device arrays (got a CPU tensor)")
        return cp.from_dlpack(a.contiguous())
    return cp.asarray(np.ascontiguousarray(a))


def _grid(n: int) -> tuple[int]:
    return (max((n + BLOCK - 1) // BLOCK, 1),)


def _group_grid(n: int) -> tuple[int]:
    import cupy as cp

    return (min(_grid(n)[0], _wave_blocks(cp.cuda.Device().id)),)


def _prepare_keys(left_key: Any, right_key: Any):
    """(suffix, swap, build, probe): cupy key arrays of one dtype, the build side the smaller one."""
    import cupy as cp

    from gpulab.dbjoin.tables import check_key_shape

    lk, rk = _as_cupy(left_key), _as_cupy(right_key)
    if lk.dtype not in (cp.int32, cp.int64) or rk.dtype not in (cp.int32, cp.int64):  # before mixed widths widen
        raise InputError(f"keys must be int32 or int64, got {lk.dtype} and {rk.dtype}")
    check_key_shape("left", lk)
    check_key_shape("right", rk)
    if lk.dtype != rk.dtype:
        lk, rk = lk.astype(cp.int64), rk.astype(cp.int64)
    suffix = "i32" if lk.dtype == cp.int32 else "i64"
    swap = len(rk) > len(lk)  # build on the smaller side
    build, probe = (lk, rk) if swap else (rk, lk)
    return suffix, swap, build, probe


def load_kernels(left_key: Any, right_key: Any) -> None:
    """Compile (NVRTC, once a process) and load the kernels a join of these key arrays uses."""
    _kernels(_prepare_keys(left_key, right_key)[0])


PHASES = ("memset", "insert", "group", "probe", "count_copy")  # HashJoinPlan.phase_times_ms


def _no_mark(phase: str) -> None:
    return None


def _enqueue_build(k: dict[str, Any], build, table, cap: int, counters, build_slot, slot_off, grouped,
                   stream_ptr: int, mark=_no_mark) -> None:
    """Empty the table and counters (one memset), then insert and group, on the current cupy stream;
    ``mark(phase)`` is called after each phase's launches (HashJoinPlan.phase_times_ms records events there)."""
    import cupy as cp

    nb = len(build)
    cp.cuda.runtime.memsetAsync(table.data.ptr, 0, table.nbytes, stream_ptr)
    mark("memset")
    k["insert"](_grid(nb), (BLOCK,), _args_insert(build, nb, table, cap, build_slot, counters))
    mark("insert")
    gg = _group_grid(nb)
    k["group_alloc"](gg, (BLOCK,), _args_group_alloc(nb, build_slot, table, slot_off, counters))
    k["group_scatter"](gg, (BLOCK,), _args_group_scatter(nb, build_slot, table, slot_off, grouped, counters))
    mark("group")


def _result(total: int, swap: bool, out_p, out_b) -> JoinResult:
    out_p, out_b = out_p[:total], out_b[:total]
    return JoinResult(total, out_b, out_p) if swap else JoinResult(total, out_p, out_b)


def _empty_result(count_only: bool) -> JoinResult:
    import cupy as cp

    empty = cp.empty(0, cp.int32)
    return JoinResult(0) if count_only else JoinResult(0, empty, empty)


class CudaHashJoin:
    """Open-addressing hash join; ``join(left_keys, right_keys)`` -> :class:`JoinResult` of cupy arrays."""

    def __init__(self, load_factor: float = 0.5):
        self.load_factor = load_factor
        self.retries = 0  # probes re-run because the first output capacity was short

    def join(self, left_key: Any, right_key: Any, count_only: bool = False) -> JoinResult:
        _module()  # a DeviceError without cupy or a GPU
        import cupy as cp

        suffix, swap, build, probe = _prepare_keys(left_key, right_key)
        nb, npr = len(build), len(probe)
        if nb == 0 or npr == 0:
            return _empty_result(count_only)
        k = _kernels(suffix)
        cap = table_capacity(nb, self.load_factor)
        table = cp.empty(table_words(cap), cp.uint64)  # slots, then the counters
        counters = table[table_words(cap) - COUNTERS:]
        counter = counters[1:2]
        build_slot = cp.empty(nb, cp.int32)
        slot_off = cp.empty(cap + 1, cp.int32)
        grouped = cp.empty(nb, cp.int32)
        stream_ptr = cp.cuda.get_current_stream().ptr
        _enqueue_build(k, build, table, cap, counters, build_slot, slot_off, grouped, stream_ptr)

        def run_probe(capacity: int, out_p, out_b, count_flag: int, reset: bool) -> int:
            if reset:  # the first probe finds the counter zeroed by the table memset
                cp.cuda.runtime.memsetAsync(counter.data.ptr, 0, 8, stream_ptr)
            k["probe"](_grid(npr), (BLOCK,), _args_probe(probe, npr, table, cap, slot_off, grouped, out_p, out_b,
                                                         capacity, counter, count_flag))
            return int(counter.get()[0])

        if count_only:
            dummy = cp.empty(1, cp.int32)
            return JoinResult(run_probe(0, dummy, dummy, 1, False))
        capacity = npr  # exact whenever the build keys are unique; otherwise the counter says how many
        out_p, out_b = cp.empty(capacity, cp.int32), cp.empty(capacity, cp.int32)
        total = run_probe(capacity, out_p, out_b, 0, False)
        if total > capacity:
            check_output_size(total)
            self.retries += 1
            capacity = total
            out_p, out_b = cp.empty(capacity, cp.int32), cp.empty(capacity, cp.int32)
            total = run_probe(capacity, out_p, out_b, 0, True)
        return _result(total, swap, out_p, out_b)


class HashJoinPlan:
    """The hash join prepared for fixed device key arrays and replayed as one CUDA graph.

    ``HashJoinPlan(left_key, right_key, load_factor, count_only)`` allocates the table (with its counters),
    build_slot, slot_off, grouped, the output arrays (capacity = probe rows) and a pinned host word, then
    captures memset -> insert -> group_alloc -> group_scatter -> probe -> copy of the output count to the
    host into one graph on a stream of its own (blocking: ordered after earlier work on the legacy default
    stream, which torch and cupy use by default). Nothing in the capture allocates or synchronises.

    The plan binds the key *buffers*: :meth:`run` joins whatever they hold when it is called (keys of two
    dtypes, host arrays and non-contiguous tensors are bound as the converted copies made here). It returns a
    :class:`JoinResult` whose arrays are views of the plan's output buffers, valid until the next ``run()``
    (copy them to keep them). When the count exceeds the output capacity (duplicate build keys), the
    plan grows the outputs to the exact count, re-captures the graph and runs again (``retries`` counts
    this); later runs of the same inputs then fit in one replay. If capture itself fails, ``graph`` is
    None, ``graph_error`` says why, and ``run()`` launches the same pipeline on the plan's stream without
    a graph (still exact).
    """

    def __init__(self, left_key: Any, right_key: Any, load_factor: float = 0.5, count_only: bool = False,
                 use_graph: bool = True):
        _module()  # a DeviceError without cupy or a GPU
        import cupy as cp
        import cupyx

        self.load_factor = load_factor
        self.count_only = bool(count_only)
        self.use_graph = use_graph
        self.retries = 0
        self.graph = None
        self.graph_error: str | None = None
        self.suffix, self.swap, self._build, self._probe = _prepare_keys(left_key, right_key)
        self.n_build, self.n_probe = len(self._build), len(self._probe)
        self.empty = self.n_build == 0 or self.n_probe == 0
        if self.empty:
            return
        self.cap = table_capacity(self.n_build, load_factor)
        self._k = _kernels(self.suffix)
        self._table = cp.empty(table_words(self.cap), cp.uint64)
        self._counters = self._table[table_words(self.cap) - COUNTERS:]
        self._counter = self._counters[1:2]
        self._build_slot = cp.empty(self.n_build, cp.int32)
        self._slot_off = cp.empty(self.cap + 1, cp.int32)
        self._grouped = cp.empty(self.n_build, cp.int32)
        self._host = cupyx.empty_pinned((1,), np.uint64)
        self._host[0] = 0
        _group_grid(self.n_build)  # caches the wave size: no device query is left for the capture
        self.stream = cp.cuda.Stream()
        self._alloc_outputs(0 if self.count_only else self.n_probe)
        cp.cuda.Device().synchronize()  # the inputs are complete and no allocation is in flight
        self._capture()

    def _alloc_outputs(self, capacity: int) -> None:
        import cupy as cp

        self.capacity = capacity
        self._out_p = cp.empty(max(capacity, 1), cp.int32)
        self._out_b = cp.empty(max(capacity, 1), cp.int32)

    def _enqueue(self, mark=_no_mark) -> None:
        """The whole pipeline on self.stream (captured into the graph, or launched directly); ``mark(phase)``
        after each of PHASES."""
        import cupy as cp

        s = self.stream
        with s:
            _enqueue_build(self._k, self._build, self._table, self.cap, self._counters, self._build_slot,
                           self._slot_off, self._grouped, s.ptr, mark)
            self._k["probe"](_grid(self.n_probe), (BLOCK,),
                             _args_probe(self._probe, self.n_probe, self._table, self.cap, self._slot_off,
                                         self._grouped, self._out_p, self._out_b, self.capacity, self._counter,
                                         int(self.count_only)))
            mark("probe")
            cp.cuda.runtime.memcpyAsync(self._host.ctypes.data, self._counter.data.ptr, 8,
                                        cp.cuda.runtime.memcpyDeviceToHost, s.ptr)
            mark("count_copy")

    def _capture(self) -> None:
        self.graph = None
        if not self.use_graph:
            return
        from gpulab.core.cupy_graph import capture

        self.graph, self.graph_error = capture(self.stream, self._enqueue)

    def _launch(self) -> int:
        if self.graph is not None:
            self.graph.launch(self.stream)
        else:
            self._enqueue()
        self.stream.synchronize()
        return int(self._host[0])

    def run(self) -> JoinResult:
        if self.empty:
            return _empty_result(self.count_only)
        total = self._launch()
        if self.count_only:
            return JoinResult(total)
        while total > self.capacity:  # duplicate build keys: grow to the exact size, re-capture, re-run
            check_output_size(total)
            self.retries += 1
            self._alloc_outputs(total)
            self._capture()
            total = self._launch()
        return _result(total, self.swap, self._out_p, self._out_b)

    def replay_times_ms(self, reps: int = 20) -> list[float]:
        """GPU time of each graph replay in ms: CUDA events on the plan's stream between replays that are
        queued back to back (no host synchronisation or count read between them), so host launch latency
        is hidden. [] without a graph or for empty inputs. The outputs stay valid (every replay writes the
        same pairs)."""
        if self.empty or self.graph is None or reps < 1:
            return []
        import cupy as cp

        s = self.stream
        events = [cp.cuda.Event() for _ in range(reps + 1)]
        self.graph.launch(s)  # one untimed replay first
        events[0].record(s)
        for e in events[1:]:
            self.graph.launch(s)
            e.record(s)
        s.synchronize()
        return [cp.cuda.get_elapsed_time(a, b) for a, b in zip(events[:-1], events[1:])]


    def phase_times_ms(self, reps: int = 20) -> dict[str, float]:
        """Median GPU time (ms) of each of PHASES over ``reps`` runs ("group" = group_alloc + group_scatter):
        the graph's launches made directly on the plan's stream with a CUDA event after each phase, so a
        phase also carries its launch gap, and the phases of one run sum to about one replay (or more: no
        graph). {} for empty inputs or reps < 1. The outputs stay valid (every run writes the same pairs)."""
        if self.empty or reps < 1:
            return {}
        import cupy as cp

        from gpulab.core.timing import marked_times

        split = marked_times(self._enqueue, self.stream.record, cp.cuda.get_elapsed_time, self.stream.synchronize,
                             reps)
        return {p: split[p]["ms"] for p in PHASES}


def check_output_size(total: int, limit_bytes: int | None = None) -> None:
    """A one-line error when the pairs (8 bytes each) cannot be materialized."""
    nbytes = total * 8
    if limit_bytes is None:
        try:
            import cupy as cp

            limit_bytes = int(cp.cuda.runtime.memGetInfo()[0] * 0.8)
        except Exception:
            limit_bytes = 1 << 34
    if nbytes > limit_bytes:
        raise InputError(f"the join output has {total} pairs ({nbytes / 2**30:.1f} GiB), more than fits; "
                         "use --count-only")
