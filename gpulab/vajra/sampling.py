"""Sampling parameters and the batched sampler (greedy, temperature, min-p, top-k, top-p, per-request seeds).

:class:`SamplingParams` is what a request asks for; :meth:`SamplingParams.validate` raises a
one-line :class:`~gpulab.core.errors.InputError` for bad values (the server turns it into a 400).
:class:`Sampler` turns last-token logits ``[B, vocab]`` (float32; the engine has applied
:mod:`~gpulab.vajra.logits_processors` first: penalties, logit_bias, min_tokens) into one token per row:
rows with ``temperature == 0`` (or below ``SAMPLING_EPS``) take the argmax; the others are scaled by the
temperature, cut by min-p, to the top-k and to the top-p nucleus and sampled with the exponential-race trick
(``argmax(p / q)``, ``q ~ Exp(1)``), which equals a multinomial draw. A row with a ``seed`` draws its
noise from its own ``torch.Generator`` so that its samples do not depend on the rest of the batch.
:func:`logprob_tensors` / :func:`logprob_entries` give the logprobs a request asked for (``logprobs=K``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from gpulab.core.errors import InputError


MAX_LOGPROBS = 20  # most alternatives a request may ask for per token (as vLLM's default)
# a temperature below this samples greedily (vLLM's _SAMPLING_EPS): dividing float32 logits by a tinier one overflows
# (or divides by zero: 1e-300 is 0.0 in float32) into inf/NaN probabilities and an arbitrary token
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0  # vLLM's: drop tokens less likely than min_p x the most likely one (0: off)
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: Optional[int] = None  # None: none; k >= 0: each sampled token's logprob and the k most likely
    prompt_logprobs: Optional[int] = None  # the same for every prompt token after the first (echo)
    # what they do to the logits: see gpulab.vajra.logits_processors
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None  # token id -> added to its logit

    @property
    def greedy(self) -> bool:
        """Argmax sampling: temperature 0, or one below SAMPLING_EPS (as vLLM; logits / T would overflow float32)."""
        return self.temperature < SAMPLING_EPS

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        def bad(msg: str) -> None:
            raise InputError(msg)

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            bad("max_tokens must be an integer >= 1 (0 only scores a prompt: with echo and logprobs), got 0")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            bad(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if not _is_number(self.temperature) or not (0.0 <= float(self.temperature) <= 100.0):
            bad(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if not _is_number(self.top_p) or not (0.0 < float(self.top_p) <= 1.0):
            bad(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        self.top_p = float(self.top_p)
        if not _is_number(self.min_p) or not (0.0 <= float(self.min_p) <= 1.0):
            bad(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        self.min_p = float(self.min_p)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad(f"top_k must be -1 (off), 0 (off) or an integer >= 1, got {self.top_k!r}")
        top = MAX_LOGPROBS if vocab_size is None else min(MAX_LOGPROBS, vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= top):
                bad(f"{name} must be an integer in [0, {top}], got {k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= float(v) <= 2.0:
                bad(f"{name} must be a number in [-2, 2], got {v!r}")
            setattr(self, name, float(v))
        if not _is_number(self.repetition_penalty) or not 0.0 < float(self.repetition_penalty) <= 100.0:
            bad(f"repetition_penalty must be a number in (0, 100] (1: off), got {self.repetition_penalty!r}")
        self.repetition_penalty = float(self.repetition_penalty)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad(f"logit_bias must map token ids to numbers, got {type(self.logit_bias).__name__}")
            for t, b in self.logit_bias.items():
                if not isinstance(t, int) or isinstance(t, bool):
                    bad(f"logit_bias keys must be integer token ids, got {t!r}")
                if t < 0 or (vocab_size is not None and t >= vocab_size):
                    bad(f"logit_bias has token id {t}, outside " + (f"[0, {vocab_size})" if vocab_size else ">= 0"))
                if not _is_number(b) or not -100.0 <= float(b) <= 100.0:
                    bad(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop must be a non-empty string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 and (vocab_size is None or t < vocab_size)
            for t in self.stop_token_ids
        ):
            bad(f"stop_token_ids must be token ids in [0, {vocab_size}), got {self.stop_token_ids!r}")
        return self


def device_tensor(values: list, dtype: Any, device: Any):
    """A small host list as a tensor on ``device`` without waiting for the device: on a GPU through pinned
    memory, copied non_blocking (``torch.tensor(list, device="cuda")`` is a synchronous copy, which waits for
    all the queued GPU work, e.g. the decode step the engine overlaps with detokenization)."""
    import torch

    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _is_number(x: Any) -> bool:
    """An int or float that is not NaN and converts to float (a JSON integer of 400 digits raises OverflowError
    in float(): a 500 where the range check wants a 400)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return float(x) == float(x)
    except OverflowError:
        return False


class Sampler:
    """Batched sampling on the logits' device; per-request generators for seeded rows."""

    def __init__(self, device: Any):
        import torch

        self.device = torch.device(device)
        self._generators: dict[int, Any] = {}  # seq_id -> torch.Generator

    def forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq_id: int, seed: int):
        import torch

        g = self._generators.get(seq_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
            self._generators[seq_id] = g
        return g

    def __call__(self, logits, params: list[SamplingParams], seq_ids: list[int]):
        """Tokens (int64 [B]) for logits float32 [B, V]."""
        import torch

        b = logits.shape[0]
        if b != len(params):
            raise ValueError(f"{b} logit rows for {len(params)} sampling params")
        logits = logits.float()
        out = torch.argmax(logits, dim=-1)
        rand_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rand_rows:
            return out
        idx = device_tensor(rand_rows, torch.long, logits.device)
        sub = logits.index_select(0, idx)
        temps = device_tensor([params[i].temperature for i in rand_rows], torch.float32, logits.device)
        sub = sub / temps[:, None]
        min_ps = [params[i].min_p for i in rand_rows]
        if any(m > 0.0 for m in min_ps):  # as vLLM: on the tempered distribution, before top-k and top-p
            sub = apply_min_p(sub, min_ps)
        sub = apply_top_k_top_p(
            sub,
            [params[i].top_k for i in rand_rows],
            [params[i].top_p for i in rand_rows],
        )
        probs = torch.softmax(sub, dim=-1)
        noise = torch.empty_like(probs)
        if any(params[i].seed is None for i in rand_rows):
            noise.exponential_()  # the seeded rows are drawn again below from their own generators
        for j, i in enumerate(rand_rows):
            if params[i].seed is not None:
                g = self._generator(seq_ids[i], params[i].seed)
                noise[j].exponential_(generator=g)
        picked = torch.argmax(probs / noise, dim=-1)
        out[idx] = picked
        return out


def apply_min_p(logits, min_p: list[float]):
    """Mask logits whose probability is below ``min_p`` times their row's largest with -inf (the most likely token
    always stays). Compared in log space, where the softmax's normalizer cancels: p_i < min_p * p_max exactly
    when logit_i - logit_max < log(min_p) (min_p = 0: log 0 = -inf masks nothing), so no softmax over the
    vocabulary is needed."""
    import torch

    log_mp = torch.log(device_tensor(min_p, torch.float32, logits.device))[:, None]
    return logits.masked_fill(logits - logits.max(dim=-1, keepdim=True).values < log_mp, float("-inf"))


def apply_top_k_top_p(logits, top_k: list[int], top_p: list[float]):
    """Mask logits outside each row's top-k and top-p nucleus with -inf (the most likely token always stays)."""
    import torch

    need_k = any(k > 0 for k in top_k)
    need_p = any(p < 1.0 for p in top_p)
    if not need_k and not need_p:
        return logits
    vocab = logits.shape[1]
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if need_k:
        ks = device_tensor([min(k if k > 0 else vocab, vocab) for k in top_k], torch.long, logits.device)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        mask |= ranks >= ks[:, None]
    if need_p:
        ps = device_tensor(top_p, torch.float32, logits.device)
        probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        # drop a token when the mass before it already reaches top_p (rows at 1.0 keep all: float32 sums over a
        # large vocabulary can reach 1.0 before the last tokens)
        mask |= ((cum - probs) >= ps[:, None]) & (ps[:, None] < 1.0)
    mask[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def logprob_tensors(logits, tokens, ks: list[Optional[int]]):
    """The logprobs that rows with ``ks[r]`` not None asked for, still on the device (no sync): the model's
    distribution, ``log_softmax`` of ``logits`` in float32 before temperature, top-k and top-p (as vLLM's
    default), at the sampled ``tokens`` and the ``max(ks)`` most likely ids. None when no row asked."""
    import torch

    rows = [r for r, k in enumerate(ks) if k is not None]
    if not rows:
        return None
    if len(rows) < len(ks):
        idx = device_tensor(rows, torch.long, logits.device)
        logits, tokens = logits.index_select(0, idx), tokens.index_select(0, idx)
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens.long()[:, None])[:, 0]
    kmax = max(ks[r] for r in rows)
    top = lp.topk(kmax, dim=-1) if kmax else None
    return rows, chosen, top


def logprob_entries(pending, ks: list[Optional[int]]) -> list[Optional[tuple[float, list[tuple[int, float]]]]]:
    """Per row: ``(logprob of the sampled token, [(id, logprob)] of its k most likely, best first)`` or None
    (the row asked for none), from :func:`logprob_tensors` (this syncs with the device)."""
    out: list = [None] * len(ks)
    if pending is None:
        return out
    rows, chosen, top = pending
    chosen = chosen.tolist()
    vals, ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
    for j, r in enumerate(rows):
        k = ks[r]
        out[r] = (chosen[j], list(zip(ids[j][:k], vals[j][:k])) if k else [])
    return out
