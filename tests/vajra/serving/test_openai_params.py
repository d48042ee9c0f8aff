"""The OpenAI API's sampling parameters as parsed by gpulab.vajra.openai_api (pure Python: no server): values the
API allows are taken as the API means them, bad ones are 400s naming the parameter, never a 500."""
from __future__ import annotations

import pytest

from gpulab.vajra.openai_api import APIError, choice_params, parse_n, parse_sampling

VOCAB = 100


def _bad(body, param, chat=False):
    with pytest.raises(APIError) as e:
        parse_sampling(body, 16, VOCAB, chat=chat)
    assert e.value.status == 400 and e.value.param == param, (body, e.value.message)
    assert "\n" not in e.value.message
    return e.value


def test_null_max_completion_tokens_falls_back_to_max_tokens():
    """openai clients send both names; a null max_completion_tokens must not hide max_tokens (before: the
    default, e.g. the whole context on chat)."""
    assert parse_sampling({"max_completion_tokens": None, "max_tokens": 5}, 999, VOCAB, chat=True).max_tokens == 5
    assert parse_sampling({"max_completion_tokens": 7, "max_tokens": 5}, 999, VOCAB, chat=True).max_tokens == 7
    assert parse_sampling({"max_tokens": None}, 999, VOCAB, chat=True).max_tokens == 999
    _bad({"max_completion_tokens": None, "max_tokens": -1}, "max_tokens", chat=True)
    e = _bad({"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens", chat=True)
    assert e.message.startswith("max_completion_tokens must be an integer >= 1")


def test_logit_bias_key_too_long_for_int_is_a_400():
    """A 5000-digit key passed the digits check and int() raised ValueError (Python's 4300-digit limit): a 500."""
    e = _bad({"logit_bias": {"1" * 5000: 1}}, "logit_bias")
    assert "outside the vocabulary" in e.message and len(e.message) < 200
    _bad({"logit_bias": {"9" * 12: 1}}, "logit_bias")  # a long-but-convertible id: the vocabulary check


def test_min_p_is_parsed_and_checked():
    """min_p (vLLM's) was silently ignored; it now reaches SamplingParams, and bad values are 400s."""
    assert parse_sampling({"min_p": 0.05}, 16, VOCAB).min_p == 0.05
    assert parse_sampling({"min_p": None}, 16, VOCAB).min_p == 0.0
    for bad in (-0.5, 2, float("nan"), float("inf")):
        _bad({"min_p": bad}, "min_p")
    _bad({"min_p": "0.1"}, "min_p")


def test_non_finite_and_out_of_range_values_are_400s():
    """JSON as Python parses it may carry NaN and Infinity: each is refused naming its parameter (OpenAI's ranges:
    presence/frequency in [-2, 2], logit_bias values in [-100, 100], top_logprobs 0..20)."""
    nan, inf = float("nan"), float("inf")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        for v in (nan, inf, -inf):
            _bad({key: v}, key)
    _bad({"presence_penalty": 2.01}, "presence_penalty")
    _bad({"frequency_penalty": -2.01}, "frequency_penalty")
    _bad({"logit_bias": {"5": nan}}, "logit_bias")
    _bad({"logit_bias": {"5": 100.5}}, "logit_bias")
    _bad({"logit_bias": {str(VOCAB): 1}}, "logit_bias")
    _bad({"logprobs": True, "top_logprobs": 21}, "top_logprobs", chat=True)
    _bad({"top_logprobs": 2}, "top_logprobs", chat=True)  # without logprobs: true
    _bad({"logprobs": 21}, "logprobs")
    _bad({"seed": 1.5}, "seed")
    _bad({"stop": ["ok", 3]}, "stop")
    _bad({"stop_token_ids": [VOCAB]}, "stop_token_ids")
    _bad({"min_tokens": 20, "max_tokens": 10}, "min_tokens")
    sp = parse_sampling({"temperature": 0, "presence_penalty": -2, "frequency_penalty": 2,
                         "logit_bias": {"3": -100, "4": 100}, "stop": "x", "top_logprobs": 20, "logprobs": True},
                        16, VOCAB, chat=True)
    assert sp.greedy and sp.stop == ["x"] and sp.logprobs == 20 and sp.logit_bias == {3: -100, 4: 100}


def test_n_with_a_seed_gives_distinct_reproducible_choices():
    sp = parse_sampling({"seed": 41, "temperature": 1.0}, 16, VOCAB)
    n = parse_n({"n": 3})
    assert [p.seed for p in choice_params(sp, n)] == [41, 42, 43]
    assert [p.seed for p in choice_params(parse_sampling({}, 16, VOCAB), 3)] == [None] * 3
    with pytest.raises(APIError):
        parse_n({"n": 2, "best_of": 3})


def test_stream_options():
    """stream_options.include_usage is read only from an object, needs stream: true (as vLLM), and must be a
    boolean; before, the server read it with `bool(...)` and ignored every misuse (the server must call
    parse_stream_options for these to reach clients)."""
    from gpulab.vajra.openai_api import parse_stream_options

    assert parse_stream_options({"stream": True, "stream_options": {"include_usage": True}}) is True
    assert parse_stream_options({"stream": True, "stream_options": {"include_usage": False}}) is False
    assert parse_stream_options({"stream": True}) is False and parse_stream_options({}) is False
    assert parse_stream_options({"stream": False, "stream_options": {}}) is False
    for body in ({"stream": False, "stream_options": {"include_usage": True}},
                 {"stream_options": {"include_usage": True}},
                 {"stream": True, "stream_options": "yes"},
                 {"stream": True, "stream_options": {"include_usage": "yes"}}):
        with pytest.raises(APIError) as e:
            parse_stream_options(body)
        assert e.value.status == 400 and e.value.param == "stream_options"


def test_huge_json_integers_are_400s():
    """json.loads gives a 400-digit integer literal as an int, which float() cannot convert (OverflowError): every
    float parameter raised it out of validation, a 500."""
    huge = 10 ** 400
    for key in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        _bad({key: huge}, key)
        _bad({key: -huge}, key)
    _bad({"logit_bias": {"3": huge}}, "logit_bias")
    assert parse_sampling({"seed": huge, "top_k": huge}, 16, VOCAB).top_k == huge  # ints that need no float


def test_chat_text_parts_are_joined_by_newlines(tokenizer):
    """A message's content given as text parts reaches the chat template as one string, the parts joined by "\\n"
    (as vLLM's chat_utils): they were glued ("Summarize:" + "It rained." became "Summarize:It rained.")."""
    from types import SimpleNamespace

    from gpulab.vajra.openai_api import chat_prompt

    engine = SimpleNamespace(tokenizer=tokenizer)
    parts = [{"type": "text", "text": "Summarize:"}, {"type": "text", "text": "It rained."}]
    got = chat_prompt(engine, {"messages": [{"role": "user", "content": parts}]})
    assert got == tokenizer.apply_chat_template([{"role": "user", "content": "Summarize:\nIt rained."}])
    one = chat_prompt(engine, {"messages": [{"role": "user", "content": parts[:1]}]})
    assert one == tokenizer.apply_chat_template([{"role": "user", "content": "Summarize:"}])
