"""A bitonic sort prepared for one device input buffer and replayed as one CUDA graph (``sort bench --graph``).

Each kernel launch through cupy costs the host microseconds (gpulab's own Python 1.5-1.9 us of it, measured
without a GPU; cupy's argument packing and the driver the rest), and a sort is 26-300 launches. Where a launch's
GPU work is shorter than that (sorts of up to some millions of keys, the chunks of a pipelined sort) the host's
launch rate bounds the sort, not the GPU. A plan launches the whole sort as one graph instead.

``SortPlan(driver, x, variant, order, kv)`` allocates the keys, values, output and (kv) int64 permutation once,
runs the sort once directly (every kernel loaded and its shared-memory limit set before any capture), then
captures the same launches, with the permutation widened by a kernel of bitonic.cu into the plan's own buffer,
on a stream of its own (blocking: ordered after earlier work on the legacy default stream, which torch and cupy
use by default). :meth:`SortPlan.run` queues one replay and returns the plan's output arrays, valid until the
next run (copy them to keep them). The plan binds the input *buffer*: a run sorts whatever ``x`` holds then (a
non-contiguous ``x`` is bound as the contiguous copy made here). If the capture fails, ``graph`` is None,
``graph_error`` says why, and ``run()`` launches the same sort directly (the same result).
"""
from __future__ import annotations

from typing import Any

from gpulab.core.errors import InputError
from gpulab.sort import keys as K
from gpulab.sort.schedule import Variant, get_variant, schedule


class SortPlan:
    def __init__(self, driver: Any, x: Any, variant: str | Variant = "bitonic-fused", order: str = "asc",
                 kv: bool = False, use_graph: bool = True) -> None:
        cp = driver.cp
        v = get_variant(variant) if isinstance(variant, str) else variant
        self.desc = K.check_order(order)
        if not isinstance(x, cp.ndarray):
            raise InputError(f"expected a cupy array on the GPU, got {type(x).__name__}")
        K.check_array(x)
        name = K.dtype_name(x)
        self.driver, self.kv, self.code = driver, bool(kv), K.DTYPE_CODE[name]
        self.n = n = int(x.shape[0])
        self.x = cp.ascontiguousarray(x)
        self.keys = cp.empty(n, dtype=K.KEY_DTYPE[name])
        self.vals = cp.empty(n if kv else 1, dtype=cp.uint32)
        self.v = driver.effective_variant(v, self.keys.dtype.itemsize, self.kv)
        self.out = cp.empty(n, dtype=self.x.dtype)
        self.perm = cp.empty(n, dtype=cp.int64) if kv else None
        self.launches = schedule(n, self.v) if n else []
        self.graph = None
        self.graph_error: str | None = None
        self.stream = cp.cuda.Stream()
        if n == 0:
            return
        self._enqueue()  # a direct run first: kernels loaded, attributes set, nothing left to do inside the capture
        self.stream.synchronize()
        if use_graph:
            self._capture()

    def _enqueue(self) -> None:
        with self.stream:
            self.driver.launch_all(self.launches, self.keys, self.vals, self.v, self.kv, self.code, self.desc,
                                   src=self.x, dst=self.out)
            if self.kv:
                self.driver.widen(self.vals, self.perm)

    def _capture(self) -> None:
        from gpulab.core.cupy_graph import capture

        self.graph, self.graph_error = capture(self.stream, self._enqueue)

    def run(self) -> tuple[Any, Any]:
        """Queue one sort of what ``x`` holds on the plan's stream: (sorted keys, int64 permutation or None)."""
        if self.n:
            if self.graph is not None:
                self.graph.launch(self.stream)
            else:
                self._enqueue()
        return self.out, self.perm
