"""Block manager and scheduler properties on a deterministic fake model that reads the paged cache."""
from __future__ import annotations

import random

import pytest

from gpulab.core.errors import InputError
from gpulab.vajra.block_manager import BlockManager
from gpulab.vajra.engine import EngineConfig, LLMEngine
from gpulab.vajra.sampling import SamplingParams

from .fake_model import FakeModel, reference_greedy

VOCAB = 97


def make_prompts(n, seed=0, lo=1, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run(prompts, max_tokens, **cfg):
    model = FakeModel(VOCAB, max_model_len=128)
    eng = LLMEngine(model, None, EngineConfig(**cfg))
    eng.step_log = []
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    outs = eng.generate(prompts, params)
    return eng, outs


def test_block_manager_accounting():
    bm = BlockManager(9, 4)
    assert bm.capacity_blocks == 8 and bm.num_free == 8
    t = bm.allocate(1, 5)
    assert len(t) == 2 and 0 not in t
    assert bm.slots(1, 3, 6) == [t[0] * 4 + 3, t[1] * 4, t[1] * 4 + 1]
    bm.allocate(1, 8)
    assert len(bm.table(1)) == 2
    assert not bm.can_allocate(2, 7 * 4)
    assert bm.can_allocate(2, 6 * 4)
    bm.allocate(2, 24)
    with pytest.raises(RuntimeError):
        bm.allocate(3, 1)
    assert bm.free(1) == 2 and bm.free(2) == 6 and bm.num_used == 0
    with pytest.raises(InputError):
        BlockManager(1, 4)


def test_block_table_array_matches_the_tables():
    """The table array the batch builder reads equals every sequence's table list, NULL_BLOCK-padded, through
    random growth, frees (rows reused) and sequences that never got a block."""
    import numpy as np

    rng = random.Random(1)
    bm = BlockManager(200, 4)
    live: set[int] = set()
    for step in range(400):
        sid = rng.randrange(40)
        if sid in live and rng.random() < 0.3:
            bm.free(sid)
            live.discard(sid)
        else:
            want = len(bm.table(sid)) * 4 + rng.randrange(0, 30)
            if bm.can_allocate(sid, want):
                bm.allocate(sid, want)
                live.add(sid)
        ids = rng.sample(range(45), rng.randrange(1, 12))  # some never allocated
        arr = bm.table_array(ids)
        width = max(1, max(len(bm.table(i)) for i in ids))
        want_arr = np.zeros((len(ids), width), dtype=np.int32)
        for k, i in enumerate(ids):
            want_arr[k, :len(bm.table(i))] = bm.table(i)
        assert arr.dtype == np.int32 and np.array_equal(arr, want_arr), step
    for sid in list(live):
        bm.free(sid)
    assert bm.num_used == 0 and not bm._array.any()


@pytest.mark.parametrize("budget,blocks", [(512, 200), (7, 200), (3, 200), (16, 15), (5, 14)])
def test_greedy_matches_reference_any_chunking_and_preemption(budget, blocks):
    prompts = make_prompts(12, seed=budget)
    max_tokens = [random.Random(i).randint(1, 12) for i in range(12)]
    eng, outs = run(prompts, max_tokens, max_num_batched_tokens=budget, num_blocks=blocks, block_size=4,
                    max_num_seqs=6)
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.output_token_ids == reference_greedy(p, m, VOCAB)
        assert o.finish_reason == "length"
    assert eng.block_manager.num_used == 0
    assert not eng.scheduler.running and not eng.scheduler.waiting
    for s in eng.step_log:
        assert s["tokens"] <= budget and s["seqs"] <= 6
    if blocks <= 15:
        assert eng.scheduler.num_preemptions > 0, "the small cache should force preemption"


def test_outputs_identical_with_and_without_preemption():
    prompts = make_prompts(10, seed=3, lo=10, hi=30)
    mt = [20] * 10
    _, a = run(prompts, mt, num_blocks=400, block_size=4, max_num_batched_tokens=64)
    eng, b = run(prompts, mt, num_blocks=14, block_size=4, max_num_batched_tokens=64)
    assert eng.scheduler.num_preemptions > 0
    assert [o.output_token_ids for o in a] == [o.output_token_ids for o in b]


def test_decodes_first_and_chunked_prefill():
    model = FakeModel(VOCAB)
    eng = LLMEngine(model, None, EngineConfig(max_num_batched_tokens=8, num_blocks=100, block_size=4))
    seen = []
    orig = eng.scheduler.schedule

    def spy():
        out = orig()
        seen.append([(s.seq.request_id, s.num_tokens, s.sample) for s in out.scheduled])
        return out

    eng.scheduler.schedule = spy
    sp = SamplingParams(max_tokens=30, temperature=0.0)
    a = eng.add_request([1, 2, 3], sp, request_id="a")
    eng.step()  # prefill of the first
    b = eng.add_request(list(range(40)), sp, request_id="b")  # 40 tokens in chunks of 7 beside the decode
    while eng.has_unfinished():
        eng.step()
    assert seen[0] == [("a", 3, True)]
    assert seen[1:6] == [[("a", 1, True), ("b", 7, False)]] * 5
    assert seen[6] == [("a", 1, True), ("b", 5, True)]
    assert seen[7] == [("a", 1, True), ("b", 1, True)]
    assert a.output_token_ids == reference_greedy([1, 2, 3], 30, VOCAB)
    assert b.output_token_ids == reference_greedy(list(range(40)), 30, VOCAB)
    assert eng.block_manager.num_used == 0


def test_fcfs_no_starvation_under_pressure():
    """A stream of short requests never overtakes a long one; everybody finishes."""
    model = FakeModel(VOCAB, max_model_len=128)
    eng = LLMEngine(model, None, EngineConfig(max_num_batched_tokens=16, num_blocks=20, block_size=4,
                                              max_num_seqs=4))
    long = eng.add_request(list(range(50)), SamplingParams(max_tokens=20, temperature=0.0))
    shorts = []
    steps = 0
    while eng.has_unfinished():
        if steps < 60 and steps % 2 == 0:
            shorts.append(eng.add_request([steps % VOCAB, 5], SamplingParams(max_tokens=6, temperature=0.0)))
        eng.step()
        steps += 1
        assert steps < 2000
    assert long.finished and all(s.finished for s in shorts)
    order = [s.first_scheduled_time for s in [long, *shorts]]
    assert order == sorted(order), "admission must be first come, first served"
    assert eng.block_manager.num_used == 0


def test_abort_frees_blocks():
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=50, block_size=4))
    a = eng.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=50, temperature=0.0), request_id="a")
    eng.add_request([7, 8], SamplingParams(max_tokens=3, temperature=0.0), request_id="b")
    eng.step()
    eng.step()
    assert eng.block_manager.num_used > 0
    assert eng.abort("a") and a.finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert eng.block_manager.num_used == 0
    assert not eng.abort("a")


def test_request_validation():
    eng = LLMEngine(FakeModel(VOCAB, max_model_len=64), None, EngineConfig(num_blocks=8, block_size=4))
    with pytest.raises(InputError, match="maximum context length is 64"):
        eng.add_request(list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(InputError, match="KV-cache blocks"):
        eng.add_request(list(range(30)), SamplingParams(max_tokens=10))
    with pytest.raises(InputError, match="outside the vocabulary"):
        eng.add_request([1, VOCAB], SamplingParams(max_tokens=1))
    with pytest.raises(InputError, match="empty"):
        eng.add_request([], SamplingParams(max_tokens=1))
    with pytest.raises(InputError, match="no tokenizer"):
        eng.add_request("text", SamplingParams(max_tokens=1))
    with pytest.raises(InputError, match="max-num-seqs"):
        EngineConfig(max_num_seqs=0).validate()
    assert eng.block_manager.num_used == 0 and not eng.has_unfinished()


def test_eos_and_stop_token_ids():
    prompt = [3, 1, 4, 1, 5]
    ref = reference_greedy(prompt, 10, VOCAB)
    stop_at = ref[4]
    eng = LLMEngine(FakeModel(VOCAB, eos=(stop_at,)), None, EngineConfig(num_blocks=50, block_size=4))
    (o,) = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0))
    k = ref.index(stop_at)
    assert o.output_token_ids == ref[:k + 1] and o.finish_reason == "stop"
    (o,) = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert o.output_token_ids == ref and o.finish_reason == "length"
    (o,) = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                  stop_token_ids=[ref[2]]))
    assert o.output_token_ids == ref[:ref.index(ref[2]) + 1] and o.finish_reason == "stop"


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    """Before min_tokens outputs, EOS and stop_token_ids cannot be sampled (their logits are masked, as in vLLM):
    greedy then takes the best other token; after that they stop the sequence as usual."""
    import torch

    from .fake_model import expected_logits

    prompt = [3, 1, 4, 1, 5]
    ref = reference_greedy(prompt, 10, VOCAB)
    eos, stop_id = ref[1], ref[0]

    def masked_greedy(min_tokens):
        toks, out = list(prompt), []
        while len(out) < 10:
            logits = expected_logits(toks, VOCAB)
            if len(out) < min_tokens:
                logits[[eos, stop_id]] = float("-inf")
            t = int(torch.argmax(logits))
            toks.append(t)
            out.append(t)
            if t in (eos, stop_id):
                break
        return out

    eng = LLMEngine(FakeModel(VOCAB, eos=(eos,)), None, EngineConfig(num_blocks=50, block_size=4))
    for min_tokens in (0, 3, 10):
        (o,) = eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, min_tokens=min_tokens,
                                                      stop_token_ids=[stop_id]))
        want = masked_greedy(min_tokens)
        assert o.output_token_ids == want, min_tokens
        assert not {eos, stop_id} & set(want[:min_tokens])
    assert eng.block_manager.num_used == 0
