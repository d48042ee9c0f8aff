"""OpenAI-compatible HTTP server (FastAPI + uvicorn) around the vajra engine.

Request handlers parse a body with :mod:`gpulab.vajra.openai_api` and submit one engine request per choice to
:class:`~gpulab.vajra.async_engine.AsyncEngine` (the engine's thread); a handler whose client goes away
(disconnect) aborts its requests, which frees their KV blocks.

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
import json
import socket
import threading
import time
import uuid
from typing import Any, Optional

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here

from gpulab.core.errors import InputError
from gpulab.vajra.async_engine import AsyncEngine, EngineFailed
from gpulab.vajra.detokenizer import IncrementalDetokenizer
from gpulab.vajra.engine import LLMEngine, RequestOutput
from gpulab.vajra.openai_api import (APIError, chat_prompt, choice_params, completion_prompts, echo_texts,
                                     check_unsupported, finite_logprob, parse_echo, parse_n, parse_sampling,
                                     parse_stream_options)
from gpulab.vajra.sampling import SamplingParams

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


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
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:  # JSON's \ud800 escapes make lone surrogates, which no tokenizer or response can encode
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request has a string that is not valid Unicode (a lone UTF-16 surrogate)") from None
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required", param="model")
        if model != model_name:
            raise APIError(404, f"The model '{model}' does not exist (this server serves '{model_name}')",
                           param="model", code="model_not_found")
        if body.get("stream") is None:  # OpenAI's stream is nullable: null is the default, false
            body["stream"] = False
        if not isinstance(body["stream"], bool):
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
        """A token's text in logprobs; a token that holds part of a UTF-8 character is written as its bytes,
        ``bytes:\\xe6`` (as OpenAI's), so that such tokens stay apart (top_logprobs is keyed by it)."""
        if engine.tokenizer is None:
            return f"token_id:{t}"
        s = engine.tokenizer.decode([t], skip_special_tokens=False)
        if "\ufffd" in s:
            raw = engine.tokenizer.token_bytes(t)
            if raw != s.encode("utf-8"):
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return s

    def top_dict(top, token: int, logprob: float) -> dict[str, float]:
        """{token text: logprob}, best first, and the chosen token's when it is not among them (K + 1 entries at
        most, as OpenAI's completions); two tokens with one text (a vocabulary may hold both) keep the best value."""
        d: dict[str, float] = {}
        for i, v in top:
            d.setdefault(tok_str(i), finite_logprob(v))
        if all(i != token for i, _ in top):
            d.setdefault(tok_str(token), finite_logprob(logprob))
        return d

    def prompt_items(ids: list[int], entries: list, text_len: int) -> list[tuple[int, Any, int]]:
        """echo's logprob items of a prompt: its first token has none (nothing before it to predict it from);
        a token's offset is the length of the text of the tokens before it (special tokens add none), at most
        the echoed text's."""
        items = []
        detok = IncrementalDetokenizer(engine.tokenizer, [], skip_special_tokens=True)  # one short decode a token
        for j, t in enumerate(ids):
            items.append((t, entries[j - 1] if j else None, min(text_len, len(detok.text))))
            detok.add(t)
        return items

    def completion_logprobs(items) -> dict[str, Any]:
        return {"tokens": [tok_str(t) for t, _, _ in items],
                "token_logprobs": [None if e is None else finite_logprob(e[0]) for _, e, _ in items],
                "top_logprobs": [None if e is None else top_dict(e[1], t, e[0]) for t, e, _ in items],
                "text_offset": [off for _, _, off in items]}

    def chat_logprobs(items) -> dict[str, Any]:
        def one(t: int, v: float) -> dict[str, Any]:
            s = tok_str(t)
            raw = s.encode("utf-8") if engine.tokenizer is None else engine.tokenizer.token_bytes(t)
            return {"token": s, "logprob": finite_logprob(v), "bytes": list(raw)}

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

    class Choice:
        """One choice's output as it arrives: the text each output adds (echo's prompt text before the first)
        and the logprob items not handed out yet. A generated token's text offset is where its text begins in
        the choice's text: the length of the text of the tokens before it (a token that completes a character
        begins where that character does), at most the text returned. Its item is handed out once text beyond
        that offset has been sent (the detokenizer holds back a stop string's possible start and incomplete
        characters), or at the end."""

        def __init__(self, echo_text: Optional[str], ids: list[int], params: SamplingParams):
            self.echo_text, self.ids = echo_text, ids
            self.last: Optional[RequestOutput] = None
            self.items: list = []
            self.pending: list = []  # generated tokens' items whose text has not been sent yet
            self.sent = 0  # characters of the choice's text sent (echo included)
            self.base = 0  # where the generated text begins (after echo's prompt text)
            self.detok = None if params.logprobs is None else IncrementalDetokenizer(
                engine.tokenizer, ids, skip_special_tokens=params.skip_special_tokens)

        def add(self, o: RequestOutput) -> str:
            head = ""
            if self.last is None and self.echo_text is not None:
                head = self.echo_text
                if o.prompt_logprobs is not None:
                    self.items = prompt_items(self.ids, o.prompt_logprobs, len(head))
                self.sent = self.base = len(head)
            self.last = o
            if self.detok is not None:
                for t, e in zip(o.new_token_ids, o.logprobs or ()):
                    self.pending.append((t, e, self.base + len(self.detok.text)))
                    self.detok.add(t)
            self.sent += len(o.delta_text)
            k = len(self.pending) if o.finished else \
                next((j for j, (_, _, off) in enumerate(self.pending) if off >= self.sent), len(self.pending))
            self.items += [(t, e, min(off, self.sent)) for t, e, off in self.pending[:k]]
            del self.pending[:k]
            return head + o.delta_text

        def take_items(self) -> list:
            items, self.items = self.items, []
            return items

    async def collect(gen, request: Request, choices: dict[int, Choice]):
        """Feed a non-streamed request's outputs to its choices, {index: (text, last output, logprob items)};
        None when the client went away first (closing the stream then aborts the requests, so a gone client's
        generation does not run to max_tokens)."""
        texts: dict[int, list[str]] = {i: [] for i in choices}

        async def consume():
            async for i, o in gen:
                texts[i].append(choices[i].add(o))

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    return None
            task.result()  # raises what the stream raised
            return {i: ("".join(texts[i]), c.last, c.items) for i, c in choices.items() if c.last is not None}
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
                  first_chunk=None, fmt_logprobs=None, echo=None):
        """subs: [(choice index, prompt ids, params)], one engine request each (n choices of each prompt);
        prompt_of: choice index -> prompt number. make_chunk(index or None, output or None, usage=None,
        logprobs=None), first_chunk(index) and make_final([(index, text, last output, logprobs)], usage) build
        the bodies; fmt_logprobs turns logprob items into the API's object; echo: choice index -> prompt text to
        put before the choice's first output (with its tokens' logprobs when asked)."""
        gen = merged(rid, subs)
        choices = {i: Choice(None if echo is None else echo[i], ids, sp) for i, ids, sp in subs}
        fmt = fmt_logprobs if subs[0][2].logprobs is not None else None
        if not stream:
            try:
                got = await collect(gen, request, choices)
            except EngineFailed as e:
                raise APIError(500, str(e), "internal_error") from None
            except InputError as e:  # found when the engine added it (raced validation, a prefill provider)
                raise APIError(400, str(e)) from None
            if got is None:  # nobody is listening
                return Response(status_code=499)
            done = [(i, text, last, fmt(items) if fmt else None) for i, (text, last, items) in sorted(got.items())]
            return JSONResponse(make_final(done, total_usage(subs, prompt_of, {c[0]: c[2] for c in done})))

        def event(c: dict) -> str:
            if include_usage:  # as OpenAI's: every chunk before the usage chunk says "usage": null
                c.setdefault("usage", None)
            return f"data: {json.dumps(c)}\n\n"

        async def sse():
            try:
                if first_chunk is not None:
                    for i, _, _ in subs:
                        yield event(first_chunk(i))
                async for i, o in gen:
                    text = choices[i].add(o)
                    if text or o.finished:  # a token whose text is held back: its logprobs wait too
                        lp = fmt(choices[i].take_items()) if fmt else None
                        yield event(make_chunk(i, o, None, lp, text))
                lasts = {i: c.last for i, c in choices.items() if c.last is not None}
                if include_usage and lasts:
                    yield event(make_chunk(None, None, total_usage(subs, prompt_of, lasts)))
                yield "data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001 - InputError: raced validation, a prefill provider's check; any
                # other error (a provider that failed on this prompt) is the 500 a non-streamed request would get
                if isinstance(e, InputError):
                    kind, message = "invalid_request_error", str(e)
                elif isinstance(e, EngineFailed):
                    kind, message = "internal_error", str(e)
                else:
                    kind, message = "internal_error", f"internal error: {type(e).__name__}: {e}"
                payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
                yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"  # the stream still ends as every stream does (as vLLM's)
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
        bm = engine.block_manager
        out = {"status": "ok", "running": engine.num_unfinished, "kv_blocks_used": bm.num_used,
               "kv_blocks": bm.capacity_blocks}
        if bm.prefix_caching:  # since start: tokens of admitted requests, those found cached, their share
            st = engine.prefix_cache_stats()
            out.update({k: st[k] for k in ("prefix_tokens_queried", "prefix_tokens_hit", "prefix_hit_rate")})
        return out

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "gpulab",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return err(404, f"The model '{model_id}' does not exist (this server serves '{model_name}')",
                       param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        check_unsupported(body, chat=False)
        # tokenizing a long prompt takes seconds: off the event loop, which serves every other stream
        prompts, sent = await asyncio.to_thread(completion_prompts, engine, body)
        n = parse_n(body, len(prompts))
        sp = parse_sampling(body, 16, engine.vocab_size)
        for ids in prompts:
            validate(ids, sp, "prompt")
        subs, prompt_of = choices_of(prompts, sp, n)
        echo = None
        if parse_echo(body, chat=False):
            texts = echo_texts(engine, prompts, sent)
            echo = {i: texts[k] for i, k in prompt_of.items()}
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        include_usage = parse_stream_options(body)

        def chunk(i: Optional[int], o: Optional[RequestOutput], use=None, lp=None, text=None):
            choices = [] if o is None else [{"index": i, "text": o.delta_text if text is None else text,
                                             "logprobs": lp, "finish_reason": o.finish_reason,
                                             "stop_reason": o.stop_reason}]
            c = {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices}
            if use is not None:
                c["usage"] = use
            return c

        def final(choices, use):
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": o.finish_reason,
                                 "stop_reason": o.stop_reason} for i, text, o, lp in choices],
                    "usage": use}

        return await run(request, rid, subs, prompt_of, body.get("stream", False), chunk, final, include_usage,
                         fmt_logprobs=completion_logprobs, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        check_unsupported(body, chat=True)
        ids = await asyncio.to_thread(chat_prompt, engine, body)
        n = parse_n(body)
        # no max_tokens: up to the context length, or what the KV cache can hold when that is less
        room = min(engine.max_model_len, engine.block_manager.capacity_blocks * engine.block_manager.block_size)
        default_max = max(1, room - len(ids))
        sp = parse_sampling(body, default_max, engine.vocab_size, chat=True)
        validate(ids, sp, "messages")
        subs, prompt_of = choices_of([ids], sp, n)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        include_usage = parse_stream_options(body)

        def chunk(i: Optional[int], o: Optional[RequestOutput], use=None, lp=None, text=None):
            if o is None:
                choices = []
            else:
                text = o.delta_text if text is None else text
                delta = {"content": text} if text else {}
                choices = [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": o.finish_reason,
                            "stop_reason": o.stop_reason}]
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
                                 "logprobs": lp, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                                for i, text, o, lp in choices],
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


def check_bind(host: str, port: int) -> None:
    """Before a model is loaded: the address must resolve and the port be free (uvicorn found out only after
    the load, and printed its own log lines and exit code)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # IPv4 for a name ('localhost': 127.0.0.1 first)
    addr: Any = (host, port)
    if family == socket.AF_INET and host:
        try:
            socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):  # a name of IPv6 addresses only ('ip6-localhost')
            try:
                family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            except (socket.gaierror, UnicodeError) as e:
                raise InputError(f"--host {host}: not an address of this machine "
                                 f"({getattr(e, 'strerror', None) or e})") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        try:
            s.bind(addr)
        except socket.gaierror as e:
            raise InputError(f"--host {host}: not an address of this machine ({e.strerror or e})") from None
        except (OSError, UnicodeError) as e:
            raise InputError(f"--host {host} --port {port}: cannot bind ({getattr(e, 'strerror', None) or e})") \
                from None


def serve(engine: LLMEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (the ``gpulab serve`` command)."""
    import signal

    import uvicorn

    from gpulab.core.child import handling

    ae = AsyncEngine(engine).start()
    app = build_app(ae, model_name)
    # Ctrl-C (and SIGTERM, a process manager's stop) stops the server cleanly, as uvicorn does it: its own handling
    # runs under Python's default handler (gpulab's turns the signal into an error, which would escape a server
    # that had already shut down)
    try:
        with handling(signal.default_int_handler):
            uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    except KeyboardInterrupt:  # a stop, not a failure
        pass
    finally:
        ae.shutdown()
