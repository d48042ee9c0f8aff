"""serve-bench's chunking check (bench.rechunk_check): exact greedy tokens in fp32; in bf16 the first output
token's logprobs, prefilled in other chunks, against a full-budget pass of the same prompts."""
from __future__ import annotations

import math
import random

import pytest

from gpulab.vajra import bench
from gpulab.vajra.engine import EngineConfig, load_engine
from gpulab.vajra.sampling import SamplingParams


class Rec:
    def __init__(self):
        self.checks = {}

    def check(self, name, ok, detail=None):
        self.checks[name] = (ok, detail)


def _entry(*top):
    """A logprob entry of a greedy token: (its logprob, [(id, logprob)] best first)."""
    return top[0][1], list(top)


def test_compare_first_tokens_agreement_and_near_ties():
    same = bench.compare_first_tokens([(5, _entry((5, -0.1), (7, -2.5)))], [(5, _entry((5, -0.12), (7, -2.4)))])
    assert same["agreement"] == 1 and same["flips"] == [] and same["passed"]
    assert same["max_abs_dlogprob"] == pytest.approx(0.1)
    # a near-tie flipped by a 0.01-0.02 difference: fine
    tie = bench.compare_first_tokens([(5, _entry((5, -0.69), (7, -0.70)))], [(7, _entry((7, -0.69), (5, -0.71)))])
    assert tie["agreement"] == 0 and tie["flips_near_ties"] and tie["passed"]
    assert tie["flips"][0]["near_tie"] and tie["max_abs_dlogprob"] == pytest.approx(0.02)
    # a decided token that flips: the logprobs moved by far more than the tolerance
    far = bench.compare_first_tokens([(5, _entry((5, -0.1), (7, -3.0)))], [(7, _entry((7, -0.1), (5, -3.0)))])
    assert far["max_abs_dlogprob"] == pytest.approx(2.9) and not far["passed"]
    # the other run's token not even in the top-k: no near-tie
    gone = bench.compare_first_tokens([(5, _entry((5, -0.1), (7, -0.15)))], [(8, _entry((8, -0.1), (9, -0.15)))])
    assert not gone["flips_near_ties"] and not gone["passed"] and math.isinf(gone["max_abs_dlogprob"])
    # within a near-tie, but the top-5 logprobs differ by more than the tolerance
    loose = bench.compare_first_tokens([(5, _entry((5, -0.1), (7, -1.0)))], [(5, _entry((5, -0.1), (7, -1.3)))])
    assert loose["agreement"] == 1 and not loose["passed"]
    assert bench.compare_first_tokens([(5, _entry((5, -0.1), (7, -1.0)))], [(5, _entry((5, -0.1), (7, -1.3)))],
                                      tol=0.5)["passed"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rechunk_check_prefills_in_other_chunks(tiny_llama, dtype):
    """Both rules on the CPU (bf16 on the CPU too: the check's logic, not GPU numerics): the rerun's budget splits
    every compared prompt; the figures land in res and the check's detail; the budget is restored."""
    eng = load_engine(tiny_llama, device="cpu", attention_backend="torch", dtype=dtype,
                      config=EngineConfig(num_blocks=96, block_size=4, max_num_batched_tokens=48, max_num_seqs=16))
    rng = random.Random(0)
    prompts = [[rng.randrange(eng.vocab_size) for _ in range(20)] for _ in range(10)]
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    res = {"outputs": [o.output_token_ids for o in eng.generate(prompts, sp)]}
    eng.step_log = []
    rec = Rec()
    bench.rechunk_check(rec, eng, eng.config, prompts, res, 5, dtype)
    assert eng.scheduler.max_num_batched_tokens == 48 and eng.block_manager.num_used == 0
    assert res["rechunk_prompts"] == 8 and res["rechunk_budget"] == 10  # min(48 // 4, 20 // 2): two chunks each
    # the rechunked pass's prefill steps took at most 10 tokens, the full-budget pass 48 (8 x 20 in 4 steps)
    assert max(s["tokens"] for s in eng.step_log) == 48 and any(s["tokens"] == 10 for s in eng.step_log)
    assert res["rechunk_first_token_agreement"] == 1.0 and res["rechunk_main_first_token_agreement"] == 1.0
    [(name, (ok, detail))] = rec.checks.items()
    if dtype == "fp32":
        assert name == "vajra-fp32: greedy tokens independent of chunking" and ok
        assert res["rechunk_token_agreement"] == 1.0 and res["rechunk_token_agreement_tokens"] == 5
        assert res["rechunk_first_token_max_abs_dlogprob"] < 1e-4 and detail["rule"] == "exact (fp32)"
    else:
        assert name == "vajra-bf16: first-token logprobs independent of chunking", detail
        assert ok, detail
        assert res["rechunk_first_token_max_abs_dlogprob"] <= bench.RECHUNK_DLOGPROB_TOL
        assert detail["first_token_agreement"] == 1.0 and "positionwise_agreement_information_only" in detail
        assert "not yet calibrated on a GPU" in detail["rule"] and detail["positionwise_tokens"] == 5


def test_rechunk_check_bf16_generates_few_tokens(tiny_llama, monkeypatch):
    """In bf16 the rechunked pass stops after RECHUNK_INFO_TOKENS tokens and the reference pass after one: a 1000-token
    run is not served again."""
    eng = load_engine(tiny_llama, device="cpu", attention_backend="torch", dtype="bf16",
                      config=EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=32))
    prompts = [[3 + i, 4, 5, 6, 7, 8, 9, 10] for i in range(3)]
    asked = []
    real = bench.first_tokens

    def spy(engine, ps, params):
        asked.append(params.max_tokens)
        return real(engine, ps, params)

    res = {"outputs": [[0] * 1000 for _ in prompts]}
    monkeypatch.setattr(bench, "first_tokens", spy)
    bench.rechunk_check(Rec(), eng, eng.config, prompts, res, 1000, "bf16")
    assert asked == [bench.RECHUNK_INFO_TOKENS, 1]
    assert res["rechunk_token_agreement_tokens"] == bench.RECHUNK_INFO_TOKENS and res["rechunk_budget"] == 4
