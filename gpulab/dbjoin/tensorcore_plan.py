"""The tensor-core join prepared once and replayed as one CUDA graph (``join bench --impl tensorcore-graph``).

:class:`TensorCoreJoin` allocates its buffers and launches about a dozen Triton kernels and torch operations from
Python on every call, and reads the output count back: at 1M rows the host's launches, not the GPU, can set
its time. :class:`TensorCorePlan` is the same join as a prepared statement for fixed device key tensors (as
``hash-graph`` is for the hash join): every buffer is allocated up front and both counting-sort partitions, the
join kernel and the copy of the output count to pinned host memory are captured into one CUDA graph;
:meth:`TensorCorePlan.run` replays it and reads the count. The output capacity is max(rows) (exact whenever
one side's keys are unique); when the count says it was short, the plan grows the outputs to the count,
captures again and reruns (``retries``), so later runs of the same keys fit in one replay. Off CUDA (the CPU
tests, under the Triton interpreter), or when capture fails (``graph_error``), the same launches run eagerly.
"""
from __future__ import annotations

from typing import Any

from gpulab.dbjoin.reference import JoinResult
from gpulab.dbjoin.tensorcore_join import (PartitionSpace, TensorCoreJoin, _check_pairs_fit, check_key_dtypes,
                                           choose_bits, partition_counting)


class TensorCorePlan:
    def __init__(self, join: TensorCoreJoin, left_key: Any, right_key: Any, count_only: bool = False,
                 use_graph: bool | None = None):
        import torch

        check_key_dtypes(left_key, right_key)
        self.join, self.count_only = join, count_only
        self.dev = left_key.device
        self.retries = 0
        self.graph = None
        self.graph_error: str | None = None
        self.use_graph = self.dev.type == "cuda" if use_graph is None else use_graph
        nl, nr = left_key.numel(), right_key.numel()
        self.empty = nl == 0 or nr == 0
        self.partitions = 0
        if self.empty:
            return
        if left_key.dtype != right_key.dtype:  # one key type, converted once here
            left_key, right_key = left_key.to(torch.int64), right_key.to(torch.int64)
        # the graph reads these addresses: contiguous copies kept alive by the plan
        self.left_key, self.right_key = left_key.contiguous(), right_key.contiguous()
        self.has_hi = self.left_key.dtype == torch.int64
        self.bits = choose_bits(nl, nr, join.rows_per_partition)
        self.partitions = 1 << self.bits
        self.left = PartitionSpace.allocate(nl, self.bits, self.has_hi, self.dev)
        self.right = PartitionSpace.allocate(nr, self.bits, self.has_hi, self.dev)
        self.counter = torch.zeros(1, dtype=torch.int64, device=self.dev)
        self.host_count = torch.zeros(1, dtype=torch.int64, pin_memory=self.dev.type == "cuda")
        self._alloc_outputs(1 if count_only else max(nl, nr))
        self._capture()

    def _alloc_outputs(self, capacity: int) -> None:
        import torch

        self.capacity = 0 if self.count_only else capacity
        self.out_l = torch.empty(capacity, dtype=torch.int32, device=self.dev)
        self.out_r = torch.empty(capacity, dtype=torch.int32, device=self.dev)

    def _enqueue(self) -> None:
        """Both partitions, the join and the count's copy to the host, on the current stream (no host sync)."""
        L = partition_counting(self.left_key, self.bits, self.left)
        R = partition_counting(self.right_key, self.bits, self.right)
        self.join.launch_join(L, R, self.bits, self.has_hi, self.capacity, self.out_l, self.out_r, self.counter,
                              self.count_only)
        self.host_count.copy_(self.counter, non_blocking=self.dev.type == "cuda")

    def _capture(self) -> None:
        import torch

        self.graph = None
        if not self.use_graph:
            return
        self.graph_error = None  # this capture's own outcome (a retry captures again)
        try:
            side = torch.cuda.Stream(self.dev)
            side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(side):  # once outside the capture: Triton compiles its kernels here
                self._enqueue()
            torch.cuda.synchronize(self.dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._enqueue()
            self.graph = graph
        except Exception as e:  # noqa: BLE001 - any capture failure: run the same launches without a graph
            lines = str(e).strip().splitlines()
            self.graph_error = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]

    def _launch(self) -> int:
        import torch

        if self.graph is not None:
            self.graph.replay()
        else:
            self._enqueue()
        if self.dev.type == "cuda":
            torch.cuda.current_stream(self.dev).synchronize()
        return int(self.host_count[0])

    def run(self) -> JoinResult:
        """The join of the plan's keys: one replay (two after a short capacity), exact."""
        import torch

        if self.empty:
            e = torch.empty(0, dtype=torch.int32, device=self.dev)
            return JoinResult(0) if self.count_only else JoinResult(0, e, e)
        total = self._launch()
        if not self.count_only and total > self.capacity:
            self.retries += 1
            _check_pairs_fit(total, self.dev)
            self._alloc_outputs(total)
            self._capture()
            total = self._launch()
        if self.count_only:
            return JoinResult(total)
        return JoinResult(total, self.out_l[:total], self.out_r[:total])

    def replay_times_ms(self, reps: int = 20) -> list[float]:
        """GPU time (ms) of each of ``reps`` graph replays queued back to back on the current stream, CUDA events
        between them (no host round trip); [] without a graph, for empty inputs or reps < 1. The outputs stay
        valid (every replay writes the same pairs, in an order that may differ)."""
        import torch

        if self.empty or self.graph is None or reps < 1:
            return []
        self.graph.replay()  # one untimed replay first
        events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        events[0].record()
        for e in events[1:]:
            self.graph.replay()
            e.record()
        events[-1].synchronize()
        return [a.elapsed_time(b) for a, b in zip(events, events[1:])]
