"""Prefix caching under adversarial schedules: random arrivals over shared stems, duplicated prompts (n > 1),
prompts shorter than a block or a whole number of blocks, tiny caches (preemption by recomputation), odd token
budgets and prefill chunks, aborts at any point, prompt-logprob requests and cache resets while requests run.

After every engine step the block manager's bookkeeping is checked against the live sequences (reference counts,
free + held == capacity, the LRU and the registry consistent, a block held by two sequences only when registered
with the same content at the same place in both), and the fake model's KV cache is read back: every computed
position of every live sequence, and every registered block, must hold exactly the tokens and positions it stands
for. Every finished request's tokens must be the reference greedy tokens (caching on or off)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from gpulab.vajra.block_manager import NULL_BLOCK
from gpulab.vajra.engine import EngineConfig, LLMEngine
from gpulab.vajra.sampling import SamplingParams
from gpulab.vajra.scheduler import Status

from .fake_model import FakeModel, reference_greedy

VOCAB = 97


def _cache_content(eng):
    """Each slot's (token id, position) in the fake model's first layer (-1: never written)."""
    flat = eng.kv.layers[0].view(-1, 2, 1, 4)  # the fake model's slot view
    return [int(x) for x in flat[:, 0, 0, 0].tolist()], [int(x) for x in flat[:, 0, 0, 1].tolist()]


def check_invariants(eng):
    bm, sch = eng.block_manager, eng.scheduler
    bs = bm.block_size
    live = list(sch.running) + list(sch.waiting)
    assert len({s.seq_id for s in live}) == len(live), "a sequence is queued twice"
    assert all(s.status is Status.RUNNING for s in sch.running)
    assert all(s.status is Status.WAITING for s in sch.waiting)
    assert len(sch.running) <= sch.max_num_seqs
    live_ids = {s.seq_id for s in live}
    assert {i for i, t in bm._tables.items() if t} <= {s.seq_id for s in sch.running}, \
        "a finished or waiting sequence still holds blocks"
    for s in sch.waiting:
        assert s.num_computed == 0 and not bm.table(s.seq_id)
    # reference counts: each block's holders
    holders = Counter(b for s in live for b in bm.table(s.seq_id))
    assert NULL_BLOCK not in holders
    for b in range(1, bm.num_blocks if bm.prefix_caching else 1):  # (without caching nothing counts references)
        assert bm._refs[b] == holders.get(b, 0), f"block {b}: refcount {bm._refs[b]}, held {holders.get(b, 0)} times"
    free, idle, held = set(bm._free), set(bm._idle), set(holders)
    assert len(free) == len(bm._free), "a block is twice in the free list"
    assert not (free & idle) and not (free & held) and not (idle & held)
    assert free | idle | held == set(range(1, bm.num_blocks)), "a block is lost"
    assert bm.num_free + len(held) == bm.capacity_blocks
    assert bm.num_used == len(held)
    # the registry: a bijection between keys and registered blocks; idle blocks are registered ones
    assert idle <= set(bm._key_of)
    assert not (free & set(bm._key_of)), "a registered block is in the free list"
    assert len(bm._cached) == len(bm._key_of)
    for key, b in bm._cached.items():
        assert bm._key_of[b][0] == key
    numbers = {num: b for b, (_, num) in bm._key_of.items()}
    assert len(numbers) == len(bm._key_of), "a registration number is used twice"
    # a shared block: registered, at the same index of every holder, whose tokens up to it are the same
    where: dict[int, list] = {}
    for s in sch.running:
        t = bm.table(s.seq_id)
        assert len(t) >= bm.blocks_for(s.num_computed), "computed tokens without a block"
        assert len(t) <= max(1, bm.blocks_for(s.num_tokens)), "more blocks than tokens"
        for i, b in enumerate(t):
            where.setdefault(b, []).append((s, i))
    for b, hs in where.items():
        if len(hs) > 1:
            assert b in bm._key_of, f"block {b} is held by {len(hs)} sequences but not registered"
            (s0, i0) = hs[0]
            for s, i in hs[1:]:
                assert i == i0 and s.token_ids[:(i + 1) * bs] == s0.token_ids[:(i0 + 1) * bs]
    # the cache content: every computed position of every running sequence
    ids, poss = _cache_content(eng)
    for s in sch.running:
        t = bm.table(s.seq_id)
        for p in range(s.num_computed):
            slot = t[p // bs] * bs + p % bs
            assert (ids[slot], poss[slot]) == (s.token_ids[p], p), \
                f"seq {s.seq_id} position {p}: the cache holds another token"
    # every registered block holds what its key says (at the depth its chain says, when the chain is whole)
    for b, ((before, toks), num) in bm._key_of.items():
        got, pos = ids[b * bs:(b + 1) * bs], poss[b * bs:(b + 1) * bs]
        assert tuple(got) == toks, f"registered block {b} holds {got}, registered as {toks}"
        depth, cur = 0, before
        while cur and cur in numbers:
            depth += 1
            cur = bm._key_of[numbers[cur]][0][0]
        if cur == 0:
            assert pos == list(range(depth * bs, (depth + 1) * bs)), f"registered block {b} at wrong positions"
        else:
            assert pos[0] % bs == 0 and pos == list(range(pos[0], pos[0] + bs))


def _plan(seed, steps):
    """A random engine configuration and a script of arrivals, aborts and cache resets per step (drawn without
    looking at the engine, so that runs with caching on and off follow the same script)."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 3, 4, 4, 8, 16])
    max_model_len = rng.choice([24, 40, 64])
    # from barely one request's worth (constant preemption) to roomy
    min_blocks = -(-max_model_len // bs) + 1
    cfg = dict(max_num_seqs=rng.choice([1, 2, 3, 5, 8]), max_num_batched_tokens=rng.choice([1, 2, 3, 5, 7, 16, 64]),
               block_size=bs, num_blocks=rng.choice([min_blocks, min_blocks + 2, 2 * min_blocks, 4 * min_blocks]),
               max_model_len=max_model_len, max_prefill_chunk=rng.choice([None, None, 1, 3, 6]),
               watermark=rng.choice([0.0, 0.01, 0.1, 0.5]))
    sampled = rng.random() < 0.3  # seeded random sampling (compared with caching off) instead of greedy
    eos = tuple(rng.sample(range(VOCAB), 3)) if rng.random() < 0.3 else ()
    stems = [[rng.randrange(VOCAB) for _ in range(rng.choice([0, bs - 1, bs, 2 * bs, 3 * bs + 1, 20]))]
             for _ in range(3)]
    script = []
    k = 0
    for step in range(steps):
        adds, aborts = [], []
        if step < steps * 0.7 and rng.random() < 0.4:
            stem = rng.choice(stems)
            tail_len = rng.choice([0, 0, 1, 1, 2, bs, bs + 1, 5])
            prompt = (stem + [rng.randrange(VOCAB) for _ in range(tail_len)])[:max_model_len - 1] or [rng.randrange(VOCAB)]
            room = max_model_len - len(prompt)
            max_tokens = rng.randint(1, max(1, min(room, 3 * bs + 2)))
            plp = 1 if rng.random() < 0.1 else None
            for _ in range(rng.choice([1, 1, 1, 2, 3])):  # n > 1: the same prompt several times
                sp = SamplingParams(max_tokens=max_tokens, prompt_logprobs=plp,
                                    **(dict(temperature=1.0, seed=rng.randrange(1000)) if sampled
                                       else dict(temperature=0.0)))
                adds.append((f"r{k}", prompt, sp))
                k += 1
        if k and rng.random() < 0.05:
            aborts.append(f"r{rng.randrange(k)}")
        script.append((adds, aborts, rng.random() < 0.03))
    return cfg, eos, sampled, script


def _drive(seed, *, caching=True, steps=220):
    cfg, eos, sampled, script = _plan(seed, steps)
    eng = LLMEngine(FakeModel(VOCAB, max_model_len=160, eos=eos), None,
                    EngineConfig(**cfg, enable_prefix_caching=caching))
    expect: dict[str, tuple[list[int], int]] = {}
    results: dict[str, list[int]] = {}
    aborted: set[str] = set()

    def step():
        for o in eng.step():
            if o.finished:
                results[o.request_id] = o.output_token_ids
        check_invariants(eng)

    for adds, aborts, reset in script:
        for rid, prompt, sp in adds:
            eng.add_request(prompt, sp, request_id=rid)
            expect[rid] = (prompt, sp.max_tokens)
        for rid in aborts:
            if eng.abort(rid):
                aborted.add(rid)
                check_invariants(eng)
        if caching and reset:
            eng.reset_prefix_cache()
            check_invariants(eng)
        step()
    guard = 0
    while eng.has_unfinished():
        step()
        guard += 1
        assert guard < 3000, "the engine does not finish (deadlock?)"
    assert eng.block_manager.num_used == 0
    assert set(results) | aborted == set(expect)
    if not sampled:
        for rid, (prompt, m) in expect.items():
            if rid not in aborted:
                assert results[rid] == reference_greedy(prompt, m, VOCAB, eos), f"{rid}: wrong tokens (seed {seed})"
    return eng, results, aborted


@pytest.mark.parametrize("seed", range(12))
def test_random_schedules_keep_the_cache_consistent_and_outputs_exact(seed):
    eng, results, aborted = _drive(seed)
    if _plan(seed, 1)[2]:  # seeded sampling: the same tokens as without prefix caching
        _, off, off_aborted = _drive(seed, caching=False)
        keep = set(results) - aborted - off_aborted
        assert keep and {r: results[r] for r in keep} == {r: off[r] for r in keep}


def test_random_schedules_hit_the_cache_and_preempt():
    """The fuzzing above is not vacuous: over its seeds, cached tokens are found and sequences are preempted."""
    hits = preempts = 0
    for seed in range(12):
        eng, _, _ = _drive(seed, steps=60)
        hits += eng.scheduler.prefix_tokens_hit
        preempts += eng.scheduler.num_preemptions
    assert hits > 0 and preempts > 0


def _small_engine(**cfg):
    base = dict(num_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=True)
    base.update(cfg)
    return LLMEngine(FakeModel(VOCAB, max_model_len=160), None, EngineConfig(**base))


def test_aborting_the_writer_of_blocks_shared_in_its_own_step():
    """Two requests with one prompt added together: the second reads the blocks the first writes in the same step.
    Aborting the first right after leaves the blocks to the second, which finishes with the right tokens."""
    eng = _small_engine()
    prompt = [random.Random(5).randrange(VOCAB) for _ in range(14)]
    a = eng.add_request(prompt, SamplingParams(max_tokens=6, temperature=0.0), request_id="a")
    b = eng.add_request(prompt, SamplingParams(max_tokens=6, temperature=0.0), request_id="b")
    eng.step()
    check_invariants(eng)
    shared = eng.block_manager.table(a.seq_id)[:3]
    assert eng.block_manager.table(b.seq_id)[:3] == shared and eng.scheduler.prefix_tokens_hit == 12
    assert eng.abort("a")
    check_invariants(eng)
    assert all(eng.block_manager._refs[x] == 1 for x in shared)
    out = {}
    while eng.has_unfinished():
        out.update({o.request_id: o.output_token_ids for o in eng.step() if o.finished})
        check_invariants(eng)
    assert out == {"b": reference_greedy(prompt, 6, VOCAB)} and eng.block_manager.num_used == 0


def test_reset_while_running_keeps_the_held_blocks_shareable():
    """reset_prefix_cache with requests running forgets only the idle blocks: a later request with the same prefix
    still shares the running one's blocks, and both finish with the right tokens."""
    eng = _small_engine()
    stem = list(range(1, 13))
    eng.generate([stem + [50]], SamplingParams(max_tokens=2, temperature=0.0))  # idle cached blocks
    eng.add_request(stem + [60], SamplingParams(max_tokens=8, temperature=0.0), request_id="a")
    eng.step()
    eng.reset_prefix_cache()
    check_invariants(eng)
    assert eng.block_manager.num_cached >= 3  # a's blocks (matched before the reset) are still registered
    eng.add_request(stem + [70, 71], SamplingParams(max_tokens=5, temperature=0.0), request_id="b")
    out = {}
    while eng.has_unfinished():
        out.update({o.request_id: o.output_token_ids for o in eng.step() if o.finished})
        check_invariants(eng)
    assert eng.scheduler.prefix_tokens_hit == 12  # b's 12 stem tokens (a's hit was counted before the reset)
    assert out == {"a": reference_greedy(stem + [60], 8, VOCAB), "b": reference_greedy(stem + [70, 71], 5, VOCAB)}
