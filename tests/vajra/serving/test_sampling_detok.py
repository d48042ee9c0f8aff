"""Sampler (greedy, temperature, top-k, top-p, seeds) and incremental detokenization with stop strings."""
from __future__ import annotations

import pytest
import torch

from gpulab.core.errors import InputError
from gpulab.vajra.detokenizer import IncrementalDetokenizer
from gpulab.vajra.engine import EngineConfig, LLMEngine
from gpulab.vajra.sampling import Sampler, SamplingParams, apply_top_k_top_p

from .fake_model import FakeModel, expected_logits, reference_greedy


def test_top_k_top_p_mask_against_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    ks, ps = [3, -1, 1, 10, 0], [1.0, 0.5, 1.0, 0.3, 0.999]
    out = apply_top_k_top_p(logits.clone(), ks, ps)
    for r in range(5):
        order = torch.argsort(logits[r], descending=True).tolist()
        keep = order[: ks[r]] if ks[r] > 0 else order
        probs = torch.softmax(logits[r][keep], 0).tolist()
        kept, mass = [], 0.0
        for t, p in zip(keep, probs):
            if mass >= ps[r] and kept:
                break
            kept.append(t)
            mass += p
        finite = torch.isfinite(out[r]).nonzero().flatten().tolist()
        assert sorted(finite) == sorted(kept)
        assert torch.equal(out[r][kept], logits[r][kept])


def test_sampler_greedy_seed_and_distribution():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    s = Sampler("cpu")
    greedy = [SamplingParams(temperature=0.0)] * 4
    assert torch.equal(s(logits, greedy, [0, 1, 2, 3]), logits.argmax(-1))
    # top_k=1 and a tiny top_p are greedy at any temperature
    p = [SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)] * 2
    assert torch.equal(s(logits, p, [0, 1, 2, 3]), logits.argmax(-1))
    # a seeded row does not depend on its batch neighbours
    seeded = SamplingParams(temperature=1.0, seed=123)
    a = [Sampler("cpu")(logits[:1], [seeded], [7]).item() for _ in range(1)]
    s2 = Sampler("cpu")
    seq_a = [s2(logits[:1], [seeded], [7]).item() for _ in range(20)]
    s3 = Sampler("cpu")
    mixed = torch.stack([logits[1], logits[2], logits[0], logits[3]])
    seq_b = [s3(mixed, [SamplingParams(temperature=1.0)] * 2 + [seeded, SamplingParams(temperature=0.5)],
                [1, 2, 7, 3])[2].item() for _ in range(20)]
    assert seq_a == seq_b and seq_a[0] == a[0]
    assert len(set(seq_a)) > 1  # really random
    # empirical distribution of temperature sampling follows softmax(logits / T) within top-k
    row = torch.tensor([[2.0, 1.0, 0.5, 0.0, -5.0]])
    sp = SamplingParams(temperature=0.8, top_k=4, seed=5)
    s4 = Sampler("cpu")
    counts = torch.zeros(5)
    n = 4000
    for _ in range(n):
        counts[s4(row, [sp], [0]).item()] += 1
    want = torch.softmax(row[0, :4] / 0.8, 0)
    assert counts[4] == 0
    assert torch.allclose(counts[:4] / n, want, atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_tokens=0), dict(stop=[""]), dict(seed="x"), dict(min_tokens=99),
                                 dict(logprobs=-1), dict(logprobs=21), dict(logprobs=True), dict(logprobs=1.5)])
def test_sampling_params_validation(bad):
    with pytest.raises(InputError):
        SamplingParams(**bad).validate(100)


def test_incremental_detok_matches_full_decode(tokenizer):
    text = "Wherefore art thou, Romeo? Ça va — 東京 🙂 done.\nNext line!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("Say:", add_special_tokens=True)
    d = IncrementalDetokenizer(tokenizer, prompt)
    pieces = []
    for t in ids:
        d.add(t)
        pieces.append(d.take(False))
    pieces.append(d.take(True))
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_token_bytes_of_a_byte_level_vocabulary(tokenizer):
    """Each token's raw bytes; the bytes of a text's tokens add up to its UTF-8, also where a token holds part of a
    character (decoded alone it is U+FFFD); the byte-level table agrees with the tokenizers library's."""
    from tokenizers import pre_tokenizers

    from gpulab.vajra.detokenizer import _byte_level_decoder

    assert sorted(_byte_level_decoder()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    text = "Ça va — 東京 🙂 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(tokenizer.token_bytes(t) for t in ids) == text.encode("utf-8")
    partial = [t for t in ids if "\ufffd" in tokenizer.decode([t], skip_special_tokens=False)]
    assert partial and all(tokenizer.token_bytes(t) != "\ufffd".encode() for t in partial)
    whole = next(t for t in ids if "\ufffd" not in tokenizer.decode([t]))
    assert tokenizer.token_bytes(whole) == tokenizer.decode([whole]).encode("utf-8")


def test_token_bytes_of_byte_fallback_pieces():
    """A SentencePiece-style vocabulary: '<0xNN>' pieces are one byte each."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models
    from transformers import PreTrainedTokenizerFast

    from gpulab.vajra.detokenizer import Tokenizer

    vocab = {"<unk>": 0, "▁a": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust))
    ids = [2 + b for b in "€".encode()]
    assert tok.decode(ids) == "€" and "\ufffd" in tok.decode(ids[:1])
    assert [tok.token_bytes(t) for t in ids] == [bytes([b]) for b in "€".encode()]
    assert tok.token_bytes(1) == b" a"


def test_stop_strings_never_leak_in_stream(tokenizer):
    text = "one two three four five six"
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, [0], stop=["ee fo", "zzz"])
    streamed = ""
    for t in ids:
        d.add(t)
        streamed += d.take(False)
        if d.stopped:
            break
    streamed += d.take(True)
    assert d.stopped == "ee fo" and streamed == "one two thr" == d.text


def test_engine_stop_string_with_fake_model(tokenizer):
    vocab = tokenizer.vocab_size
    eng = LLMEngine(FakeModel(vocab, max_model_len=256), tokenizer, EngineConfig(num_blocks=64, block_size=8))
    prompt = tokenizer.encode("To be, or not to be")
    ref = reference_greedy(prompt, 40, vocab)
    full = tokenizer.decode(ref)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop and stop in full
    (o,) = eng.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, stop=[stop], ignore_eos=True))
    assert o.finish_reason == "stop" and o.text == full[: full.index(stop)]
    (o,) = eng.generate(["To be, or not to be"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    assert o.text == full and o.output_token_ids == ref
    assert eng.block_manager.num_used == 0


def test_detokenization_waits_one_step_and_streams_the_same_text(tokenizer):
    """With defer_output (a GPU's setting), a token that does not end its sequence is detokenized during the next
    step (while the GPU runs the model): its output comes one step later, every token's output comes exactly
    once and in order, the pieces add up to the full text, and a sequence with stop strings (found only in the
    text) is never deferred."""
    vocab = tokenizer.vocab_size
    eng = LLMEngine(FakeModel(vocab, max_model_len=256), tokenizer, EngineConfig(num_blocks=64, block_size=8))
    assert eng.defer_output is False  # a CPU model call is synchronous: nothing to hide the work behind
    eng.defer_output = True
    prompt = tokenizer.encode("To be, or not to be")
    ref = reference_greedy(prompt, 6, vocab)
    eng.add_request(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), request_id="a")
    eng.add_request(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop=["\x00never"]),
                    request_id="s")
    per_step = []
    while eng.has_unfinished():
        per_step.append([(o.request_id, o.new_token_ids[0], o.delta_text, o.finished) for o in eng.step()])
    a = [x for step in per_step for x in step if x[0] == "a"]
    s = [x for step in per_step for x in step if x[0] == "s"]
    assert [x[1] for x in a] == ref == [x[1] for x in s]
    assert "".join(x[2] for x in a) == tokenizer.decode(ref) == "".join(x[2] for x in s)
    assert [x[3] for x in a] == [False] * 5 + [True] and a[-1] in per_step[-1]
    # "s" gets each token's output in the step that sampled it; "a" one step later (the last one at once)
    first_a = next(i for i, st in enumerate(per_step) if any(x[0] == "a" for x in st))
    first_s = next(i for i, st in enumerate(per_step) if any(x[0] == "s" for x in st))
    assert first_a == first_s + 1
    # an aborted sequence's deferred output is dropped, and nothing is left waiting
    eng.add_request(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), request_id="b")
    while not eng._deferred:
        eng.step()
    assert eng.abort("b") and not eng.has_unfinished() and eng.block_manager.num_used == 0


def test_cpu_engine_outputs_each_token_in_the_step_that_sampled_it(tokenizer):
    """Without deferral (the CPU), every token's output comes in the step that sampled it."""
    vocab = tokenizer.vocab_size
    eng = LLMEngine(FakeModel(vocab, max_model_len=256), tokenizer, EngineConfig(num_blocks=64, block_size=8))
    prompt = tokenizer.encode("To be, or not to be")
    eng.add_request(prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), request_id="a")
    per_step = []
    while eng.has_unfinished():
        per_step.append([o.new_token_ids[0] for o in eng.step()])
    assert per_step == [[t] for t in reference_greedy(prompt, 5, vocab)]


@pytest.mark.parametrize("defer", [False, True])
def test_logprobs_are_the_models_distribution(tokenizer, defer):
    """logprobs=K: every output token carries its log-probability and the K most likely tokens' under the
    model's own distribution (log_softmax of the logits, before temperature and top-k/top-p, and before
    min_tokens bans EOS), one entry per token, in order, also when outputs are deferred a step; a request
    without logprobs in the same batch gets None."""
    vocab = tokenizer.vocab_size
    prompt = tokenizer.encode("Now is the winter of our discontent")
    eos = reference_greedy(prompt, 1, vocab)[0]  # EOS is the most likely first token: min_tokens must ban it
    eng = LLMEngine(FakeModel(vocab, max_model_len=256, eos=(eos,)), tokenizer,
                    EngineConfig(num_blocks=64, block_size=8))
    eng.defer_output = defer
    eng.add_request(prompt, SamplingParams(max_tokens=7, temperature=0.9, top_k=5, seed=11, logprobs=4,
                                           min_tokens=7), request_id="lp")
    eng.add_request(prompt, SamplingParams(max_tokens=7, temperature=0.0, logprobs=0), request_id="zero")
    eng.add_request(prompt, SamplingParams(max_tokens=7, temperature=0.0), request_id="none")
    got: dict[str, list] = {"lp": [], "zero": [], "none": []}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].append(o)
    assert all(o.logprobs is None for o in got["none"])
    for rid, k in (("lp", 4), ("zero", 0)):
        toks = [t for o in got[rid] for t in o.new_token_ids]
        entries = [e for o in got[rid] for e in o.logprobs]
        assert len(entries) == len(toks) == got[rid][-1].num_output_tokens
        seen = list(prompt)
        for tok, (lp, top) in zip(toks, entries):
            ref = torch.log_softmax(expected_logits(seen, vocab).double(), 0)
            assert lp == pytest.approx(float(ref[tok]), abs=1e-5)
            assert len(top) == k
            assert [v for _, v in top] == pytest.approx(sorted(ref.tolist(), reverse=True)[:k], abs=1e-5)
            assert all(v == pytest.approx(float(ref[i]), abs=1e-5) for i, v in top)
            seen.append(tok)
    assert len(got["lp"]) == 7  # min_tokens kept EOS out of the samples, not out of the logprobs
    assert got["lp"][0].logprobs[0][1][0][0] == eos and len(got["zero"]) == 1  # greedy "zero" stopped at EOS


@pytest.mark.parametrize("budget,blocks", [(256, 64), (5, 64), (7, 9)])
def test_prompt_logprobs_through_chunks_and_preemption(tokenizer, budget, blocks):
    """prompt_logprobs=K: the first output carries one entry per prompt token after the first (its logprob
    given the tokens before it, and the K most likely), the same whether the prompt is prefilled at once, in
    chunks of a 5-token budget, or recomputed after preemptions (9 blocks of 8 for three requests)."""
    vocab = tokenizer.vocab_size
    model = FakeModel(vocab, max_model_len=256)
    eng = LLMEngine(model, tokenizer, EngineConfig(num_blocks=blocks, block_size=8, max_num_batched_tokens=budget))
    prompts = [tokenizer.encode(t) for t in ("Now is the winter of our discontent", "My lord,", "O Romeo, Romeo!")]
    for i, p in enumerate(prompts):
        eng.add_request(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=2,
                                          logprobs=None if i else 1), request_id=str(i))
    first: dict[str, object] = {}
    while eng.has_unfinished():
        for o in eng.step():
            first.setdefault(o.request_id, o)
            assert o.prompt_logprobs is None or o is first[o.request_id]
    if blocks == 9:
        assert eng.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        got = first[str(i)].prompt_logprobs
        assert len(got) == len(p) - 1
        for j, (lp, top) in enumerate(got):
            ref = torch.log_softmax(expected_logits(p[:j + 1], vocab).double(), 0)
            assert lp == pytest.approx(float(ref[p[j + 1]]), abs=1e-5)
            assert [v for _, v in top] == pytest.approx(sorted(ref.tolist(), reverse=True)[:2], abs=1e-5)
    assert eng.block_manager.num_used == 0 and not eng._prompt_lp_seqs  # steps after these skip the search


def test_max_tokens_zero_scores_the_prompt_only(tokenizer):
    """max_tokens=0 with prompt_logprobs (scoring a text): the request ends once its prompt is through the model,
    with its prompt logprobs and no token, beside requests that sample in the same steps; without
    prompt_logprobs max_tokens=0 is refused."""
    vocab = tokenizer.vocab_size
    eng = LLMEngine(FakeModel(vocab, max_model_len=256), tokenizer,
                    EngineConfig(num_blocks=64, block_size=8, max_num_batched_tokens=6))
    p = tokenizer.encode("Now is the winter of our discontent")
    outs = eng.generate([p, p], [SamplingParams(max_tokens=0, prompt_logprobs=1, logprobs=1),
                                 SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)])
    o, other = outs
    assert o.finished and o.finish_reason == "length" and o.num_output_tokens == 0 and o.output_token_ids == []
    assert len(o.prompt_logprobs) == len(p) - 1 and o.logprobs == []
    for j, (lp, _) in enumerate(o.prompt_logprobs):
        ref = torch.log_softmax(expected_logits(p[:j + 1], vocab).double(), 0)
        assert lp == pytest.approx(float(ref[p[j + 1]]), abs=1e-5)
    assert other.output_token_ids == reference_greedy(p, 5, vocab)
    assert eng.block_manager.num_used == 0 and not eng.has_unfinished()
    with pytest.raises(InputError, match="0 only scores a prompt"):
        eng.check_request(p, SamplingParams(max_tokens=0))


def test_prompt_logprobs_need_the_models_rows(tokenizer):
    """A model with last-token logits only (no forward_rows) refuses prompt logprobs with a one-line error."""
    import types

    eng = LLMEngine(FakeModel(tokenizer.vocab_size), tokenizer, EngineConfig(num_blocks=16, block_size=8))
    eng.check_request([1, 2, 3], SamplingParams(max_tokens=2, prompt_logprobs=0))
    eng.model = types.SimpleNamespace(info=eng.model.info, forward=eng.model.forward)
    with pytest.raises(InputError, match="last-token logits only"):
        eng.check_request([1, 2, 3], SamplingParams(max_tokens=2, prompt_logprobs=0))
    with pytest.raises(InputError, match="prompt_logprobs must be"):
        SamplingParams(prompt_logprobs=21).validate(100)
    with pytest.raises(InputError, match=r"logprobs must be an integer in \[0, 12\]"):  # top-k of a 12-token vocabulary
        SamplingParams(logprobs=13).validate(12)
    SamplingParams(logprobs=12).validate(12)



def test_min_p_applies_to_the_tempered_distribution():
    """min_p compares probabilities after the temperature (as vLLM): a token kept or dropped only by that order."""
    logits = torch.tensor([[0.0, -1.5, -20.0]])
    # token 1 against token 0: e^-1.5 = 0.22 untempered; e^-0.75 = 0.47 at T = 2; e^-3 = 0.05 at T = 0.5
    for temperature, min_p, want in ((2.0, 0.3, {0, 1}), (0.5, 0.2, {0})):
        sp = SamplingParams(temperature=temperature, min_p=min_p, seed=0).validate(3)
        sampler = Sampler("cpu")
        assert {sampler(logits, [sp], [0]).item() for _ in range(200)} == want


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_top_p_exactly():
    """Exact ties of the cumulative mass with top_p (probabilities exact in float): the token after them goes."""
    logits = torch.tensor([[0.0, 0.0, -30.0, -30.0], [0.0, 0.0, 0.0, 0.0]])  # 0.5, 0.5 / 4 x 0.25
    out = apply_top_k_top_p(logits.clone(), [-1, -1], [0.5, 0.5])
    assert torch.isfinite(out).sum(1).tolist() == [1, 2]


def test_a_row_at_top_p_one_keeps_its_whole_vocabulary_beside_a_row_with_a_nucleus():
    """A row with top_p = 1.0 in a batch where another row has a nucleus: its float32 cumulative sum over a
    Llama-3-sized vocabulary reaches 1.0 before the last tokens (seed 1: ~170 of them), which were dropped."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 128256, generator=g) * 2
    out = apply_top_k_top_p(logits.clone(), [0, 0], [0.5, 1.0])
    assert torch.isfinite(out[1]).all() and torch.equal(out[1], logits[1])
    assert torch.isinf(out[0]).sum() > 100_000

@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-7])
def test_tiny_temperature_is_greedy(temperature):
    """A temperature too small for float32 (1e-300 is 0.0 there: logits / 0 are inf and NaN) is greedy, as vLLM's
    below 1e-5; before, the NaN probabilities sampled token 0 whatever the logits."""
    torch.manual_seed(2)
    logits = torch.randn(6, 40) * 4
    sp = SamplingParams(temperature=temperature, seed=3).validate(40)
    assert sp.greedy
    assert torch.equal(Sampler("cpu")(logits, [sp] * 6, list(range(6))), logits.argmax(-1))
    assert not SamplingParams(temperature=1e-5).validate(40).greedy


def test_min_p_keeps_tokens_within_a_share_of_the_most_likely():
    """min_p (vLLM's): a token stays when its probability (after the temperature) is at least min_p times the row's
    largest; min_p=1 is greedy at any temperature; 0 changes nothing; out-of-range values are one-line errors."""
    from gpulab.vajra.sampling import apply_min_p

    torch.manual_seed(4)
    logits = torch.randn(3, 30) * 2
    mps = [0.1, 0.0, 0.5]
    out = apply_min_p(logits.clone(), mps)
    for r, mp in enumerate(mps):
        probs = torch.softmax(logits[r].double(), 0)
        keep = (probs >= mp * probs.max()).tolist()
        assert torch.isfinite(out[r]).tolist() == keep
        assert torch.equal(out[r][torch.isfinite(out[r])], logits[r][torch.tensor(keep)])
    s = Sampler("cpu")
    sp = SamplingParams(temperature=3.0, min_p=1.0).validate(30)
    for _ in range(20):
        assert torch.equal(s(logits, [sp] * 3, [0, 1, 2]), logits.argmax(-1))
    for bad in (-0.1, 1.5, float("nan"), "x", True):
        with pytest.raises(InputError, match="min_p must be a number in"):
            SamplingParams(min_p=bad).validate(30)


@pytest.mark.parametrize("min_tokens", [0, 2, 3, 5])
def test_stop_strings_are_not_searched_in_the_min_tokens_text(tokenizer, min_tokens):
    """As vLLM: a stop string in the text of the first min_tokens output tokens does not stop (nor cut) the text;
    the first one that ends in a later token's text does (it may begin in the earlier text)."""
    words = ["one", " thee", " three", " free", " tree", " bee", " see"]
    ids = [t for w in words for t in tokenizer.encode(w, add_special_tokens=False)]
    full = tokenizer.decode(ids)
    boundary = len(tokenizer.decode(ids[:min_tokens]))
    for stop in ("ee", "e t"):
        want = full[:full.find(stop, max(0, boundary - len(stop) + 1))]
        d = IncrementalDetokenizer(tokenizer, [1], stop=[stop], min_tokens=min_tokens)
        streamed, n = "", 0
        for t in ids:
            d.add(t)
            n += 1
            streamed += d.take(False)
            if d.stopped:
                break
        streamed += d.take(True)
        assert d.stopped == stop and streamed == d.text == want, (stop, min_tokens)
        assert n > min_tokens


class _BytesTokenizer:
    """Token i decodes to PIECES[i] (bytes), as a byte-level BPE vocabulary may: a token can end in the first
    byte of a multi-byte character."""
    PIECES = [b"a", b" \xe6", b"\x9d\xb1", b"b"]

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def test_stop_string_in_the_text_flushed_at_the_end_is_cut():
    """The text held back for an incomplete character and added by flush() at the end (the sequence ran out of
    tokens) is searched for stop strings too: before, ``"a \ufffd"`` came back with the stop string " " in it."""
    d = IncrementalDetokenizer(_BytesTokenizer(), [], stop=[" "])
    d.add(0)
    d.add(1)  # " " + half a character: held back
    assert d.text == "a" and d.stopped is None
    d.flush()
    assert d.stopped == " " and d.text == "a" and d.take(True) == "a"
    d = IncrementalDetokenizer(_BytesTokenizer(), [], stop=[" "])
    for t in (0, 1, 2, 3):  # the character completes: the stop string is found as the text grows
        d.add(t)
    assert d.stopped == " " and d.text == "a"


def test_engine_min_tokens_and_stop_strings_and_the_ending_token_id(tokenizer):
    """On the engine: a stop string inside the first min_tokens tokens' text neither stops nor cuts the output
    (the detokenizer is told min_tokens); a stop token id ends the sequence, stays in the token ids, and its text
    is left out, as vLLM's (its include_stop_str_in_output default)."""
    vocab = tokenizer.vocab_size
    prompt = tokenizer.encode("To be, or not to be")
    ref = reference_greedy(prompt, 12, vocab)
    texts = [tokenizer.decode(ref[:k]) for k in range(13)]
    # a stop string that the greedy text reaches early: the last 2 characters of the first 3 tokens' text
    k0 = next(k for k in range(1, 6) if len(texts[k].strip()) >= 2)
    stop = texts[k0][-2:]

    def gen(**kw):
        eng = LLMEngine(FakeModel(vocab, max_model_len=256), tokenizer, EngineConfig(num_blocks=64, block_size=8))
        (o,) = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **kw))
        return o

    o = gen(stop=[stop])
    assert o.finish_reason == "stop" and len(o.output_token_ids) <= k0 and stop not in o.text
    assert o.stop_reason == stop  # what ended it, as vLLM's stop_reason
    o = gen(stop=[stop], min_tokens=12)
    assert o.output_token_ids == ref and o.finish_reason == "length" and o.text == texts[12] and stop in o.text
    assert o.stop_reason is None
    stop_id = ref[5]
    k = ref.index(stop_id)
    o = gen(stop_token_ids=[stop_id])
    assert o.output_token_ids == ref[:k + 1] and o.finish_reason == "stop" and o.stop_reason == stop_id
    assert o.text == tokenizer.decode(ref[:k])
    eng = LLMEngine(FakeModel(vocab, max_model_len=256, eos=(stop_id,)), tokenizer,
                    EngineConfig(num_blocks=64, block_size=8))
    (o,) = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_id]))
    assert o.finish_reason == "stop" and o.stop_reason is None  # EOS (also a stop id): None, as vLLM's


def _metaspace_tokenizer(words):
    from types import SimpleNamespace

    from gpulab.vajra.detokenizer import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{"\u2581" + w: i + 1 for i, w in enumerate(words)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return Tokenizer(SimpleNamespace(backend_tokenizer=tok)), vocab


def test_streamed_text_keeps_every_space_past_the_window_trim():
    words = [f"w{i}" for i in range(40)]
    tok, vocab = _metaspace_tokenizer(words)
    ids = [vocab["\u2581" + w] for w in words]
    assert tok.decode(ids[:1]) == "w0" and tok.decode(ids[:2]) == "w0 w1"
    d = IncrementalDetokenizer(tok, [ids[0]])
    streamed = ""
    for t in ids[1:]:
        d.add(t)
        streamed += d.take(False)
    streamed += d.take(True)
    assert streamed == " " + " ".join(words[1:])
