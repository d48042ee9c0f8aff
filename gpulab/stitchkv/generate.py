"""Greedy decoding from a model's own prefill or from a stitched cache, with prefill/decode timing.

Disaggregated hand-over: the large model prefills the prompt and emits the first token (as a
prefill node does: that is the TTFT), the stitches turn its states into the small model's cache,
and the small model decodes every later token from that cache (TPOT). On a GPU the prefill runs
on one CUDA stream and the decode on another, ordered by an event (the hand-over point).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gpulab.stitchkv.models import cache_kwarg, output_cache
from gpulab.stitchkv.stitch import cache_tensors, kv_bytes, stitched_cache


@dataclass
class Generation:
    tokens: Any  # [B, n_new]
    prefill_ms: float = 0.0  # prompt -> first token + cache ready (TTFT of the batch)
    decode_ms: list[float] = field(default_factory=list)  # per later token (TPOT samples)
    kv_bytes: int = 0  # cache handed to the decoder (whole batch)
    handover: Any = None  # greedy_stitched(keep_handover=True): (first-token logits, [(K, V)] per small layer)


def eos_ids(tokenizer: Any, *models: Any) -> set[int]:
    """The token ids that end a generation: the tokenizer's EOS and the models' generation-config EOS ids
    (e.g. Llama-3 instruct's ``<|eot_id|>``)."""
    from gpulab.stitchkv.models import base_model

    out: set[int] = set()
    cands = [getattr(tokenizer, "eos_token_id", None)]
    for m in models:
        gc = getattr(base_model(m), "generation_config", None)
        cands.append(getattr(gc, "eos_token_id", None))
    for c in cands:
        for i in (c if isinstance(c, (list, tuple, set)) else [c]):
            if i is not None:
                out.add(int(i))
    return out


def until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """``ids`` up to (not including) the first EOS: what a generation that stops at EOS returns."""
    for j, t in enumerate(ids):
        if t in eos:
            return list(ids[:j])
    return list(ids)


def decode_texts(tokenizer: Any, rows: list[list[int]], eos: set[int]) -> list[str]:
    """The text of each generated row, cut at its first EOS (the decode loops run a fixed number of steps
    for timing; what follows an EOS is not part of the answer and must not be scored)."""
    return [tokenizer.decode(until_eos(r, eos), skip_special_tokens=True) for r in rows]


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def decode_loop(model: Any, cache: Any, first: Any, n_new: int, stream: Any = None) -> tuple[list[Any], list[float]]:
    """Feed ``first`` [B] and keep decoding greedily; returns the n_new tokens and per-step ms. It does not
    stop at EOS (every row runs n_new steps: a fixed amount of decode work to time); text for scoring is cut
    at the first EOS by :func:`decode_texts`."""
    import torch

    kw = cache_kwarg(model)
    toks, times = [first], []
    cur = first
    for _ in range(n_new - 1):
        t0 = time.perf_counter()
        if stream is not None:  # the argmax too: it reads logits written on ``stream``
            with torch.cuda.stream(stream):
                out = model(input_ids=cur[:, None], use_cache=True, logits_to_keep=1, **{kw: cache})
                cur = out.logits[:, -1].argmax(-1)
        else:
            out = model(input_ids=cur[:, None], use_cache=True, logits_to_keep=1, **{kw: cache})
            cur = out.logits[:, -1].argmax(-1)
        cache = output_cache(out)
        _sync(cur.device)
        times.append((time.perf_counter() - t0) * 1e3)
        toks.append(cur)
    return toks, times


def greedy(model: Any, prompt: Any, n_new: int) -> Generation:
    """The model alone: prefill (with cache) then cached greedy decode."""
    import torch

    with torch.no_grad():
        _sync(prompt.device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].argmax(-1)
        _sync(prompt.device)
        prefill = (time.perf_counter() - t0) * 1e3
        cache = output_cache(out)
        nbytes = kv_bytes(cache_tensors(cache))
        toks, times = decode_loop(model, cache, first, n_new)
    return Generation(torch.stack(toks, 1), prefill, times, nbytes)


def greedy_stitched(large: Any, small: Any, bank: Any, prompt: Any, n_new: int,
                    keep_handover: bool = False) -> Generation:
    """Large prefill + first token, stitched hand-over, small decode. ``keep_handover``: also return what was
    handed over (the decode grows the cache with new tensors; the handed-over ones stay as they were), so that
    an evaluation can score the same cache without a second large prefill."""
    import torch

    on_gpu = prompt.device.type == "cuda"
    prefill_stream = torch.cuda.Stream() if on_gpu else None
    decode_stream = torch.cuda.Stream() if on_gpu else None
    with torch.no_grad():
        _sync(prompt.device)
        t0 = time.perf_counter()
        if on_gpu:
            prefill_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(prefill_stream):
                logits, cache = stitched_cache(large, small, bank, prompt)
                first = logits.argmax(-1)
            handed = torch.cuda.Event()
            handed.record(prefill_stream)
            decode_stream.wait_event(handed)
            # allocated on the prefill stream, read (and freed) on the decode stream: keep the caching
            # allocator from reusing their memory before the decode stream is done with them
            for t in (first, *(x for kv in cache_tensors(cache) for x in kv)):
                t.record_stream(decode_stream)
        else:
            logits, cache = stitched_cache(large, small, bank, prompt)
            first = logits.argmax(-1)
        _sync(prompt.device)
        prefill = (time.perf_counter() - t0) * 1e3
        handed_kv = cache_tensors(cache)
        nbytes = kv_bytes(handed_kv)
        toks, times = decode_loop(small, cache, first, n_new, stream=decode_stream)
        if on_gpu:
            torch.cuda.current_stream().wait_stream(decode_stream)
    return Generation(torch.stack(toks, 1), prefill, times, nbytes, (logits, handed_kv) if keep_handover else None)
