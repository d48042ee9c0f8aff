"""Prefix caching: the block manager's shared, reference-counted blocks, and the engine's outputs with it
(identical to the outputs without it, with less prefill), on the fake model and a tiny Llama."""
from __future__ import annotations

import random

import pytest

from gpulab.core.errors import InputError
from gpulab.vajra.block_manager import BlockManager
from gpulab.vajra.engine import EngineConfig, LLMEngine
from gpulab.vajra.sampling import SamplingParams

from .fake_model import FakeModel, reference_greedy

VOCAB = 97


def test_a_committed_prefix_is_shared_and_counted_once():
    bm = BlockManager(9, 4, prefix_caching=True)
    a = list(range(10))
    bm.allocate(1, 10)
    bm.commit(1, a, 10)  # two full blocks registered; the third (2 tokens) is not full
    assert bm.num_cached == 2
    b = a[:9] + [50, 51]
    assert bm.match_prefix(2, b, len(b) - 1) == 8
    assert bm.table(2) == bm.table(1)[:2]
    assert bm.num_used == 3  # shared blocks count once
    bm.allocate(2, 11)
    assert bm.table(2)[2] != bm.table(1)[2]
    # a sequence that differs in its first block finds nothing, even with the same second block
    assert bm.match_prefix(3, [9, 1, 2, 3] + a[4:8], 8) == 0
    assert bm.free(1) == 3 and bm.free(2) == 3
    assert bm.num_used == 0 and bm.num_cached == 2  # cached blocks nobody holds count as free
    assert bm.match_prefix(4, a, 9) == 8  # an idle cached block is taken back
    assert bm.num_used == 2
    bm.free(4)


def test_match_stops_at_the_limit_and_needs_whole_blocks():
    bm = BlockManager(9, 4, prefix_caching=True)
    a = list(range(12))
    bm.allocate(1, 12)
    bm.commit(1, a, 12)
    assert bm.match_prefix(2, a, 11) == 8  # at least the last token stays to compute
    assert bm.match_prefix(3, a, 7) == 4
    assert bm.match_prefix(5, a[:3], 2) == 0
    with pytest.raises(RuntimeError):
        bm.match_prefix(2, a, 11)  # a sequence matches before it holds any block
    off = BlockManager(9, 4)
    off.allocate(1, 12)
    off.commit(1, a, 12)
    assert off.num_cached == 0 and off.match_prefix(2, a, 11) == 0


def test_eviction_takes_the_longest_idle_and_a_prefix_loses_its_tail_first():
    bm = BlockManager(5, 2, prefix_caching=True)  # 4 usable blocks
    a = [1, 2, 3, 4, 5, 6]
    bm.allocate(1, 6)
    bm.commit(1, a, 6)
    bm.free(1)
    assert bm.num_free == 4 and bm.num_cached == 3
    bm.allocate(2, 2)  # takes the never-used block
    bm.allocate(3, 2)  # evicts the idle block that held a's tail
    assert bm.num_cached == 2
    assert bm.match_prefix(4, a, 5) == 4  # the head (two blocks) is still there
    bm.free(2)
    bm.free(3)
    bm.free(4)
    bm.reset_prefix_cache()
    assert bm.num_cached == 0 and bm.num_free == 4 and bm.match_prefix(5, a, 5) == 0


def test_random_sharing_never_hands_out_wrong_content():
    """Random sequences over a few shared prefixes, with allocation, commits, frees and eviction: every block a
    sequence matches holds exactly its K/V (a simulated cache records what each slot was written with: as a real
    K/V after attention layers, it depends on every token up to its position, so the same tokens after another
    prefix are other content), a held block is never handed to another sequence, and the accounting returns to
    zero."""
    rng = random.Random(0)
    bs, nblocks = 4, 40
    bm = BlockManager(nblocks, bs, prefix_caching=True)
    content: dict[int, list] = {}  # block -> tokens written into its slots
    stems = [[rng.randrange(3) for _ in range(rng.randint(0, 20))] for _ in range(6)]
    live: dict[int, list[int]] = {}
    computed: dict[int, int] = {}
    hits = 0
    for sid in range(600):
        if live and (rng.random() < 0.45 or bm.num_free < 8):
            victim = rng.choice(sorted(live))
            bm.free(victim)
            del live[victim], computed[victim]
            continue
        toks = rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randint(1, 12))]
        n = bm.match_prefix(sid, toks, len(toks) - 1)
        hits += n
        for i, b in enumerate(bm.table(sid)):
            want = [tuple(toks[:p + 1]) for p in range(i * bs, (i + 1) * bs)]
            assert content[b] == want, "a matched block holds the K/V of other tokens or another prefix"
        held = {b for s in live for b in bm.table(s)}
        if not bm.can_allocate(sid, len(toks)):
            bm.free(sid)
            continue
        table = bm.allocate(sid, len(toks))
        for i in range(n // bs, len(table)):  # the blocks this sequence writes: never one somebody else holds
            assert table[i] not in held, "a held block was handed out again"
            content[table[i]] = [None] * bs
        for p in range(n, len(toks)):
            content[table[p // bs]][p % bs] = tuple(toks[:p + 1])
        done = rng.randint(n, len(toks))  # some of its tokens computed so far
        bm.commit(sid, toks, done)
        live[sid], computed[sid] = toks, done
    assert hits > 0
    for sid in list(live):
        bm.free(sid)
    assert bm.num_used == 0 and bm.num_free == nblocks - 1


def test_a_sequence_that_cannot_be_admitted_gives_its_matched_blocks_back():
    from gpulab.vajra.scheduler import Scheduler, Sequence, Status

    bm = BlockManager(6, 4, prefix_caching=True)  # 5 usable blocks
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, watermark=0.0)
    sp = SamplingParams(max_tokens=8)
    a = Sequence(0, "a", list(range(1, 18)), sp)  # 17 tokens: all 5 blocks
    sched.add(a)
    assert sched.schedule().scheduled[0].num_tokens == 17
    a.num_computed = 17
    bm.commit(a.seq_id, a.token_ids, 17)
    a.token_ids.append(40)  # its first output: a decode next
    b = Sequence(1, "b", a.token_ids[:16] + [50] * 3, sp)
    sched.add(b)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [a]  # no block left for b's 3 tokens after its cached 16
    assert b.status is Status.WAITING and b.num_computed == 0 and bm.table(b.seq_id) == []
    assert bm.num_used == 5 and sched.prefix_tokens_queried == 17 and sched.prefix_tokens_hit == 0
    # nothing changed: the next step does not match (and give back) its prefix again
    calls = []
    match = bm.match_prefix
    bm.match_prefix = lambda *a, **k: calls.append(a) or match(*a, **k)
    a.num_computed += 1
    a.token_ids.append(41)
    assert [s.seq for s in sched.schedule().scheduled] == [a] and not calls
    sched.finish(a, "stop")
    out = sched.schedule()
    assert out.scheduled[0].seq is b and out.scheduled[0].start == 16 and out.scheduled[0].num_tokens == 3
    assert sched.prefix_tokens_hit == 16 and len(calls) == 1


def _engine(**cfg):
    return LLMEngine(FakeModel(VOCAB, max_model_len=160), None, EngineConfig(**cfg))


def _shared_prompts(n, seed, stem_len=23):
    rng = random.Random(seed)
    stems = [[rng.randrange(VOCAB) for _ in range(stem_len)] for _ in range(2)]
    return [stems[i % 2][:rng.randint(stem_len - 6, stem_len)] + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))]
            for i in range(n)]


@pytest.mark.parametrize("budget,blocks", [(512, 200), (16, 200), (5, 200), (24, 18)])
def test_engine_outputs_equal_the_reference_with_less_prefill(budget, blocks):
    """The fake model reads every context token back from the cache (tokens and positions), so a shared block with
    other content, or a wrong table after a match, changes its output or fails its checks."""
    prompts = _shared_prompts(12, seed=budget)
    max_tokens = [random.Random(i).randint(1, 12) for i in range(12)]
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    on = _engine(max_num_batched_tokens=budget, num_blocks=blocks, block_size=4, max_num_seqs=4,
                 enable_prefix_caching=True)
    outs = on.generate(prompts, params)
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.output_token_ids == reference_greedy(p, m, VOCAB)
    assert on.block_manager.num_used == 0
    stats = on.prefix_cache_stats()
    assert stats["prefix_tokens_hit"] > 0 and 0 < stats["prefix_hit_rate"] < 1
    off = _engine(max_num_batched_tokens=budget, num_blocks=blocks, block_size=4, max_num_seqs=4)
    assert [o.output_token_ids for o in off.generate(prompts, params)] == [o.output_token_ids for o in outs]
    computed = sum(t for t, _ in on.model.forward_calls)
    assert computed < sum(t for t, _ in off.model.forward_calls)
    assert off.prefix_cache_stats()["prefix_hit_rate"] is None
    if blocks == 18:
        assert on.scheduler.num_preemptions > 0


@pytest.mark.parametrize("n,computed", [(17, 1), (16, 4)])
def test_a_repeated_prompt_computes_only_its_tail(n, computed):
    """17 tokens: four full blocks cached, one token computed. 16: the last token must be computed (its logits give
    the first sample) and a sequence never writes into a block it shares, so the whole last block is."""
    eng = _engine(num_blocks=50, block_size=4, enable_prefix_caching=True)
    prompt = list(range(1, n + 1))
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    first = eng.generate([prompt], sp)[0]
    calls = len(eng.model.forward_calls)
    again = eng.generate([prompt], sp)[0]
    assert again.output_token_ids == first.output_token_ids == reference_greedy(prompt, 6, VOCAB)
    assert eng.model.forward_calls[calls] == (computed, 1)
    # blocks filled by generated tokens were registered too (prompt + 5 outputs have K/V: five full blocks): a
    # conversation that continues the output finds them
    hit = eng.scheduler.prefix_tokens_hit
    longer = prompt + first.output_token_ids[:20 - n] + [5, 6]
    eng.generate([longer], sp)
    assert eng.scheduler.prefix_tokens_hit - hit == 20


def test_requests_admitted_in_one_step_share_the_blocks_it_writes():
    """Three requests with one 18-token prompt (n = 3 choices) added together: the first step prefills the prompt
    once and the two others only its last 2 tokens, reading the 4 blocks the first writes in the same forward (the
    fake model, like every attention backend, stores the whole step's K/V before any sequence reads)."""
    eng = _engine(num_blocks=50, block_size=4, enable_prefix_caching=True)
    prompt = [random.Random(3).randrange(VOCAB) for _ in range(18)]
    outs = eng.generate([prompt] * 3, [SamplingParams(max_tokens=5, temperature=0.0)] * 3)
    assert [o.output_token_ids for o in outs] == [reference_greedy(prompt, 5, VOCAB)] * 3
    assert eng.model.forward_calls[0] == (18 + 2 + 2, 3)
    assert eng.scheduler.prefix_tokens_hit == 2 * 16


def test_prompt_logprobs_requests_take_no_cached_blocks():
    eng = _engine(num_blocks=50, block_size=4, enable_prefix_caching=True)
    prompt = list(range(1, 13))
    eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    hit = eng.scheduler.prefix_tokens_hit
    out = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, prompt_logprobs=1))[0]
    assert len(out.prompt_logprobs) == len(prompt) - 1  # every prompt row went through the model
    assert eng.scheduler.prefix_tokens_hit == hit


def test_abort_releases_shared_blocks():
    eng = _engine(num_blocks=50, block_size=4, enable_prefix_caching=True)
    prompt = list(range(1, 21))
    eng.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))
    seqs = [eng.add_request(prompt + [k], SamplingParams(max_tokens=8, temperature=0.0)) for k in range(3)]
    eng.step()
    assert len({b for s in seqs for b in eng.block_manager.table(s.seq_id)[:5]}) == 5  # the prefix, shared
    for s in seqs:
        eng.abort(s.request_id)
    assert eng.block_manager.num_used == 0


def test_greedy_on_a_tiny_llama_is_the_same_with_prefix_caching(tiny_llama, tokenizer):
    from gpulab.vajra.engine import load_engine

    stem = "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds"
    prompts = [stem + tail for tail in (" that lour'd", " upon our house", " in the deep", ", my lord")]
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = {}
    for on in (False, True):
        eng = load_engine(tiny_llama, device="cpu", attention_backend="torch",
                          config=EngineConfig(max_num_batched_tokens=24, num_blocks=64, block_size=4,
                                              max_num_seqs=2, enable_prefix_caching=on))
        outs[on] = [o.output_token_ids for o in eng.generate(prompts, sp)]
        assert eng.block_manager.num_used == 0
        if on:
            assert eng.scheduler.prefix_tokens_hit >= 4 * (len(tokenizer.encode(stem)) // 4 - 1)
    assert outs[True] == outs[False]


def test_prefix_caching_with_a_prefill_provider_is_refused(tiny_llama):
    from gpulab.vajra.engine import load_engine

    with pytest.raises(InputError, match="--enable-prefix-caching does not work with --prefill"):
        load_engine(tiny_llama, device="cpu", config=EngineConfig(num_blocks=8, enable_prefix_caching=True),
                    prefill="stitchkv=/nonexistent")


@pytest.mark.gpu
def test_gpu_prefix_caching_keeps_greedy_tokens(tiny_llama):
    """On a GPU (fp32: the Triton kernels' IEEE dots; a first prefill chunk that starts after cached blocks,
    decode steps in CUDA graphs over shared blocks): the same greedy tokens with and without prefix caching, and
    cached tokens found. (The torch attention backend would not do: it has no CUDA graphs.)"""
    import torch

    from gpulab.vajra.engine import load_engine

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    stem = "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds"
    prompts = [stem + tail for tail in (" that lour'd", " upon our house", " in the deep", ", my lord")] * 2
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = {}
    for on in (False, True):
        eng = load_engine(tiny_llama, device="cuda", attention_backend="triton", dtype="fp32",
                          config=EngineConfig(max_num_batched_tokens=32, num_blocks=256, block_size=16,
                                              max_num_seqs=4, enable_prefix_caching=on))
        assert eng.graphs is not None, eng.notes  # decode steps replay CUDA graphs
        outs[on] = [o.output_token_ids for o in eng.generate(prompts, sp)]
        assert eng.block_manager.num_used == 0
        if on:
            assert eng.scheduler.prefix_tokens_hit > 0
    assert outs[True] == outs[False]
