"""OpenAI-compatible HTTP server (FastAPI + uvicorn) around the vajra engine.

:class:`AsyncEngine` runs :class:`~gpulab.vajra.engine.LLMEngine` in one background thread (the
engine and the model are used by that thread only); request handlers submit work through a locked
inbox and receive each request's deltas on an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``. A handler that goes away (client disconnect) aborts its request,
which frees its KV blocks.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(chat template from the tokenizer config), ``stream: true`` as server-sent events ending in
``data: [DONE]``; ``logprobs`` (completions: ``logprobs: K``; chat: ``logprobs: true``, ``top_logprobs: K``)
in OpenAI's shapes; ``n`` choices and batched completion prompts, one engine request per choice, merged into one
response or stream by choice index. Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` with
status 400 (malformed JSON, bad parameters, too long a prompt), 404 (unknown model or route),
405, 500 (the engine failed: every request in flight gets the error, none hangs).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import socket
import threading
import time
import uuid
from typing import Any, Optional

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here

from gpulab.core.errors import InputError
from gpulab.vajra.engine import LLMEngine, RequestOutput
from gpulab.vajra.sampling import MAX_LOGPROBS, SamplingParams

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
MAX_N = 128  # most choices (n, or prompts in a batch) in one request


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


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


# --- request parsing ---------------------------------------------------------------------------

def _finite(x: float) -> float:
    """JSON has no -inf: a token the model gives no probability is -9999.0 (as vLLM)."""
    return x if math.isfinite(x) else -9999.0


_UNSUPPORTED_NONZERO = ("presence_penalty", "frequency_penalty")


def _get(body: dict[str, Any], key: str, types: tuple, default: Any = None) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        names = "/".join(t.__name__ for t in types)
        raise APIError(400, f"'{key}' must be of type {names}, got {type(v).__name__}", param=key)
    return v


def _parse_logprobs(body: dict[str, Any], chat: bool) -> Optional[int]:
    """How many alternatives per token a request asks for (None: no logprobs): chat's ``logprobs: true`` with
    ``top_logprobs: K``, or the completions API's ``logprobs: K``."""
    top = _get(body, "top_logprobs", (int,), None)
    if chat:
        if not _get(body, "logprobs", (bool,), False):
            if top is not None:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            return None
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise APIError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs")
        return top or 0
    if top is not None:
        raise APIError(400, "'top_logprobs' is a chat parameter: /v1/completions takes 'logprobs': K",
                       param="top_logprobs")
    return _get(body, "logprobs", (int,), None)


def parse_n(body: dict[str, Any]) -> int:
    """Choices per prompt (``n``); ``best_of`` is accepted only where it changes nothing (None or n)."""
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    if body.get("best_of") not in (None, n):
        raise APIError(400, "best_of other than n is not supported by this server", param="best_of")
    return n


def choice_params(sp: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice: with a seed, choice j samples with seed + j (distinct, reproducible)."""
    if n == 1:
        return [sp]
    return [sp if sp.seed is None else dataclasses.replace(sp, seed=sp.seed + j) for j in range(n)]


def parse_sampling(body: dict[str, Any], default_max_tokens: int, vocab: int, chat: bool = False) -> SamplingParams:
    logprobs = _parse_logprobs(body, chat)
    if body.get("echo"):
        raise APIError(400, "echo is not supported by this server", param="echo")
    for k in _UNSUPPORTED_NONZERO:
        if _get(body, k, (int, float), 0) != 0:
            raise APIError(400, f"'{k}' is not supported (only 0)", param=k)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    sp = SamplingParams(
        max_tokens=max_tokens,
        temperature=_get(body, "temperature", (int, float), 1.0),
        top_p=_get(body, "top_p", (int, float), 1.0),
        top_k=_get(body, "top_k", (int,), -1),
        seed=_get(body, "seed", (int,), None),
        stop=stop,
        stop_token_ids=_get(body, "stop_token_ids", (list,), []),
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
        min_tokens=_get(body, "min_tokens", (int,), 0),
        skip_special_tokens=_get(body, "skip_special_tokens", (bool,), True),
        logprobs=logprobs,
    )
    try:
        sp.validate(vocab)
    except InputError as e:
        param = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=param if param in body or param == "max_tokens" else None) from None
    return sp


def _completion_prompts(engine: LLMEngine, body: dict[str, Any]) -> list[list[int]]:
    """The prompts of a completions request as token ids: a string, a list of token ids, or a list of either
    (a batch: one choice per prompt, times n)."""
    p = body.get("prompt")

    def one(x: Any) -> list[int] | None:
        if isinstance(x, str):
            if engine.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            return engine.tokenizer.encode(x)
        if isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            return list(x)
        return None

    single = one(p)
    if single is not None:
        return [single]
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        batch = [one(x) for x in p]
        if all(b is not None for b in batch):
            if len(batch) > MAX_N:
                raise APIError(400, f"at most {MAX_N} prompts per request, got {len(batch)}", param="prompt")
            return batch
    raise APIError(400, "'prompt' must be a non-empty string, a list of token ids, or a non-empty list of those",
                   param="prompt")


def _chat_prompt(engine: LLMEngine, body: dict[str, Any]) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for part in c:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                parts.append(part["text"])
            c = "".join(parts)
        if c is None:
            c = ""
        if not isinstance(c, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        clean.append({"role": m["role"], "content": c})
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so no chat template", param="messages")
    try:
        return engine.tokenizer.apply_chat_template(clean)
    except InputError as e:
        raise APIError(400, str(e), param="messages") from None


# --- the app -----------------------------------------------------------------------------------

def build_app(async_engine: AsyncEngine, model_name: str):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    engine = async_engine.engine
    app = FastAPI(title="gpulab vajra", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                            status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return err(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return err(e.status_code, str(e.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, e):
        return err(400, f"invalid request: {e.errors()[0].get('msg', 'bad body') if e.errors() else 'bad body'}")

    @app.exception_handler(Exception)
    async def _internal(_request, e):
        return err(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    async def read_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required", param="model")
        if model != model_name:
            raise APIError(404, f"The model '{model}' does not exist (this server serves '{model_name}')",
                           param="model", code="model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise APIError(400, "'stream' must be true or false", param="stream")
        return body

    def validate(ids: list[int], sp: SamplingParams, param: str) -> None:
        try:
            engine.check_request(ids, sp)
        except InputError as e:
            code = "context_length_exceeded" if "context length" in str(e) or "KV-cache" in str(e) else None
            raise APIError(400, str(e), param=param, code=code) from None
        if not async_engine.alive:
            raise APIError(503, f"the engine is not running ({async_engine.error!r})", "service_unavailable")

    def tok_str(t: int) -> str:
        return f"token_id:{t}" if engine.tokenizer is None else engine.tokenizer.decode([t], skip_special_tokens=False)

    def lp_items(o: RequestOutput, offset: int) -> list[tuple[int, Any, int]]:
        """(token id, (logprob, top), text offset) of an output's tokens; offset: characters sent before it."""
        return [(t, e, offset) for t, e in zip(o.new_token_ids, o.logprobs or ())]

    def top_dict(top) -> dict[str, float]:
        """{token text: logprob}, best first; tokens with one text (e.g. partial UTF-8) keep the best value."""
        d: dict[str, float] = {}
        for i, v in top:
            d.setdefault(tok_str(i), _finite(v))
        return d

    def completion_logprobs(items) -> dict[str, Any]:
        return {"tokens": [tok_str(t) for t, _, _ in items],
                "token_logprobs": [_finite(e[0]) for _, e, _ in items],
                "top_logprobs": [top_dict(e[1]) for _, e, _ in items],
                "text_offset": [off for _, _, off in items]}

    def chat_logprobs(items) -> dict[str, Any]:
        def one(t: int, v: float) -> dict[str, Any]:
            s = tok_str(t)
            return {"token": s, "logprob": _finite(v), "bytes": list(s.encode("utf-8"))}

        return {"content": [{**one(t, e[0]), "top_logprobs": [one(i, v) for i, v in e[1]]} for t, e, _ in items]}

    async def merged(rid: str, subs: list[tuple[int, list[int], SamplingParams]]):
        """(choice index, RequestOutput) of several engine requests, as they come: one pump task per request feeds a
        queue. Closing it cancels the pumps, whose streams then abort what has not finished; the first error
        (raced validation, a failed engine) is raised here."""
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, gen) -> None:
            try:
                async for o in gen:
                    q.put_nowait((i, o))
            except Exception as e:  # noqa: BLE001 - handed to the consumer (cancellation is not caught)
                q.put_nowait((i, e))
            finally:
                await gen.aclose()
            q.put_nowait((i, done))

        tasks = [asyncio.ensure_future(pump(i, async_engine.stream(rid if len(subs) == 1 else f"{rid}-{i}", ids, sp)))
                 for i, ids, sp in subs]
        try:
            running = len(tasks)
            while running:
                i, item = await q.get()
                if item is done:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(gen, request: Request):
        """All of a non-streamed request's outputs, {choice index: (text, last output, logprob items)}; None when
        the client went away first (closing the stream then aborts the requests, so a gone client's generation
        does not run to max_tokens)."""
        got: dict[int, tuple[list[str], Any, list, list[int]]] = {}

        async def consume():
            async for i, o in gen:
                text, _, items, sent = got.setdefault(i, ([], None, [], [0]))
                items.extend(lp_items(o, sent[0]))
                text.append(o.delta_text)
                sent[0] += len(o.delta_text)
                got[i] = (text, o, items, sent)

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    return None
            task.result()  # raises what the stream raised
            return {i: ("".join(text), last, items) for i, (text, last, items, _) in got.items()}
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})  # the generator must stop running before it can be closed
            await gen.aclose()

    def total_usage(subs, prompt_of: dict[int, int], lasts: dict[int, RequestOutput]) -> dict[str, int]:
        """Prompt tokens once per prompt (not per choice), completion tokens of every choice."""
        prompts = {prompt_of[i]: len(ids) for i, ids, _ in subs}
        p, c = sum(prompts.values()), sum(o.num_output_tokens for o in lasts.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def run(request: Request, rid, subs, prompt_of, stream: bool, make_chunk, make_final, include_usage: bool,
                  first_chunk=None, fmt_logprobs=None):
        """subs: [(choice index, prompt ids, params)], one engine request each (n choices of each prompt);
        prompt_of: choice index -> prompt number. make_chunk(index or None, output or None, usage=None,
        logprobs=None), first_chunk(index) and make_final([(index, text, last output, logprobs)], usage) build
        the bodies; fmt_logprobs turns logprob items into the API's object."""
        gen = merged(rid, subs)
        fmt = fmt_logprobs if subs[0][2].logprobs is not None else None
        if not stream:
            try:
                got = await collect(gen, request)
            except EngineFailed as e:
                raise APIError(500, str(e), "internal_error") from None
            except InputError as e:  # found when the engine added it (raced validation, a prefill provider)
                raise APIError(400, str(e)) from None
            if got is None:  # nobody is listening
                return Response(status_code=499)
            choices = [(i, text, last, fmt(items) if fmt else None) for i, (text, last, items) in sorted(got.items())]
            return JSONResponse(make_final(choices, total_usage(subs, prompt_of, {c[0]: c[2] for c in choices})))

        async def sse():
            try:
                if first_chunk is not None:
                    for i, _, _ in subs:
                        yield f"data: {json.dumps(first_chunk(i))}\n\n"
                lasts: dict[int, RequestOutput] = {}
                pending: dict[int, list] = {i: [] for i, _, _ in subs}
                sent = dict.fromkeys(pending, 0)
                async for i, o in gen:
                    lasts[i] = o
                    pending[i].extend(lp_items(o, sent[i]))
                    if o.delta_text or o.finished:  # a token whose text is held back: its logprobs wait too
                        yield f"data: {json.dumps(make_chunk(i, o, None, fmt(pending[i]) if fmt else None))}\n\n"
                        sent[i] += len(o.delta_text)
                        pending[i] = []
                if include_usage and lasts:
                    yield f"data: {json.dumps(make_chunk(None, None, total_usage(subs, prompt_of, lasts)))}\n\n"
                yield "data: [DONE]\n\n"
            except (EngineFailed, InputError) as e:  # InputError: raced validation, a prefill provider's check
                kind = "internal_error" if isinstance(e, EngineFailed) else "invalid_request_error"
                payload = {"error": {"message": str(e), "type": kind, "param": None, "code": None}}
                yield f"data: {json.dumps(payload)}\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def choices_of(prompts: list[list[int]], sp: SamplingParams, n: int):
        """(subs, prompt_of): choice index = prompt number * n + j, as OpenAI numbers them."""
        subs, prompt_of = [], {}
        for k, ids in enumerate(prompts):
            for j, p in enumerate(choice_params(sp, n)):
                subs.append((k * n + j, ids, p))
                prompt_of[k * n + j] = k
        return subs, prompt_of

    @app.get("/health")
    async def health():
        if not async_engine.alive:
            return err(503, f"the engine is not running ({async_engine.error!r})", "service_unavailable")
        return {"status": "ok", "running": engine.num_unfinished}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "gpulab", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompts = _completion_prompts(engine, body)
        n = parse_n(body)
        sp = parse_sampling(body, 16, engine.vocab_size)
        for ids in prompts:
            validate(ids, sp, "prompt")
        subs, prompt_of = choices_of(prompts, sp, n)
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))

        def chunk(i: Optional[int], o: Optional[RequestOutput], use=None, lp=None):
            choices = [] if o is None else [{"index": i, "text": o.delta_text, "logprobs": lp,
                                             "finish_reason": o.finish_reason}]
            c = {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices}
            if use is not None:
                c["usage"] = use
            return c

        def final(choices, use):
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}
                                for i, text, o, lp in choices],
                    "usage": use}

        return await run(request, rid, subs, prompt_of, body.get("stream", False), chunk, final, include_usage,
                         fmt_logprobs=completion_logprobs)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        ids = _chat_prompt(engine, body)
        n = parse_n(body)
        # no max_tokens: up to the context length, or what the KV cache can hold when that is less
        room = min(engine.max_model_len, engine.block_manager.capacity_blocks * engine.block_manager.block_size)
        default_max = max(1, room - len(ids))
        sp = parse_sampling(body, default_max, engine.vocab_size, chat=True)
        validate(ids, sp, "messages")
        subs, prompt_of = choices_of([ids], sp, n)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))

        def chunk(i: Optional[int], o: Optional[RequestOutput], use=None, lp=None):
            if o is None:
                choices = []
            else:
                delta = {"content": o.delta_text} if o.delta_text else {}
                choices = [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": o.finish_reason}]
            c = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                 "choices": choices}
            if use is not None:
                c["usage"] = use
            return c

        def first(i: int):
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}

        def final(choices, use):
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                 "logprobs": lp, "finish_reason": o.finish_reason} for i, text, o, lp in choices],
                    "usage": use}

        return await run(request, rid, subs, prompt_of, body.get("stream", False), chunk, final, include_usage,
                         first_chunk=first, fmt_logprobs=chat_logprobs)

    return app


class ServerThread:
    """uvicorn serving ``app`` from a background thread on an already-bound socket (tests, benches)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def serve(engine: LLMEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (the ``gpulab serve`` command)."""
    import uvicorn

    ae = AsyncEngine(engine).start()
    app = build_app(ae, model_name)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        ae.shutdown()
