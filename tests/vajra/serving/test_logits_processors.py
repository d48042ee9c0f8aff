"""Penalties, logit_bias and min_tokens bans against independent references: transformers' repetition-penalty
processor, OpenAI's frequency/presence formula written out per token, and greedy runs of the engine."""
from __future__ import annotations

import random

import pytest
import torch

from gpulab.core.errors import InputError
from gpulab.vajra.engine import EngineConfig, LLMEngine
from gpulab.vajra.logits_processors import LogitsProcessor, adjusts_logits, process_logits
from gpulab.vajra.sampling import SamplingParams
from gpulab.vajra.scheduler import Sequence

from .fake_model import FakeModel, expected_logits

VOCAB = 53


def _seq(i, prompt, outputs, **params):
    s = Sequence(i, str(i), list(prompt), SamplingParams(**params).validate(VOCAB))
    s.token_ids += list(outputs)
    return s


def _rows(seed=0, n=4):
    rng = random.Random(seed)
    return [([rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))],
             [rng.randrange(VOCAB) for _ in range(rng.randint(0, 15))]) for _ in range(n)]


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB) * 3
    seqs = [_seq(i, p, o, repetition_penalty=penalty) for i, (p, o) in enumerate(_rows())]
    got = process_logits(logits, seqs, frozenset())
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for r, s in enumerate(seqs):
        want = hf(torch.tensor([s.token_ids]), logits[r:r + 1].clone())[0]
        assert torch.equal(got[r], want)


def test_frequency_and_presence_follow_openai_formula():
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB)
    pens = [(0.5, 0.0), (0.0, 1.5), (-0.3, 0.7), (2.0, -2.0)]
    seqs = [_seq(i, p, o, frequency_penalty=f, presence_penalty=q)
            for i, ((p, o), (f, q)) in enumerate(zip(_rows(2), pens))]
    got = process_logits(logits, seqs, frozenset())
    for r, (s, (f, q)) in enumerate(zip(seqs, pens)):
        outs = s.token_ids[s.prompt_len:]
        for j in range(VOCAB):  # mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
            c = outs.count(j)
            want = float(logits[r, j]) - c * f - float(c > 0) * q
            assert float(got[r, j]) == pytest.approx(want, abs=1e-5), (r, j)


def test_logit_bias_adds_and_bans_win():
    logits = torch.zeros(3, VOCAB)
    seqs = [_seq(0, [1], [], logit_bias={5: 100.0, 7: -3.5}),
            _seq(1, [1], [], logit_bias={9: 100.0}, min_tokens=2, stop_token_ids=[9]),
            _seq(2, [1], [])]
    got = process_logits(logits, seqs, frozenset({11}))
    assert got[0, 5] == 100 and got[0, 7] == -3.5 and got[0, 11] == 0  # row 0 asked for no min_tokens
    assert got[1, 9] == float("-inf") and got[1, 11] == float("-inf")  # banned until 2 outputs, bias or not
    assert torch.equal(got[2], logits[2])
    assert torch.count_nonzero(logits) == 0  # the input is not modified


def test_nothing_asked_returns_the_same_tensor():
    logits = torch.randn(2, VOCAB)
    seqs = [_seq(0, [1, 2], [3]), _seq(1, [4], [], min_tokens=1, ignore_eos=True)]
    assert not adjusts_logits(seqs[0].params) and adjusts_logits(seqs[1].params)
    assert process_logits(logits, seqs, frozenset({7})) is logits  # min_tokens with ignore_eos and no stop ids


def _greedy_reference(prompt, n, **params):
    """Greedy on the fake model's logits after the penalties/bias, written out per token."""
    p = SamplingParams(**params)
    toks, out = list(prompt), []
    for _ in range(n):
        lg = expected_logits(toks, VOCAB).clone()
        for t, b in (p.logit_bias or {}).items():
            lg[t] += b
        for j in range(VOCAB):
            c = out.count(j)
            if p.repetition_penalty != 1.0 and j in toks:
                lg[j] = lg[j] / p.repetition_penalty if lg[j] > 0 else lg[j] * p.repetition_penalty
            lg[j] -= c * p.frequency_penalty + (c > 0) * p.presence_penalty
        t = int(torch.argmax(lg))
        toks.append(t)
        out.append(t)
    return out


def test_engine_greedy_with_penalties_matches_the_reference():
    """The fake model's greedy output repeats within a few tokens; the penalties change it as the reference says,
    and a request without them in the same batches is untouched."""
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [2, 7, 1]]
    asks = [dict(frequency_penalty=1.5), dict(presence_penalty=2.0, repetition_penalty=1.2),
            dict(logit_bias={4: 3.0, 0: -1.0}, frequency_penalty=0.4), {}]
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=8))
    params = [SamplingParams(max_tokens=20, temperature=0.0, **a) for a in asks]
    outs = eng.generate(prompts, params)
    for p, a, o in zip(prompts, asks, outs):
        assert o.output_token_ids == _greedy_reference(p, 20, **a), a
    assert outs[0].output_token_ids != _greedy_reference(prompts[0], 20)  # the penalty did change something
    assert not eng._adjusting


@pytest.mark.parametrize("params,msg", [
    (dict(presence_penalty=2.5), "presence_penalty must be a number in \\[-2, 2\\]"),
    (dict(frequency_penalty="x"), "frequency_penalty must be a number"),
    (dict(repetition_penalty=0), "repetition_penalty must be a number in \\(0, 100\\]"),
    (dict(logit_bias={VOCAB: 1.0}), "logit_bias has token id 53, outside \\[0, 53\\)"),
    (dict(logit_bias={3: 101}), "logit_bias values must be numbers in \\[-100, 100\\]"),
    (dict(logit_bias=[1, 2]), "logit_bias must map token ids to numbers"),
])
def test_bad_values_are_one_line_errors(params, msg):
    with pytest.raises(InputError, match=msg):
        SamplingParams(**params).validate(VOCAB)


@pytest.mark.parametrize("blocks", [16, 200])
def test_penalty_rows_survive_preemption_growth_and_reuse(blocks):
    """Twelve penalized sequences at a time on buffers of max_num_seqs rows (allocated at once: what the KV sizing
    reserves), a cache small enough to preempt (the counts stay with the sequence, whose outputs are recomputed,
    not resampled; a preempted sequence keeps its row, so the buffers may grow beyond), and a second batch on rows
    the first freed (cleared): each greedy output is still the reference's."""
    rng = random.Random(5)
    eng = LLMEngine(FakeModel(VOCAB), None, EngineConfig(num_blocks=blocks, block_size=4, max_num_batched_tokens=16,
                                                         max_num_seqs=12))
    for batch in range(2):
        prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 9))] for _ in range(12)]
        asks = [dict(repetition_penalty=rng.choice([0.8, 1.25]), frequency_penalty=rng.uniform(-1, 1),
                     presence_penalty=rng.uniform(-1, 1)) for _ in range(12)]
        outs = eng.generate(prompts, [SamplingParams(max_tokens=10, temperature=0.0, **a) for a in asks])
        for p, a, o in zip(prompts, asks, outs):
            assert o.output_token_ids == _greedy_reference(p, 10, **a)
    if blocks == 16:
        assert eng.scheduler.num_preemptions > 0
    else:
        assert eng.logits_processor.counts.shape[0] == 12  # max_num_seqs rows, never grown
    assert not eng.logits_processor._row and not eng._adjusting


def test_a_reused_row_forgets_the_previous_sequences_prompt():
    """A row cleared by forget() and reused must not keep the earlier sequence's prompt tokens as 'seen'."""
    lp = LogitsProcessor(max_rows=1)
    logits = torch.full((1, VOCAB), 2.0)
    a = _seq(0, [5, 6], [], repetition_penalty=2.0)
    lp(logits, [a], frozenset())
    lp.forget(0)
    b = _seq(1, [7], [], repetition_penalty=2.0)
    got = lp(logits, [b], frozenset())
    assert torch.equal(got, process_logits(logits, [b], frozenset()))
    assert float(got[0, 5]) == 2.0 and float(got[0, 7]) == 1.0


def test_counts_catch_up_on_several_tokens_between_calls():
    """A sequence whose counts fall several tokens behind is brought up to date exactly once per token."""
    lp = LogitsProcessor()
    logits = torch.zeros(1, VOCAB)
    s = _seq(0, [1], [], frequency_penalty=1.0)
    lp(logits, [s], frozenset())
    s.token_ids += [3, 4]  # two tokens since the last call
    lp(logits, [s], frozenset())
    s.token_ids += [4]
    got = lp(logits, [s], frozenset())
    assert torch.equal(got, process_logits(logits, [s], frozenset()))
    assert float(got[0, 3]) == -1.0 and float(got[0, 4]) == -2.0
