"""A deterministic model that implements VajraModelProtocol and really uses the paged KV cache.

Every token writes (token id, position, 1) into its cache slot of each layer; the logits of a
sequence's last token are computed from what the block table *reads back* for positions
0 .. context_len-1, plus a check that the positions match. A wrong slot mapping, block table,
context length or a stale block therefore changes the output, and `expected_next` gives the
right answer computed from the token list alone.
"""
from __future__ import annotations

import torch

from gpulab.vajra.interface import ForwardBatch, KVCache, ModelInfo

MOD = 1_000_003


def expected_logits(tokens: list[int], vocab: int) -> torch.Tensor:
    h = 0
    for p, t in enumerate(tokens):
        h = (h * 31 + t * (p + 7)) % MOD
    centre = h % vocab
    v = torch.arange(vocab, dtype=torch.float32)
    d = torch.minimum((v - centre).abs(), vocab - (v - centre).abs())
    return -0.7 * d  # peaked at `centre`, a spread for sampling


def expected_next(tokens: list[int], vocab: int) -> int:
    return int(torch.argmax(expected_logits(tokens, vocab)))


class FakeModel:
    def __init__(self, vocab_size: int = 97, max_model_len: int = 256, num_layers: int = 2, eos=()):
        self.info = ModelInfo(num_layers=num_layers, num_kv_heads=1, head_dim=4, vocab_size=vocab_size,
                              max_model_len=max_model_len, dtype=torch.float32, eos_token_ids=tuple(eos),
                              name="fake")
        self.device = torch.device("cpu")
        self.forward_calls: list[tuple[int, int]] = []  # (num_tokens, num_seqs)

    def kv_bytes_per_block(self, block_size: int, dtype="auto") -> int:
        return self.info.num_layers * 2 * block_size * self.info.num_kv_heads * self.info.head_dim * 4

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype="auto") -> KVCache:
        layers = [torch.full((num_blocks, 2, block_size, 1, 4), -1.0) for _ in range(self.info.num_layers)]
        return KVCache(layers, block_size, num_blocks, torch.float32)

    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        bs = kv.block_size
        self.forward_calls.append((batch.num_tokens, batch.num_seqs))
        assert batch.input_ids.dtype == torch.int64 and batch.slot_mapping.dtype == torch.int64
        assert batch.query_lens.dtype == torch.int32 and batch.block_tables.dtype == torch.int32
        assert int(batch.query_lens.sum()) == batch.num_tokens
        for layer in kv.layers:
            flat = layer.view(-1, 2, 1, 4)  # the slot view: [num_blocks * block_size, 2, 1, 4]
            flat[batch.slot_mapping, 0, 0, 0] = batch.input_ids.float()
            flat[batch.slot_mapping, 0, 0, 1] = batch.positions.float()
            flat[batch.slot_mapping, 1, 0, 0] = 1.0
        out = []
        self.last_context: list[list[int]] = []  # each sequence's tokens as read back from the cache
        t0 = 0
        for i in range(batch.num_seqs):
            q, c = int(batch.query_lens[i]), int(batch.context_lens[i])
            assert batch.positions[t0 + q - 1] == c - 1, "positions do not end at context_len - 1"
            table = batch.block_tables[i]
            toks = []
            for layer in kv.layers:  # every layer must see the same tokens
                slots = [int(table[p // bs]) * bs + p % bs for p in range(c)]
                flat = layer.view(-1, 2, 1, 4)[slots]
                assert torch.equal(flat[:, 0, 0, 1], torch.arange(c, dtype=torch.float32)), "stale/wrong KV slot"
                toks_l = flat[:, 0, 0, 0].long().tolist()
                assert not toks or toks == toks_l
                toks = toks_l
            out.append(expected_logits(toks, self.info.vocab_size))
            self.last_context.append(toks)
            t0 += q
        return torch.stack(out)

    def forward_rows(self, batch: ForwardBatch, kv: KVCache, rows: torch.Tensor):
        """forward(), and for each flattened token in ``rows`` the logits after the tokens up to it (read back from
        the cache like forward's); logits() of those 'states' is the identity."""
        last = self.forward(batch, kv)
        seq_of = torch.repeat_interleave(torch.arange(batch.num_seqs), batch.query_lens.long())
        states = [expected_logits(self.last_context[int(seq_of[r])][:int(batch.positions[r]) + 1],
                                  self.info.vocab_size) for r in rows.tolist()]
        return last, torch.stack(states)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h


def reference_greedy(prompt: list[int], n: int, vocab: int, eos=()) -> list[int]:
    toks = list(prompt)
    out = []
    for _ in range(n):
        t = expected_next(toks, vocab)
        toks.append(t)
        out.append(t)
        if t in eos:
            break
    return out
