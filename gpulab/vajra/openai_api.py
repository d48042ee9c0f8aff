"""The OpenAI API's request side for the vajra server: parsing and checking a completions or chat body into
prompts (token ids), choices and :class:`~gpulab.vajra.sampling.SamplingParams`; every problem is an
:class:`APIError` with the status, type and parameter the server answers with (pure Python, no web package)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from gpulab.core.errors import InputError
from gpulab.vajra.engine import LLMEngine
from gpulab.vajra.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 128  # most choices (n x prompts in a batch) in one request


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def finite_logprob(x: float) -> float:
    """JSON has no -inf: a token the model gives no probability is -9999.0 (as vLLM)."""
    return x if math.isfinite(x) else -9999.0


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


def _parse_logit_bias(body: dict[str, Any]) -> Optional[dict[int, float]]:
    """``logit_bias``: a JSON object whose keys are token ids as strings of decimal digits (OpenAI's shape)."""
    raw = _get(body, "logit_bias", (dict,), None)
    if not raw:
        return None
    out: dict[int, Any] = {}
    for k, v in raw.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit()):
            raise APIError(400, f"logit_bias keys must be token ids (decimal digits), got {k!r}", param="logit_bias")
        if len(k.lstrip("0")) > 12:  # no vocabulary is that large; int() of 4301 digits raises ValueError (a 500)
            raise APIError(400, f"logit_bias has token id {k[:12]}... ({len(k)} digits), outside the vocabulary",
                           param="logit_bias")
        t = int(k)
        if t in out:
            raise APIError(400, f"logit_bias gives token {t} twice", param="logit_bias")
        out[t] = v  # the values are checked with the other sampling parameters
    return out


def parse_n(body: dict[str, Any], prompts: int = 1) -> int:
    """Choices per prompt (``n``), at most MAX_N choices in all over ``prompts`` prompts; ``best_of`` is
    accepted only where it changes nothing (None or n)."""
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    if n * prompts > MAX_N:
        raise APIError(400, f"n x prompts must be <= {MAX_N} choices, got {n} x {prompts}",
                       param="n" if n > 1 else "prompt")
    if body.get("best_of") not in (None, n):
        raise APIError(400, "best_of other than n is not supported by this server", param="best_of")
    return n


def choice_params(sp: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice: with a seed, choice j samples with seed + j (distinct, reproducible)."""
    if n == 1:
        return [sp]
    return [sp if sp.seed is None else dataclasses.replace(sp, seed=sp.seed + j) for j in range(n)]


# vLLM's extensions to the request body that this server does not implement, with the value that asks for nothing
# (a request that sets one otherwise gets a 400: guided JSON taken as free text, a beam search run as sampling...)
VLLM_EXTENSIONS = {"guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
                   "structured_outputs": None, "prompt_logprobs": None, "use_beam_search": False,
                   "include_stop_str_in_output": False}
VLLM_CHAT_EXTENSIONS = {"continue_final_message": False, "add_generation_prompt": True, "chat_template": None}


def check_unsupported(body: dict[str, Any], chat: bool) -> None:
    """Features of the OpenAI API this server does not have are 400s, not silently ignored: a client that asks
    for tool calls, a JSON response format or an insertion suffix would otherwise take plain text for an answer.
    So are vLLM's extensions (:data:`VLLM_EXTENSIONS`) set to anything but their no-op value."""
    for key, off in (VLLM_EXTENSIONS | (VLLM_CHAT_EXTENSIONS if chat else {})).items():
        if key in body and body[key] is not None and body[key] != off:
            raise APIError(400, f"'{key}' (a vLLM extension) is not supported by this server", param=key)
    if not chat and body.get("suffix") not in (None, ""):
        raise APIError(400, "'suffix' (insertion) is not supported by this server", param="suffix")
    if not chat:
        return
    for key in ("tools", "functions"):
        if body.get(key) not in (None, []):
            raise APIError(400, f"tool calling ('{key}') is not supported by this server", param=key)
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise APIError(400, f"'{key}' is not supported by this server (tool calling)", param=key)
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        kind = rf.get("type") if isinstance(rf, dict) else rf
        raise APIError(400, f"response_format {str(kind)[:40]!r} is not supported by this server (only 'text')",
                       param="response_format")


def parse_echo(body: dict[str, Any], chat: bool) -> bool:
    """``echo`` (completions only): the prompt's text before the completion, and with ``logprobs`` its tokens'."""
    echo = _get(body, "echo", (bool,), False)
    if echo and chat:
        raise APIError(400, "echo is not supported on /v1/chat/completions", param="echo")
    return echo


def parse_stream_options(body: dict[str, Any]) -> bool:
    """``stream_options.include_usage``: whether a stream ends with a chunk that carries the usage. As vLLM, a
    non-empty ``stream_options`` needs ``stream: true``; it must be an object and include_usage a boolean."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise APIError(400, f"'stream_options' must be an object, got {type(opts).__name__}", param="stream_options")
    if opts and body.get("stream") is not True:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    inc = opts.get("include_usage")
    if inc is not None and not isinstance(inc, bool):
        raise APIError(400, f"'stream_options.include_usage' must be true or false, got {inc!r}"[:200],
                       param="stream_options")
    return bool(inc)


def parse_sampling(body: dict[str, Any], default_max_tokens: int, vocab: int, chat: bool = False) -> SamplingParams:
    logprobs = _parse_logprobs(body, chat)
    echo = parse_echo(body, chat)
    # max_completion_tokens (chat's newer name) wins; a null one falls back to max_tokens, not to the default
    max_tokens, max_name = body.get("max_completion_tokens"), "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_name = body.get("max_tokens"), "max_tokens"
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
        min_p=_get(body, "min_p", (int, float), 0.0),
        seed=_get(body, "seed", (int,), None),
        stop=stop,
        stop_token_ids=_get(body, "stop_token_ids", (list,), []),
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
        min_tokens=_get(body, "min_tokens", (int,), 0),
        skip_special_tokens=_get(body, "skip_special_tokens", (bool,), True),
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo else None,
        presence_penalty=_get(body, "presence_penalty", (int, float), 0.0),
        frequency_penalty=_get(body, "frequency_penalty", (int, float), 0.0),
        repetition_penalty=_get(body, "repetition_penalty", (int, float), 1.0),
        logit_bias=_parse_logit_bias(body),
    )
    try:
        sp.validate(vocab)
    except InputError as e:
        msg = str(e)
        param = msg.split(" ", 1)[0]
        if param == "max_tokens":  # say it by the name the request used
            param, msg = max_name, max_name + msg[len("max_tokens"):]
        raise APIError(400, msg, param=param if param in body or param == max_name else None) from None
    return sp


def completion_prompts(engine: LLMEngine, body: dict[str, Any]) -> tuple[list[list[int]], list[Optional[str]]]:
    """The prompts of a completions request: a string, a list of token ids, or a list of either (a batch: one
    choice per prompt, times n); as token ids, and as the strings sent (None for a token-id prompt)."""
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
        return [single], [p if isinstance(p, str) else None]
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        batch = [one(x) for x in p]
        if all(b is not None for b in batch):
            return batch, [x if isinstance(x, str) else None for x in p]
    raise APIError(400, "'prompt' must be a non-empty string, a list of token ids, or a non-empty list of those",
                   param="prompt")


def chat_prompt(engine: LLMEngine, body: dict[str, Any]) -> list[int]:
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
            c = "\n".join(parts)  # as vLLM's chat_utils: the parts are lines of one message
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


def echo_texts(engine: LLMEngine, prompts: list[list[int]], sent: list[Optional[str]]) -> list[str]:
    """What ``echo`` puts before each completion: the prompt string as sent, or the decoded token ids."""
    if engine.tokenizer is None and any(t is None for t in sent):
        raise APIError(400, "echo of token-id prompts needs a tokenizer, which this model has not", param="echo")
    return [t if t is not None else engine.tokenizer.decode(ids, skip_special_tokens=True)
            for ids, t in zip(prompts, sent)]
