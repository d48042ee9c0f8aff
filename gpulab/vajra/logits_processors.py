"""What a request's sampling parameters do to its logits before sampling: min_tokens' bans, ``logit_bias`` and
the repetition, frequency and presence penalties (OpenAI's and vLLM's definitions).

For a row with output-token counts ``c`` (the tokens this sequence generated so far):

- ``repetition_penalty`` r (1: off; as transformers' ``RepetitionPenaltyLogitsProcessor`` and vLLM): every token
  seen in the prompt or the output has its logit divided by r when positive, multiplied by r otherwise;
- ``frequency_penalty`` f and ``presence_penalty`` p (0: off; OpenAI's formula):
  ``logit[j] -= c[j] * f + (c[j] > 0) * p``;
- ``logit_bias`` ``{token: b}``: ``logit[token] += b``;
- min_tokens: while a sequence has fewer outputs, EOS (unless ``ignore_eos``) and its ``stop_token_ids`` are
  banned (-inf), after everything else, so that no bias lifts a ban.

They change what is sampled (greedy too), not the logprobs reported, which are the model's own distribution
(as vLLM's default). Only rows that ask for something are touched; the logits come back as they were (the same
tensor) when no row does, else as a modified copy (the model's buffers stay as they are).
"""
from __future__ import annotations

from typing import Any, Sequence


def adjusts_logits(params: Any) -> bool:
    """Whether a request's parameters change its logits at all (min_tokens, logit_bias or a penalty)."""
    return bool(params.min_tokens or params.logit_bias or params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0)


def process_logits(logits, seqs: Sequence[Any], eos_token_ids: frozenset[int] | set[int]):
    """Apply each row's min_tokens bans, logit bias and penalties; row r belongs to ``seqs[r]`` (a Sequence:
    ``params``, ``token_ids``, ``prompt_len``, ``num_output``)."""
    import torch

    from gpulab.vajra.sampling import device_tensor

    vocab = logits.shape[1]
    ban_r: list[int] = []
    ban_c: list[int] = []
    bias_r: list[int] = []
    bias_c: list[int] = []
    bias_v: list[float] = []
    pen: list[int] = []
    for r, seq in enumerate(seqs):
        p = seq.params
        if seq.num_output < p.min_tokens:
            banned = [t for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids)) if t < vocab]
            ban_r += [r] * len(banned)
            ban_c += banned
        if p.logit_bias:
            for t, b in p.logit_bias.items():
                bias_r.append(r)
                bias_c.append(int(t))
                bias_v.append(float(b))
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            pen.append(r)
    if not (ban_r or bias_r or pen):
        return logits
    dev = logits.device
    logits = logits.float().clone()
    if bias_r:
        logits.index_put_((device_tensor(bias_r, torch.long, dev), device_tensor(bias_c, torch.long, dev)),
                          device_tensor(bias_v, torch.float32, dev), accumulate=True)
    if pen:
        logits[device_tensor(pen, torch.long, dev)] = _penalized(logits, pen, seqs, vocab)
    if ban_r:
        logits.index_put_((device_tensor(ban_r, torch.long, dev), device_tensor(ban_c, torch.long, dev)),
                          logits.new_full((), float("-inf")))  # new_full: a fill on the device, no copy
    return logits


def _penalized(logits, rows: list[int], seqs: Sequence[Any], vocab: int):
    """The penalized logits of ``rows`` ([len(rows), vocab]): output-token counts built on the device from the
    sequences' token lists (one scatter), then the three penalties."""
    import torch

    from gpulab.vajra.sampling import device_tensor

    dev = logits.device
    out_r: list[int] = []
    out_t: list[int] = []
    seen_r: list[int] = []
    seen_t: list[int] = []
    for j, r in enumerate(rows):
        seq = seqs[r]
        outs = seq.token_ids[seq.prompt_len:]
        out_r += [j] * len(outs)
        out_t += outs
        if seq.params.repetition_penalty != 1.0:
            seen_r += [j] * seq.prompt_len
            seen_t += seq.token_ids[:seq.prompt_len]
    sub = logits.index_select(0, device_tensor(rows, torch.long, dev))
    counts = torch.zeros_like(sub)
    if out_r:
        counts.index_put_((device_tensor(out_r, torch.long, dev), device_tensor(out_t, torch.long, dev)),
                          counts.new_ones(()).expand(len(out_r)), accumulate=True)
    params = [seqs[r].params for r in rows]
    rep = [p.repetition_penalty for p in params]
    if any(x != 1.0 for x in rep):
        seen = counts > 0
        if seen_r:
            seen[device_tensor(seen_r, torch.long, dev), device_tensor(seen_t, torch.long, dev)] = True
        rp = device_tensor(rep, torch.float32, dev)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
    freq = device_tensor([p.frequency_penalty for p in params], torch.float32, dev)[:, None]
    pres = device_tensor([p.presence_penalty for p in params], torch.float32, dev)[:, None]
    return sub - counts * freq - (counts > 0).float() * pres
