"""The OpenAI-compatible server end to end with the official openai client (fake model + real tokenizer)."""
from __future__ import annotations

import asyncio

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the server needs fastapi + uvicorn (not on the GPU machine)")
pytest.importorskip("uvicorn")

from gpulab.vajra.engine import EngineConfig, LLMEngine
from gpulab.vajra.server import AsyncEngine, ServerThread, build_app

from .fake_model import FakeModel, expected_logits, reference_greedy

openai = pytest.importorskip("openai")
NAME = "tiny"


@pytest.fixture(scope="module")
def server(tokenizer):
    model = FakeModel(tokenizer.vocab_size, max_model_len=256)
    eng = LLMEngine(model, tokenizer, EngineConfig(num_blocks=300, block_size=8, max_num_seqs=32,
                                                   max_num_batched_tokens=96))
    ae = AsyncEngine(eng).start()
    with ServerThread(build_app(ae, NAME)) as srv:
        srv.engine = eng
        srv.ae = ae
        yield srv
    ae.shutdown()


def ref_text(tokenizer, prompt_ids, n):
    out = reference_greedy(prompt_ids, n, tokenizer.vocab_size, eos=(tokenizer.eos_token_id,))
    return tokenizer.decode(out), out


def api_token(tokenizer, t):
    """A token's text in logprobs: its decode, or 'bytes:\\x..' when it holds part of a character."""
    s = tokenizer.decode([t], skip_special_tokens=False)
    return s if "\ufffd" not in s else "bytes:" + "".join(f"\\x{b:02x}" for b in tokenizer.token_bytes(t))


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_models_health_and_completion(server, tokenizer):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    prompt = "Good morrow, sweet"
    want, ids = ref_text(tokenizer, tokenizer.encode(prompt), 12)
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt)) and r.usage.completion_tokens == len(ids)
    # token-id prompts and streaming give the same text
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt=tokenizer.encode(prompt), max_tokens=12, temperature=0, stream=True) if ch.choices]
    assert "".join(pieces) == want


def test_chat_and_chat_stream(server, tokenizer):
    c = client(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    ids = tokenizer.apply_chat_template(msgs)
    want, _ = ref_text(tokenizer, ids, 10)
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(ids)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "My lord,"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_stream_with_include_usage_puts_usage_null_on_every_other_chunk(server, path, body):
    """OpenAI's wire format: with include_usage every chunk has a usage field, null but in the last (before
    [DONE]), which has the counts and no choices; without it no chunk has the field."""
    import json

    def chunks(opts):
        out = []
        with httpx.stream("POST", server.url + path, json={"model": NAME, "max_tokens": 4, "temperature": 0,
                                                           "stream": True, **body, **opts}, timeout=30) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    out.append(json.loads(line[6:]))
        return out

    got = chunks({"stream_options": {"include_usage": True}})
    assert len(got) >= 2 and all("usage" in c for c in got)
    assert all(c["usage"] is None for c in got[:-1]) and got[-1]["usage"]["completion_tokens"] == 4
    assert got[-1]["choices"] == []
    assert not any("usage" in c for c in chunks({}))


def test_errors_are_openai_style(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=NAME, prompt="hi " * 400, max_tokens=2)
    assert "maximum context length" in e.value.body["message"] and e.value.body["code"] == "context_length_exceeded"
    for bad in (dict(temperature=-1), dict(top_p=2), dict(max_tokens=0), dict(n=0), dict(n=129), dict(logprobs=21),
                dict(n=2, best_of=3)):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=NAME, prompt="hi", **{"max_tokens": 2, **bad})
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=NAME, messages=[], max_tokens=2)
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        for opts, message in (({"stream_options": {"include_usage": True}}, "only allowed with 'stream': true"),
                              ({"stream": True, "stream_options": [1]}, "must be an object"),
                              ({"stream": True, "stream_options": {"include_usage": "yes"}}, "true or false")):
            r = httpx.post(server.url + path, json={"model": NAME, "max_tokens": 2, **body, **opts})
            assert r.status_code == 400 and message in r.json()["error"]["message"], (path, opts, r.text)
    # the server is still healthy and the cache is empty once idle
    assert httpx.get(server.url + "/health").status_code == 200


def test_64_concurrent_streams(server, tokenizer):
    prompts = [f"Request {i}: to be or not" for i in range(64)]
    lens = [4 + (i % 9) for i in range(64)]
    want = [ref_text(tokenizer, tokenizer.encode(p), n)[0] for p, n in zip(prompts, lens)]
    ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

    async def one(p, n):
        text = []
        stream = await ac.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0, stream=True)
        async for ch in stream:
            if ch.choices:
                text.append(ch.choices[0].text)
        return "".join(text)

    async def main():
        try:
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lens)))
        finally:
            await ac.close()

    got = asyncio.run(main())
    assert got == want
    import time

    deadline = time.time() + 10
    while server.engine.has_unfinished() and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.block_manager.num_used == 0


@pytest.mark.parametrize("n", [1, 3])
def test_disconnect_aborts_request(server, n):
    """A streaming client that leaves aborts its request: with n choices, every one of them."""
    import time

    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": NAME, "prompt": "abc", "max_tokens": 200, "stream": True,
                            "ignore_eos": True, "n": n}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.time() + 10
    while server.engine.has_unfinished() and time.time() < deadline:
        time.sleep(0.05)
    assert not server.engine.has_unfinished() and server.engine.block_manager.num_used == 0


def test_engine_failure_reaches_every_request(tokenizer):
    class Broken(FakeModel):
        def forward(self, batch, kv):
            raise RuntimeError("boom")

    eng = LLMEngine(Broken(tokenizer.vocab_size), tokenizer, EngineConfig(num_blocks=50, block_size=8))
    ae = AsyncEngine(eng).start()
    with ServerThread(build_app(ae, NAME)) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 503
    ae.shutdown()


def test_unsupported_features_are_400_not_ignored(server):
    msgs = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for path, extra, param in (("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
                               ("/v1/chat/completions", {"messages": msgs, "tools": [tool]}, "tools"),
                               ("/v1/chat/completions", {"messages": msgs, "tool_choice": "auto"}, "tool_choice"),
                               ("/v1/chat/completions", {"messages": msgs, "response_format": {"type": "json_object"}},
                                "response_format")):
        r = httpx.post(server.url + path, json={"model": NAME, "max_tokens": 2, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, extra, r.text)
    for extra in ({"tools": [], "tool_choice": "none"}, {"response_format": {"type": "text"}}):  # asks for nothing
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "max_tokens": 2, "messages": msgs,
                                                                  **extra})
        assert r.status_code == 200, (extra, r.text)


def test_vllm_extensions_that_are_not_implemented_are_400_not_ignored(server):
    """guided decoding taken as free text, a beam search run as sampling, the stop string kept out of the text
    though asked for: each would pass for an answer to what was asked. Set to their no-op values, they pass."""
    msgs = [{"role": "user", "content": "hi"}]
    asks = [("/v1/completions", {"prompt": "x", "guided_json": {"type": "object"}}, "guided_json"),
            ("/v1/completions", {"prompt": "x", "guided_choice": ["a", "b"]}, "guided_choice"),
            ("/v1/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
            ("/v1/completions", {"prompt": "x", "include_stop_str_in_output": True}, "include_stop_str_in_output"),
            ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1}, "prompt_logprobs"),
            ("/v1/chat/completions", {"messages": msgs, "guided_regex": "a+"}, "guided_regex"),
            ("/v1/chat/completions", {"messages": msgs, "add_generation_prompt": False}, "add_generation_prompt"),
            ("/v1/chat/completions", {"messages": msgs, "continue_final_message": True}, "continue_final_message"),
            ("/v1/chat/completions", {"messages": msgs, "chat_template": "{{ messages }}"}, "chat_template")]
    for path, extra, param in asks:
        r = httpx.post(server.url + path, json={"model": NAME, "max_tokens": 2, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, extra, r.text)
        assert "vLLM extension" in r.json()["error"]["message"]
    for path, extra in (("/v1/completions", {"prompt": "x", "use_beam_search": False, "guided_json": None,
                                             "include_stop_str_in_output": False}),
                        ("/v1/chat/completions", {"messages": msgs, "add_generation_prompt": True,
                                                  "continue_final_message": False, "prompt_logprobs": None})):
        r = httpx.post(server.url + path, json={"model": NAME, "max_tokens": 2, **extra})
        assert r.status_code == 200, (extra, r.text)


def test_stream_that_fails_midway_still_ends_with_done(tokenizer):
    """An engine failure after some tokens: the stream carries the error, then `data: [DONE]` (clients wait for it)."""
    class FailsLater(FakeModel):
        calls = 0

        def forward(self, batch, kv):
            FailsLater.calls += 1
            if FailsLater.calls > 4:
                raise RuntimeError("boom")
            return super().forward(batch, kv)

    eng = LLMEngine(FailsLater(tokenizer.vocab_size), tokenizer, EngineConfig(num_blocks=50, block_size=8))
    ae = AsyncEngine(eng).start()
    with ServerThread(build_app(ae, NAME)) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                          json={"model": NAME, "prompt": "hi", "max_tokens": 20, "ignore_eos": True,
                                "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    ae.shutdown()
    assert any('"choices"' in line for line in lines[:-2]), lines  # tokens came first
    assert "boom" in lines[-2] and '"error"' in lines[-2] and lines[-1] == "data: [DONE]", lines[-3:]


def test_stream_whose_request_fails_with_an_unexpected_error_still_ends_with_done(tokenizer):
    """A prefill provider that fails on a prompt with an error other than InputError (e.g. out of memory) fails that
    request alone: a stream sends the error and then `data: [DONE]` (it was cut off with neither: a broken chunked
    body, httpx.RemoteProtocolError), a non-streamed request is an OpenAI-style 500, and the server keeps serving."""
    import json

    class Failing:
        name = "failing"

        def __call__(self, prompt_ids):
            raise RuntimeError("provider out of memory")

    eng = LLMEngine(FakeModel(tokenizer.vocab_size), tokenizer, EngineConfig(num_blocks=50, block_size=8),
                    prefill=Failing())
    ae = AsyncEngine(eng).start()
    body = {"model": NAME, "prompt": "hi", "max_tokens": 3}
    try:
        with ServerThread(build_app(ae, NAME)) as srv:
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 500 and "provider out of memory" in r.json()["error"]["message"], r.text
            with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
                lines = [line for line in s.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]", lines
            err = json.loads(lines[-2][6:])["error"]
            assert "provider out of memory" in err["message"] and err["type"] == "internal_error", lines
            assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        ae.shutdown()
    assert eng.block_manager.num_used == 0


def test_bodies_no_tokenizer_can_take_are_400(server):
    """Lone surrogates (JSON's \\ud800 escapes) and nesting deeper than the JSON parser goes: 400, not 500."""
    url = server.url + "/v1/completions"
    head = {"content-type": "application/json"}
    for raw in (b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 3}',
                b'{"model": "\\udc00", "prompt": "hi"}',
                b'{"model": "tiny", "prompt": ["ok", "\\udc00"], "max_tokens": 3}'):
        r = httpx.post(url, content=raw, headers=head)
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], (raw, r.text)
    r = httpx.post(server.url + "/v1/chat/completions", headers=head,
                   content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert r.status_code == 400, r.text
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(url, content=deep, headers=head)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text
    assert httpx.get(server.url + "/health").status_code == 200


def test_slow_tokenization_does_not_stall_other_clients(tokenizer):
    """Tokenizing a huge prompt runs off the event loop: /health answers meanwhile."""
    import threading
    import time

    eng = LLMEngine(FakeModel(tokenizer.vocab_size), tokenizer, EngineConfig(num_blocks=50, block_size=8))
    real = eng.tokenizer.encode

    def slow_encode(text, *a, **k):
        if text.startswith("SLOW"):
            time.sleep(2.0)
        return real(text, *a, **k)

    eng.tokenizer.encode = slow_encode
    ae = AsyncEngine(eng).start()
    try:
        with ServerThread(build_app(ae, NAME)) as srv:
            t = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", timeout=30,
                                                           json={"model": NAME, "prompt": "SLOW hi", "max_tokens": 2}))
            t.start()
            time.sleep(0.3)  # the slow request is being tokenized now
            t0 = time.perf_counter()
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
            waited = time.perf_counter() - t0
            t.join()
        assert waited < 1.0, waited
    finally:
        eng.tokenizer.encode = real
        ae.shutdown()


def test_non_streamed_request_aborted_when_client_leaves(tokenizer):
    """A client that gives up on a non-streamed request frees its sequence (the server polls for the disconnect)
    instead of generating to max_tokens; a chat request without max_tokens fits the (small) KV cache."""
    import time

    class Slow(FakeModel):
        def forward(self, batch, kv):
            time.sleep(0.01)
            return super().forward(batch, kv)

    eng = LLMEngine(Slow(tokenizer.vocab_size, max_model_len=4096), tokenizer,
                    EngineConfig(num_blocks=40, block_size=8))  # 312 tokens of cache, far below the context
    ae = AsyncEngine(eng).start()
    with ServerThread(build_app(ae, NAME)) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": ["abc", "de"], "max_tokens": 300,
                                                          "ignore_eos": True, "n": 2}, timeout=0.5)
        deadline = time.time() + 5
        while eng.has_unfinished() and time.time() < deadline:
            time.sleep(0.05)
        assert not eng.has_unfinished() and eng.block_manager.num_used == 0
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] <= 312
    ae.shutdown()


def _ref_logprobs(tokenizer, prompt_ids, out_ids):
    """log_softmax of the fake model's logits before each output token."""
    import torch

    seen, refs = list(prompt_ids), []
    for t in out_ids:
        refs.append(torch.log_softmax(expected_logits(seen, tokenizer.vocab_size).double(), 0))
        seen.append(t)
    return refs


def test_completion_logprobs(server, tokenizer):
    """logprobs=K on /v1/completions: per token its text, log-probability, K alternatives and text offset,
    equal to the model's distribution; streamed chunks carry the same entries."""
    c = client(server)
    prompt = "Good morrow, sweet"
    ids = tokenizer.encode(prompt)
    want, out = ref_text(tokenizer, ids, 10)
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == want and len(lp.tokens) == len(out) == r.usage.completion_tokens
    refs = _ref_logprobs(tokenizer, ids, out)
    for i, (t, ref) in enumerate(zip(out, refs)):
        assert lp.tokens[i] == api_token(tokenizer, t)
        assert lp.token_logprobs[i] == pytest.approx(float(ref[t]), abs=1e-5)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert 1 <= len(top) <= 3 and top[0] == pytest.approx(lp.token_logprobs[i], abs=1e-6)  # greedy
        assert set(round(v, 4) for v in top) <= set(round(v, 4) for v in sorted(ref.tolist(), reverse=True)[:3])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(want)
    chunks = [ch.choices[0] for ch in c.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0,
                                                          logprobs=3, stream=True) if ch.choices]
    streamed = [v for ch in chunks if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert [o for ch in chunks if ch.logprobs for o in ch.logprobs.text_offset] == lp.text_offset
    assert c.completions.create(model=NAME, prompt=prompt, max_tokens=3, temperature=0).choices[0].logprobs is None
    # logprobs=0: each token's own logprob, also in top_logprobs (OpenAI's K + 1 entries at most)
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=1.5, seed=3, logprobs=0)
    lp = r.choices[0].logprobs
    assert [list(d.items()) for d in lp.top_logprobs] == [[(t, v)] for t, v in zip(lp.tokens, lp.token_logprobs)]


def _text_before(tokenizer, out, j):
    """The text of out[:j] up to its last whole character: the longest out[:k], k <= j, whose decode does not end
    in an incomplete one (U+FFFD)."""
    k = j
    while k and tokenizer.decode(out[:k]).endswith("\ufffd"):
        k -= 1
    return tokenizer.decode(out[:k])


@pytest.mark.parametrize("stop", [None, "stop"])
def test_completion_text_offsets_and_partial_characters(server, tokenizer, stop):
    """Each token's text_offset is where its text begins in the returned text (not the length of what had been
    streamed by then), at most the text's length; also behind a stop string's held-back text and for tokens that
    hold part of a character (written 'bytes:\\x..', so that they stay apart in top_logprobs)."""
    c = client(server)
    prompt = "Line 1: thou"  # its greedy output holds bytes of incomplete characters (tokens 5, 9 and 11)
    ids = tokenizer.encode(prompt)
    want, out = ref_text(tokenizer, ids, 12)
    partial = [j for j, t in enumerate(out) if "\ufffd" in tokenizer.decode([t], skip_special_tokens=False)]
    assert partial == [5, 9, 11]
    kw = dict(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    if stop:
        kw["stop"] = stop = want[8:11]  # a string that ends in token 7 or later: held back while it may begin
    r = c.completions.create(**kw)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text == (want if not stop else want[:want.index(stop)])
    assert r.model_dump()["choices"][0]["stop_reason"] == stop  # vLLM's field: the stop string, or None
    assert lp.text_offset == [min(len(text), len(_text_before(tokenizer, out, j))) for j in range(len(lp.tokens))]
    assert len(set(lp.text_offset)) > 3
    for j, t in enumerate(out[:len(lp.tokens)]):
        assert lp.tokens[j] == api_token(tokenizer, t)
        assert lp.tokens[j].startswith("bytes:\\x") == (j in partial)
        assert len(lp.top_logprobs[j]) >= 3  # K alternatives with distinct keys
    chunks = [ch.choices[0] for ch in c.completions.create(**kw, stream=True) if ch.choices]
    assert "".join(ch.text for ch in chunks) == text
    assert chunks[-1].model_dump()["stop_reason"] == stop
    assert [o for ch in chunks if ch.logprobs for o in ch.logprobs.text_offset] == lp.text_offset
    assert [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens] == lp.tokens
    sent = 0
    for ch in chunks:  # a chunk's tokens begin in the text sent so far, its own included
        sent += len(ch.text)
        assert all(o <= sent for o in (ch.logprobs.text_offset if ch.logprobs else []))


def test_models_retrieve_and_null_stream(server):
    c = client(server)
    m = c.models.retrieve(NAME)
    assert m.id == NAME and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(server.url + path, json={"model": NAME, "max_tokens": 2, "stream": None, **body}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        r = httpx.post(server.url + path, json={"model": NAME, "max_tokens": 2, "stream": "yes", **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_chat_logprobs(server, tokenizer):
    c = client(server)
    msgs = [{"role": "user", "content": "Who art thou?"}]
    ids = tokenizer.apply_chat_template(msgs)
    _, out = ref_text(tokenizer, ids, 8)
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                  top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == len(out) == r.usage.completion_tokens
    for e, t, ref in zip(content, out, _ref_logprobs(tokenizer, ids, out)):
        assert e.token == api_token(tokenizer, t) and e.bytes == list(tokenizer.token_bytes(t))
        for top in e.top_logprobs:
            raw = bytes(top.bytes)
            assert top.token == (raw.decode() if "\ufffd" not in raw.decode(errors="replace") else
                                 "bytes:" + "".join(f"\\x{b:02x}" for b in raw))
        assert e.logprob == pytest.approx(float(ref[t]), abs=1e-5)
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                            stream=True))
    streamed = [e.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert streamed == [e.logprob for e in content]
    assert all(not e.top_logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs
               for e in ch.choices[0].logprobs.content)  # logprobs without top_logprobs: the token's own only
    # bad combinations are 400s
    for path, body in (("/v1/chat/completions", {"messages": msgs, "top_logprobs": 2}),
                       ("/v1/chat/completions", {"messages": msgs, "logprobs": True, "top_logprobs": 21}),
                       ("/v1/chat/completions", {"messages": msgs, "logprobs": 3}),
                       ("/v1/completions", {"prompt": "hi", "top_logprobs": 2}),
                       ("/v1/completions", {"prompt": "hi", "logprobs": "3"})):
        resp = httpx.post(server.url + path, json={"model": NAME, "max_tokens": 2, **body})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error", body


def test_n_choices_and_batched_prompts(server, tokenizer):
    """n choices per prompt and a batch of prompts: choice index = prompt * n + j, each choice its own sequence
    (greedy choices equal; seeded ones reproducible and distinct), usage counts each prompt once; streaming
    gives every choice the same text, and a chat stream opens each choice with the role."""
    c = client(server)
    prompts = ["Good morrow, sweet", "My lord,"]
    wants = [ref_text(tokenizer, tokenizer.encode(p), 6) for p in prompts]
    r = c.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in r.choices] == [wants[0][0]] * 2 + [wants[1][0]] * 2
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 2 * sum(len(w[1]) for w in wants)
    streamed: dict[int, str] = {}
    for ch in c.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, n=2, stream=True,
                                   stream_options={"include_usage": True}):
        for choice in ch.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
        if ch.usage is not None:
            assert ch.usage.completion_tokens == r.usage.completion_tokens
    assert streamed == {ch.index: ch.text for ch in r.choices}
    # seeded sampling: choice j uses seed + j, so choices differ and the request repeats exactly
    kw = dict(model=NAME, prompt=prompts[0], max_tokens=12, temperature=1.5, n=3, seed=5)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert len({ch.text for ch in a.choices}) > 1
    one = c.completions.create(**{**kw, "n": 1, "seed": 6})
    assert one.choices[0].text == a.choices[1].text
    # chat: n choices, each streamed from a role chunk
    msgs = [{"role": "user", "content": "Who art thou?"}]
    want, _ = ref_text(tokenizer, tokenizer.apply_chat_template(msgs), 5)
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0, n=2)
    assert [ch.message.content for ch in r.choices] == [want, want] and [ch.index for ch in r.choices] == [0, 1]
    roles, texts = {}, {}
    for ch in c.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0, n=2, stream=True):
        for choice in ch.choices:
            if choice.delta.role:
                roles[choice.index] = choice.delta.role
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert roles == {0: "assistant", 1: "assistant"} and texts == {0: want, 1: want}
    # token-id batches, and prompts that are not a batch
    ids = [tokenizer.encode(p) for p in prompts]
    r = c.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0)
    assert [ch.text for ch in r.choices] == [w[0] for w in wants]
    resp = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": ["a", "b"], "n": 65})
    assert resp.status_code == 400 and "n x prompts" in resp.json()["error"]["message"]
    for bad in ([], [[]], ["ok", 3], [["x"]]):
        resp = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": bad, "max_tokens": 2})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt", bad
    resp = httpx.post(server.url + "/v1/completions",
                      json={"model": NAME, "prompt": ["hi", "hi " * 400], "max_tokens": 2})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert server.engine.num_unfinished == 0  # nothing of the refused batch was started


def test_echo_and_prompt_logprobs(server, tokenizer):
    """echo: the prompt's text before the completion; with logprobs, its tokens' too (the first has none), as
    lm-eval's loglikelihood requests use them; streamed the same; batched with n; not on chat."""
    c = client(server)
    prompt = "Good morrow, sweet"
    ids = tokenizer.encode(prompt)
    want, out = ref_text(tokenizer, ids, 3)
    assert c.completions.create(model=NAME, prompt=prompt, max_tokens=3, temperature=0,
                                echo=True).choices[0].text == prompt + want
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt + want
    assert len(lp.tokens) == len(ids) + len(out) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    seq = ids + out
    for j in range(1, len(seq)):
        ref = _ref_logprobs(tokenizer, seq[:j], [seq[j]])[0]
        assert lp.token_logprobs[j] == pytest.approx(float(ref[seq[j]]), abs=1e-5), j
        assert max(lp.top_logprobs[j].values()) == pytest.approx(float(ref.max()), abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[len(ids)] == len(prompt)  # the completion's tokens start after the echoed prompt
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    chunks = [ch.choices[0] for ch in c.completions.create(model=NAME, prompt=prompt, max_tokens=3, temperature=0,
                                                          echo=True, logprobs=2, stream=True) if ch.choices]
    assert "".join(ch.text for ch in chunks) == prompt + want
    assert [v for ch in chunks if ch.logprobs for v in ch.logprobs.token_logprobs] == lp.token_logprobs
    r = c.completions.create(model=NAME, prompt=[prompt, ids[:3]], max_tokens=2, temperature=0, echo=True, n=2)
    heads = [prompt] * 2 + [tokenizer.decode(ids[:3])] * 2
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert all(ch.text.startswith(h) and len(ch.text) > len(h) for ch, h in zip(r.choices, heads))
    resp = httpx.post(server.url + "/v1/chat/completions",
                      json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "echo": True})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "echo"
    # max_tokens=0 scores the prompt only (streamed the same)
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    ch = r.choices[0]
    assert ch.text == prompt and ch.finish_reason == "length" and r.usage.completion_tokens == 0
    assert ch.logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    chunks = [x.choices[0] for x in c.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True,
                                                         logprobs=1, stream=True) if x.choices]
    assert "".join(x.text for x in chunks) == prompt
    assert [v for x in chunks if x.logprobs for v in x.logprobs.token_logprobs] == lp.token_logprobs[:len(ids)]
    resp = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 0,
                                                            "echo": True})
    assert resp.status_code == 400 and "0 only scores a prompt" in resp.json()["error"]["message"]


def test_chat_with_prefix_caching_shares_the_system_prompt(tokenizer):
    """With --enable-prefix-caching, chats that share a long system prompt give the reference answers (the fake
    model reads every context token back from the cache) and /health counts the cached tokens."""
    model = FakeModel(tokenizer.vocab_size, max_model_len=512)
    eng = LLMEngine(model, tokenizer, EngineConfig(num_blocks=200, block_size=4, max_num_seqs=8,
                                                   enable_prefix_caching=True))
    ae = AsyncEngine(eng).start()
    system = {"role": "system", "content": "Thou art a player in Shakespeare's company; answer in verse, briefly. " * 3}
    try:
        with ServerThread(build_app(ae, NAME)) as srv:
            c = client(srv)
            for q in ("Who art thou?", "What news on the Rialto?", "Where is the king?"):
                msgs = [system, {"role": "user", "content": q}]
                want, _ = ref_text(tokenizer, tokenizer.apply_chat_template(msgs), 6)
                r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0)
                assert r.choices[0].message.content == want
            h = httpx.get(srv.url + "/health").json()
    finally:
        ae.shutdown()
    shared = len(tokenizer.apply_chat_template([system])) // 4 * 4 - 4  # whole blocks, the template's tail aside
    assert h["prefix_tokens_hit"] >= 2 * shared > 0 and 0 < h["prefix_hit_rate"] < 1
    assert h["kv_blocks_used"] == 0 and h["kv_blocks"] == 199


def test_penalties_and_logit_bias_through_the_api(server, tokenizer):
    """logit_bias (string token ids, as the openai client sends them) reaches the sampler: the greedy text is the
    fake model's with the bias added, token by token; the penalties are parsed; out-of-range values are 400s
    naming the parameter."""
    from gpulab.vajra.openai_api import parse_sampling
    from gpulab.vajra.sampling import SamplingParams

    c = client(server)
    prompt = "Good morrow, sweet"
    ids = tokenizer.encode(prompt)
    tok = tokenizer.encode(" lord")[-1]
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logit_bias={str(tok): 100})
    biased = reference_biased(tokenizer, ids, SamplingParams(max_tokens=6, logit_bias={tok: 100.0}))
    assert r.choices[0].text == tokenizer.decode(biased) and biased.count(tok) >= 2
    # the penalties as parsed (their effect on sampling is tested on the engine, test_logits_processors.py: the fake
    # model's greedy pick leads by more than any penalty can change, so it would not show here)
    sp = parse_sampling({"presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.1,
                         "logit_bias": {"7": -2.5}}, 16, tokenizer.vocab_size)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.logit_bias) == (0.5, -1.0, 1.1,
                                                                                                 {7: -2.5})
    from gpulab.vajra.openai_api import APIError

    for bias in ({" 7": 1}, {"1_0": 1}, {"\u0667": 1}, {"-3": 1}, {"5": 1, "05": 2}):  # an Arabic-Indic digit 7
        with pytest.raises(APIError) as e:
            parse_sampling({"logit_bias": bias}, 16, tokenizer.vocab_size)
        assert e.value.param == "logit_bias" and e.value.status == 400
    for bad, param in ((dict(presence_penalty=3), "presence_penalty"), (dict(logit_bias={"x": 1}), "logit_bias"),
                       (dict(logit_bias={"5": 1000}), "logit_bias"), (dict(extra_body={"repetition_penalty": -1}),
                                                                       "repetition_penalty")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=NAME, prompt="hi", max_tokens=2, **bad)
        assert e.value.body["param"] == param, e.value.body


def reference_biased(tokenizer, prompt, sp):
    """Greedy on the fake model with logit_bias, token by token (EOS ends it)."""
    toks, out = list(prompt), []
    for _ in range(sp.max_tokens):
        lg = expected_logits(toks, tokenizer.vocab_size).clone()
        for j, b in (sp.logit_bias or {}).items():
            lg[j] += b
        t = int(lg.argmax())
        toks.append(t)
        out.append(t)
        if t == tokenizer.eos_token_id:
            break
    return out


def test_ctrl_c_stops_serve_as_a_normal_end(tokenizer, monkeypatch):
    """uvicorn handles SIGINT under Python's default handler and ends serve() normally; gpulab's own handler
    (which turns SIGINT into an error) is set aside while it serves and put back after."""
    import signal

    import uvicorn

    from gpulab.vajra import server

    seen = []

    def run(app, **kw):
        seen.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt  # what uvicorn.run lets out of a stop by Ctrl-C

    def gpulab_handler(signum, frame):
        raise AssertionError("not while serving")

    monkeypatch.setattr(uvicorn, "run", run)
    previous = signal.signal(signal.SIGINT, gpulab_handler)
    try:
        eng = LLMEngine(FakeModel(tokenizer.vocab_size, max_model_len=64), tokenizer, EngineConfig(num_blocks=16))
        server.serve(eng, NAME, port=0)
        assert seen == [signal.default_int_handler] and signal.getsignal(signal.SIGINT) is gpulab_handler
    finally:
        signal.signal(signal.SIGINT, previous)
