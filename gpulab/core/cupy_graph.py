"""Capture a sequence of cupy launches into one CUDA graph (the "prepared" plans of the sort and the join).

``capture(stream, enqueue)`` runs ``enqueue()`` with ``stream`` current and capturing, and returns
``(graph, None)``, the graph uploaded to the device (instantiated now rather than at its first launch), or
``(None, why)`` when the capture could not begin, a launch inside it failed, or ending it failed; the capture is
always ended, so the stream is usable afterwards (the caller then launches the same work directly). Nothing in
``enqueue`` may allocate or synchronise: do one direct run first, so that kernels are loaded and buffers exist.
"""
from __future__ import annotations

from typing import Any, Callable


def capture(stream: Any, enqueue: Callable[[], None]) -> tuple[Any, str | None]:
    err: Exception | None = None
    graph = None
    with stream:
        try:
            stream.begin_capture()
        except Exception as e:  # noqa: BLE001 - reported to the caller
            err = e
        else:
            try:
                enqueue()
            except Exception as e:  # noqa: BLE001
                err = e
            try:  # always end the capture, also after a failed launch (that raises "invalidated")
                graph = stream.end_capture()
            except Exception as e:  # noqa: BLE001
                err = err or e
    if err is not None or graph is None:
        return None, f"{type(err).__name__}: {err}" if err is not None else "no graph was captured"
    upload = getattr(graph, "upload", None)
    if upload is not None:
        upload(stream)
    return graph, None
