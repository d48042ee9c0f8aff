"""The engine behind the server: :class:`AsyncEngine` runs :class:`~gpulab.vajra.engine.LLMEngine` in one
background thread (the engine and the model are used by that thread only); request handlers submit work
through a locked inbox and receive each request's outputs on an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``. A consumer that goes away aborts its request, which frees its KV blocks; a
failed step reaches every request in flight (none hangs)."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional

from gpulab.vajra.engine import LLMEngine
from gpulab.vajra.sampling import SamplingParams


class EngineFailed(Exception):
    pass


class AsyncEngine:
    """The engine in a background thread; one asyncio.Queue of RequestOutput per request."""

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._idle = idle_wait_s
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="vajra-engine", daemon=True)

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        """Validate (InputError -> 400 in the caller) and queue a request; returns its output queue."""
        if not self.alive:
            raise EngineFailed(f"the engine is not running ({self.error!r})")
        self.engine.check_request(prompt_ids, params)
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:  # the engine thread sets `error` under this lock: no stream registers after it failed
            if self.error is not None or not self._thread.is_alive():
                raise EngineFailed(f"the engine is not running ({self.error!r})")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
            self._adds.append((request_id, prompt_ids, params))
        self._wake.set()
        return q

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._aborts.append(request_id)
        self._wake.set()

    # --- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            with self._lock:
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for rid, ids, params in adds:
                try:
                    eng.add_request(ids, params, request_id=rid)
                except Exception as e:  # raced validation: hand the error to the request
                    self._deliver([(rid, e)])
            for rid in aborts:
                eng.abort(rid)
            if not eng.has_unfinished():
                self._wake.wait(self._idle)
                self._wake.clear()
                continue
            try:
                outs = eng.step()
            except BaseException as e:  # noqa: BLE001 - every waiting request must learn of it
                with self._lock:  # with `submit`'s check under the same lock, no request waits on a dead engine
                    self.error = e
                    rids = list(self._streams)
                self._deliver([(rid, EngineFailed(f"engine step failed: {type(e).__name__}: {e}")) for rid in rids])
                return
            if outs:
                self._deliver([(o.request_id, o) for o in outs])

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for rid, item in items:
                target = self._streams.get(rid)
                if target is None:
                    continue
                if isinstance(item, BaseException) or item.finished:
                    self._streams.pop(rid, None)
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed
                pass

    async def stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        """Async iterator of RequestOutput for one request; aborts it when the consumer goes away."""
        q = self.submit(request_id, prompt_ids, params)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
