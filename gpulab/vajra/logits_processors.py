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

A penalized sequence's counts live on the device in a row of :class:`LogitsProcessor`'s buffers, kept up to
date one scatter per step with the tokens sampled since (not rebuilt from its token list every step), and its
prompt's token set is written once; the row is cleared and reused when the sequence ends.
"""
from __future__ import annotations

from typing import Any, Sequence


def _penalized_params(p: Any) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def adjusts_logits(params: Any) -> bool:
    """Whether a request's parameters change its logits at all (min_tokens, logit_bias or a penalty)."""
    return bool(params.min_tokens or params.logit_bias) or _penalized_params(params)


class LogitsProcessor:
    """Applies each row's min_tokens bans, logit bias and penalties; holds the penalized sequences' counts."""

    def __init__(self, max_rows: int | None = None) -> None:
        # rows of the first allocation: the engine's max_num_seqs (one allocation of a size its KV-cache sizing
        # reserved); beyond it (preempted penalized sequences keep their rows) the buffers grow by doubling
        self.first_rows = max(1, int(max_rows)) if max_rows else 8
        self.counts = None  # float32 [rows, vocab]: output-token counts of penalized sequences, one row each
        self.seen = None  # bool [rows, vocab]: their prompt tokens (repetition_penalty)
        self._row: dict[int, int] = {}  # seq_id -> its row
        self._counted: dict[int, int] = {}  # seq_id -> output tokens already in its counts
        self._free_rows: list[int] = []

    def forget(self, seq_id: int) -> None:
        """A sequence ended: its row is cleared and goes back to be reused."""
        row = self._row.pop(seq_id, None)
        self._counted.pop(seq_id, None)
        if row is not None:
            import torch

            with torch.inference_mode():  # the buffers are inference tensors (made during a step)
                self.counts[row].zero_()
                self.seen[row].zero_()
            self._free_rows.append(row)

    def __call__(self, logits, seqs: Sequence[Any], eos_token_ids: frozenset[int] | set[int]):
        """Row r of ``logits`` belongs to ``seqs[r]`` (a Sequence: ``seq_id``, ``params``, ``token_ids``,
        ``prompt_len``, ``num_output``)."""
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
                banned = [t for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                          if t < vocab]
                ban_r += [r] * len(banned)
                ban_c += banned
            if p.logit_bias:
                for t, b in p.logit_bias.items():
                    bias_r.append(r)
                    bias_c.append(int(t))
                    bias_v.append(float(b))
            if _penalized_params(p):
                pen.append(r)
        if not (ban_r or bias_r or pen):
            return logits
        dev = logits.device
        logits = logits.float().clone()
        if bias_r:
            logits.index_put_((device_tensor(bias_r, torch.long, dev), device_tensor(bias_c, torch.long, dev)),
                              device_tensor(bias_v, torch.float32, dev), accumulate=True)
        if pen:
            idx = device_tensor(pen, torch.long, dev)
            with torch.inference_mode():  # the buffers are inference tensors, whoever calls (the engine's import too)
                logits[idx] = self._penalized(logits.index_select(0, idx), [seqs[r] for r in pen])
        if ban_r:
            logits.index_put_((device_tensor(ban_r, torch.long, dev), device_tensor(ban_c, torch.long, dev)),
                              logits.new_full((), float("-inf")))  # new_full: a fill on the device, no copy
        return logits

    def _penalized(self, sub, seqs: list[Any]):
        """The penalized logits ``sub`` ([len(seqs), vocab]) of penalized sequences."""
        import torch

        from gpulab.vajra.sampling import device_tensor

        dev = sub.device
        rows = [self._row_of(s, sub.shape[1], dev) for s in seqs]
        # the tokens sampled since each sequence's counts were last brought up to date (usually one each)
        new_r: list[int] = []
        new_t: list[int] = []
        for s, row in zip(seqs, rows):
            done = self._counted[s.seq_id]
            fresh = s.token_ids[s.prompt_len + done:]
            if fresh:
                new_r += [row] * len(fresh)
                new_t += fresh
                self._counted[s.seq_id] = done + len(fresh)
        if new_r:
            self.counts.index_put_((device_tensor(new_r, torch.long, dev), device_tensor(new_t, torch.long, dev)),
                                   self.counts.new_ones(()), accumulate=True)
        ridx = device_tensor(rows, torch.long, dev)
        counts = self.counts.index_select(0, ridx)
        params = [s.params for s in seqs]
        rep = [p.repetition_penalty for p in params]
        if any(x != 1.0 for x in rep):
            seen = self.seen.index_select(0, ridx) | (counts > 0)
            rp = device_tensor(rep, torch.float32, dev)[:, None]
            sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
        freq = device_tensor([p.frequency_penalty for p in params], torch.float32, dev)[:, None]
        pres = device_tensor([p.presence_penalty for p in params], torch.float32, dev)[:, None]
        return sub - counts * freq - (counts > 0).float() * pres

    def _row_of(self, seq: Any, vocab: int, dev: Any) -> int:
        """``seq``'s row of the buffers (a new one: cleared, its prompt's tokens marked seen)."""
        import torch

        from gpulab.vajra.sampling import device_tensor

        row = self._row.get(seq.seq_id)
        if row is not None:
            return row
        if self.counts is None:  # the first penalized sequence
            self.counts = torch.zeros(0, vocab, dtype=torch.float32, device=dev)
            self.seen = torch.zeros(0, vocab, dtype=torch.bool, device=dev)
        if not self._free_rows:  # grow by doubling
            n = self.counts.shape[0]
            grown = max(self.first_rows, 2 * n)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grown - n, vocab)])
            self.seen = torch.cat([self.seen, self.seen.new_zeros(grown - n, vocab)])
            self._free_rows = list(range(grown - 1, n - 1, -1))
        row = self._free_rows.pop()
        self._row[seq.seq_id] = row
        self._counted[seq.seq_id] = 0
        if seq.params.repetition_penalty != 1.0 and seq.prompt_len:
            self.seen[row, device_tensor(seq.token_ids[:seq.prompt_len], torch.long, dev)] = True
        return row


def process_logits(logits, seqs: Sequence[Any], eos_token_ids: frozenset[int] | set[int]):
    """One-off processing (no state kept between calls): :class:`LogitsProcessor` on a fresh buffer."""
    return LogitsProcessor()(logits, seqs, eos_token_ids)
