"""KV-cache sizing from free GPU memory, on the CPU with the CUDA queries replaced: the profiling step runs what a
step can hold at once (the largest forward with prompt-logprob rows, the sampling of max_num_seqs rows with every
option that allocates), and the logits processor's persistent buffers are kept out of the cache's share."""
from __future__ import annotations

import pytest
import torch

from gpulab.vajra import sampling
from gpulab.vajra.block_manager import num_blocks_for_memory
from gpulab.vajra.engine import EngineConfig, load_engine


def test_profile_step_samples_every_row_with_every_option(tiny_llama, monkeypatch):
    eng = load_engine(tiny_llama, device="cpu", attention_backend="torch",
                      config=EngineConfig(num_blocks=64, block_size=4, max_num_seqs=6, max_num_batched_tokens=40))
    for fn in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, fn, lambda *a, **k: None)
    seen = {}
    real_call, real_rows, real_lp = sampling.Sampler.__call__, eng.model.forward_rows, sampling.logprob_tensors

    def spy_call(self, logits, params, seq_ids):
        seen["sampler"] = (self is eng.sampler, logits.shape, params)
        return real_call(self, logits, params, seq_ids)

    def spy_rows(batch, kv, rows):
        seen["rows"] = (batch.num_tokens, rows.numel())
        return real_rows(batch, kv, rows)

    def spy_lp(logits, tokens, ks):
        seen.setdefault("logprobs", []).append((logits.shape[0], max(ks)))
        return real_lp(logits, tokens, ks)

    monkeypatch.setattr(sampling.Sampler, "__call__", spy_call)
    monkeypatch.setattr(eng.model, "forward_rows", spy_rows)
    monkeypatch.setattr("gpulab.vajra.engine.logprob_tensors", spy_lp)
    eng._profile_peak_memory()
    own, shape, params = seen["sampler"]
    assert not own and tuple(shape) == (6, eng.vocab_size)  # a scratch sampler over max_num_seqs rows
    assert all(not p.greedy and p.top_k > 0 and p.top_p < 1 and p.min_p > 0 for p in params)
    assert seen["rows"] == (40, 40)  # the step's 40 tokens, every one a prompt-logprob row (fewer than 512)
    assert seen["logprobs"] == [(40, sampling.MAX_LOGPROBS), (6, sampling.MAX_LOGPROBS)]


def test_kv_sizing_keeps_the_penalty_buffers_out(tiny_llama, monkeypatch):
    """num_blocks_for_memory takes reserve_bytes off the budget; the engine reserves the logits processor's
    float32 counts and bool mask for max_num_seqs rows of the vocabulary."""
    import types

    eng = load_engine(tiny_llama, device="cpu", attention_backend="torch",
                      config=EngineConfig(num_blocks=64, block_size=4, max_num_seqs=6))
    proc = eng.logits_processor  # what it holds once max_num_seqs sequences ask for penalties: the reserve
    params = sampling.SamplingParams(repetition_penalty=1.2)
    for i in range(6):
        proc._row_of(types.SimpleNamespace(seq_id=i, params=params, prompt_len=1, token_ids=[3]), eng.vocab_size,
                     eng.device)
    held = proc.counts.numel() * proc.counts.element_size() + proc.seen.numel() * proc.seen.element_size()
    assert held == eng.penalty_buffer_bytes() == 6 * eng.vocab_size * 5
    proc._row_of(types.SimpleNamespace(seq_id=6, params=params, prompt_len=1, token_ids=[3]), eng.vocab_size,
                 eng.device)
    assert proc.counts.shape[0] == 12  # beyond max_num_seqs (preempted sequences keep their rows): doubling
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    per = eng.model.kv_bytes_per_block(4, "auto")
    budget = 0.5 * 16 * gib - 0 - 3 * gib  # used by others: (16 - 10) - 6 = 0
    assert num_blocks_for_memory(eng.model, 4, "auto", utilization=0.5, device="cuda") == int(budget // per)
    reserve = 100 * per + 1
    assert num_blocks_for_memory(eng.model, 4, "auto", utilization=0.5, device="cuda",
                                 reserve_bytes=reserve) == int((budget - reserve) // per)
    with pytest.raises(Exception, match="no room for the KV cache"):
        num_blocks_for_memory(eng.model, 4, "auto", utilization=0.5, device="cuda", reserve_bytes=int(budget))


def test_notes_the_cache_allocation_leaves_reach_the_engine(tiny_llama, monkeypatch):
    """Allocating the cache may probe kernels and leave a note on the model (the FP8 cache's V conversion on a
    GPU); the engine reports it beside the notes the model had before."""
    from gpulab.vajra.model import LlamaModel

    real = LlamaModel.allocate_kv_cache

    def allocate(self, *a, **k):
        if "probed" not in self.notes:
            self.notes.append("probed")
        return real(self, *a, **k)

    monkeypatch.setattr(LlamaModel, "allocate_kv_cache", allocate)
    eng = load_engine(tiny_llama, device="cpu", attention_backend="torch",
                      config=EngineConfig(num_blocks=64, block_size=4, max_num_seqs=6))
    assert eng.notes.count("probed") == 1
