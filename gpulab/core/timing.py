"""One benchmark helper for every gpulab measurement.

:func:`benchmark` runs warm-up calls, then timed repetitions, and returns a :class:`Timing`
(median, p10, p90, mean, min, reps, unit). On a GPU each repetition is bracketed by CUDA events
on torch's current stream (kernels that cupy or numba launch on the legacy default stream are
ordered with it); on the CPU by ``time.perf_counter``.

``flush_l2=True`` overwrites a buffer twice the L2 size before every repetition (outside the
timed region) so that each repetition starts with a cold cache. Note: lines held by a
*persisting* L2 access-policy window survive such a flush (normal accesses do not evict
persisting lines); reset them with cudaCtxResetPersistingL2Cache when that matters.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass
class Timing:
    median: float
    p10: float
    p90: float
    mean: float
    min: float
    reps: int
    unit: str = "ms"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median:.4g} {self.unit} (p10 {self.p10:.4g}, p90 {self.p90:.4g}, n={self.reps})"


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default method)."""
    if not sorted_values:
        raise ValueError("quantile of an empty list")
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: list[float], unit: str = "ms") -> Timing:
    if not samples_ms:
        raise ValueError("no samples to summarize")
    if any(v != v for v in samples_ms):  # sorted() puts NaN anywhere: the percentiles would depend on the order
        raise ValueError("a timing sample is NaN")
    s = sorted(samples_ms)
    return Timing(
        median=quantile(s, 0.5),
        p10=quantile(s, 0.1),
        p90=quantile(s, 0.9),
        mean=sum(s) / len(s),
        min=s[0],
        reps=len(s),
        unit=unit,
    )


_flush_buffers: dict[str, Any] = {}


def _l2_flusher(device: str) -> Callable[[], None]:
    import torch

    if device not in _flush_buffers:
        l2 = 0
        try:
            l2 = int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0))
        except Exception:
            pass
        nbytes = max(2 * l2, 256 << 20)
        _flush_buffers[device] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    buf = _flush_buffers[device]
    return lambda: buf.fill_(0x5A5A5A5A)


def benchmark(
    fn: Callable[[], Any],
    *,
    device: str = "cpu",
    warmup: int = 3,
    reps: int = 20,
    flush_l2: bool = False,
    setup: Callable[[], Any] | None = None,
    max_seconds: float | None = None,
) -> Timing:
    """Time ``fn()``; returns milliseconds.

    ``setup`` runs before each repetition outside the timed region (e.g. restoring an input
    that ``fn`` sorts in place). ``max_seconds`` stops early (after at least 3 repetitions)
    once that much wall time has been spent in the timed loop.
    """
    if reps < 1:
        raise ValueError("reps must be >= 1")
    on_gpu = device.startswith("cuda")
    flush = _l2_flusher(device) if (flush_l2 and on_gpu) else None
    for _ in range(max(warmup, 0)):
        if setup:
            setup()
        fn()
    samples: list[float] = []
    t_start = time.perf_counter()
    if on_gpu:
        import torch

        torch.cuda.synchronize()
        events = []
        for _ in range(reps):
            if setup:
                setup()
            if flush:
                flush()
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            events.append((a, b))
            if max_seconds is not None and len(events) >= 3 and time.perf_counter() - t_start > max_seconds:
                break
        torch.cuda.synchronize()
        samples = [a.elapsed_time(b) for a, b in events]
    else:
        for _ in range(reps):
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
            if max_seconds is not None and len(samples) >= 3 and time.perf_counter() - t_start > max_seconds:
                break
    return summarize(samples)


def wall(fn: Callable[[], Any], *, reps: int = 5, warmup: int = 1, sync_cuda: bool = False) -> Timing:
    """Host wall-clock timing of a whole operation (e.g. transfer + sort + copy back), with a CUDA sync."""
    def run() -> None:
        fn()
        if sync_cuda:
            import torch

            torch.cuda.synchronize()

    for _ in range(warmup):
        run()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def capture_graph(fn: Callable[[], Any], warmup: int = 1) -> tuple[Any, Any]:
    """One call of ``fn`` captured as a CUDA graph, whose ``replay()`` then times device work without Python's
    launch overhead. ``fn`` runs ``warmup`` times on a side stream first (lazy initialisation and cuBLAS/cuDNN
    algorithm choices stay out of the capture). Returns (the graph, the captured call's output: static tensors
    that every replay rewrites)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def marked_times(run: Callable[[Callable[[str], None]], Any], event: Callable[[], Any],
                 elapsed_ms: Callable[[Any, Any], float], sync: Callable[[], None], reps: int
                 ) -> dict[str, dict[str, float]]:
    """Where ``run``'s device time goes, by the names it marks: ``run(mark)`` calls ``mark(name)`` after each
    piece of work it queues; ``event()`` records an event on the stream that work runs on (a cupy or torch
    event), ``elapsed_ms(a, b)`` reads the time between two, ``sync()`` waits for the stream. One untimed run,
    then ``reps`` timed ones -> {name: {"launches": marks of that name in one run, "ms": median over the runs
    of their summed time}}, in the order the names first appear. A piece's time includes the gap before it."""
    totals: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for rep in range(reps + 1):
        start = event()
        marks: list[tuple[str, Any]] = []
        run(lambda name: marks.append((name, event())))
        sync()
        if not rep:
            continue
        per: dict[str, float] = {}
        prev = start
        for name, e in marks:
            per[name] = per.get(name, 0.0) + elapsed_ms(prev, e)
            prev = e
        for name in per:  # the most marks of a name in one run (a retry may add launches to some runs only)
            counts[name] = max(counts.get(name, 0), sum(1 for m, _ in marks if m == name))
        for name, ms in per.items():
            totals.setdefault(name, []).append(ms)
    return {name: {"launches": counts[name], "ms": summarize(t).median} for name, t in totals.items()}

