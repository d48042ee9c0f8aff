"""Alignment, stitched cache shapes, RoPE handling (identity stitches are exact), least squares."""
from __future__ import annotations

import pytest
import torch

from gpulab.core.errors import InputError
from gpulab.stitchkv.generate import greedy, greedy_stitched
from gpulab.stitchkv.models import cache_kwarg, shape_of, tiny_llama
from gpulab.stitchkv.reference import greedy_no_cache, own_cache
from gpulab.stitchkv.stitch import (
    ALIGNMENTS, alignment, build_cache, cache_tensors, large_features, least_squares_init, make_bank,
    stitched_cache,
)
from tests.stitchkv.conftest import SMALL


def test_alignment_values():
    assert alignment("uniform-nearest", 28, 16)[0] == 0 and alignment("uniform-nearest", 28, 16)[-1] == 27
    a = alignment("uniform-nearest", 28, 16)
    assert a == sorted(a) and len(a) == 16
    assert alignment("uniform-nearest", 5, 5) == [0, 1, 2, 3, 4]
    assert alignment("uniform-nearest", 6, 3) == [1, 3, 5]
    assert alignment("last-aligned", 28, 16) == list(range(12, 28))
    assert alignment("last-aligned", 2, 3) == [0, 0, 1]
    assert alignment("first-aligned", 3, 4) == [0, 1, 2, 2]
    assert alignment("0,2", 3, 2) == [0, 2]
    for bad in ("0,5", "0", "nearest"):
        with pytest.raises(InputError):
            alignment(bad, 3, 2)


@pytest.mark.parametrize("mode", ["hidden", "kv", "residual"])
@pytest.mark.parametrize("kind", [*ALIGNMENTS, "2,0"])
def test_stitched_cache_shapes(models, mode, kind):
    large, small = models
    ls, ss = shape_of(large), shape_of(small)
    assert (ls["kv_heads"], ls["head_dim"]) != (ss["kv_heads"], ss["head_dim"])  # a real mismatch
    bank = make_bank(ls, ss, alignment(kind, ls["layers"], ss["layers"]), mode)
    prompt = torch.randint(0, 300, (3, 11))
    with torch.no_grad():
        logits, cache = stitched_cache(large, small, bank, prompt)
        want = own_cache(small, prompt)
    got = cache_tensors(cache)
    assert logits.shape == (3, ls["vocab"])
    assert len(got) == ss["layers"]
    for (k, v), (tk, tv) in zip(got, want):
        assert k.shape == tk.shape == (3, ss["kv_heads"], 11, ss["head_dim"])
        assert v.shape == tv.shape
    # the small model decodes from the stitched cache
    out = greedy_stitched(large, small, bank, prompt, 4)
    assert out.tokens.shape == (3, 4)


def _twin(small, vocab, rope_theta=500.0):
    """A separate model with the small model's weights (RoPE base ``rope_theta``: inv_freq is not in the state dict)."""
    other = tiny_llama(SMALL, vocab, 256, seed=9, rope_theta=rope_theta).eval()
    other.load_state_dict(small.state_dict())
    return other


@pytest.mark.parametrize("mode", ["hidden", "kv"])
def test_rope_is_the_small_models(models, tokenizer, mode):
    """Same weights, different RoPE base: layer 0 sees identical inputs, so the identity stitch must give the
    small model's exact layer-0 cache, while copying the other model's (post-RoPE) keys would not."""
    _, small = models
    other = _twin(small, len(tokenizer), rope_theta=123456.0)
    sh = shape_of(small)
    bank = make_bank(sh, sh, [0, 1], mode).identity_()
    prompt = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        _, cache = stitched_cache(other, small, bank, prompt)
        (k, v), want, naive = cache_tensors(cache)[0], own_cache(small, prompt)[0], own_cache(other, prompt)[0]
    assert torch.equal(k, want[0]) and torch.equal(v, want[1])
    assert not torch.allclose(naive[0], want[0], atol=1e-3)  # keys rotated with another base differ
    assert torch.equal(naive[1], want[1])  # values carry no RoPE


@pytest.mark.parametrize("mode", ["hidden", "kv"])
def test_identity_stitch_reproduces_small_exactly(models, tokenizer, mode):
    """Identical models + identity stitches: the stitched cache, logits and greedy tokens are the small model's."""
    _, small = models
    large = _twin(small, len(tokenizer))
    sh = shape_of(small)
    bank = make_bank(sh, sh, alignment("uniform-nearest", sh["layers"], sh["layers"]), mode).identity_()
    prompt = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        _, cache = stitched_cache(large, small, bank, prompt)
        got, want = cache_tensors(cache), own_cache(small, prompt)
        for (k, v), (tk, tv) in zip(got, want):
            assert torch.equal(k, tk) and torch.equal(v, tv)
        # decoding from the stitched cache reproduces the small model's logits and tokens exactly
        nxt = torch.randint(0, 300, (2, 3))
        lg = small(input_ids=nxt, use_cache=True, **{cache_kwarg(small): build_cache(got)}).logits
        ref = small(input_ids=torch.cat([prompt, nxt], 1), use_cache=False).logits[:, -3:]
        assert torch.allclose(lg, ref, atol=1e-5, rtol=1e-5)
    s = greedy_stitched(large, small, bank, prompt, 6).tokens
    own = greedy(small, prompt, 6).tokens
    assert torch.equal(s, own)
    assert torch.equal(own, greedy_no_cache(small, prompt, 6))


def test_zero_residual_stitch_is_the_small_models_own_cache(models):
    """Residual stitches start at zero: a *different* large model, and the stitched cache is still exactly the
    small model's own (so stage 2 can only add what the large model's states carry beyond it); nonzero maps
    change it."""
    large, small = models
    ls, ss = shape_of(large), shape_of(small)
    bank = make_bank(ls, ss, alignment("uniform-nearest", ls["layers"], ss["layers"]), "residual")
    assert all(float(lin.weight.detach().abs().max()) == 0 for lin in bank.linears())
    prompt = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        _, cache = stitched_cache(large, small, bank, prompt)
        for (k, v), (tk, tv) in zip(cache_tensors(cache), own_cache(small, prompt)):
            assert torch.allclose(k, tk, atol=1e-6, rtol=1e-5) and torch.allclose(v, tv, atol=1e-6, rtol=1e-5)
        toks = greedy_stitched(large, small, bank, prompt, 6).tokens  # token 1: the large model's
        assert torch.equal(toks, greedy_no_cache(small, prompt, 6, first_token=toks[:, 0]))
        bank.maps[0].weight.normal_()
        _, moved = stitched_cache(large, small, bank, prompt)
        assert not torch.allclose(cache_tensors(moved)[0][0], own_cache(small, prompt)[0][0], atol=1e-3)
    with pytest.raises(InputError, match="does not apply to --stitch-input residual"):
        least_squares_init(bank, large, small, [prompt])


def test_greedy_matches_no_cache_reference(models):
    large, small = models
    prompt = torch.randint(0, 300, (2, 9))
    for m in (large, small):
        assert torch.equal(greedy(m, prompt, 5).tokens, greedy_no_cache(m, prompt, 5))
    bank = make_bank(shape_of(large), shape_of(small), alignment("uniform-nearest", 3, 2), "kv")
    g = greedy_stitched(large, small, bank, prompt, 5)
    # reference: decode the same tokens without the incremental loop (parallel teacher forcing on the cache)
    with torch.no_grad():
        logits0, cache = stitched_cache(large, small, bank, prompt)
        assert torch.equal(g.tokens[:, 0], logits0.argmax(-1))
        lg = small(input_ids=g.tokens[:, :-1], use_cache=True, **{cache_kwarg(small): cache}).logits
    assert torch.equal(lg.argmax(-1), g.tokens[:, 1:])


@pytest.mark.parametrize("mode", ["hidden", "kv"])
def test_least_squares_recovers_identity(models, tokenizer, mode):
    _, small = models
    large = _twin(small, len(tokenizer))
    sh = shape_of(small)
    bank = make_bank(sh, sh, [0, 1], mode)
    prompts = [torch.randint(0, 300, (4, 16)) for _ in range(3)]
    r2 = least_squares_init(bank, large, small, prompts, ridge=1e-6)
    assert min(r2.values()) > 0.999
    with torch.no_grad():
        _, cache = stitched_cache(large, small, bank, prompts[0])
        for (k, v), (tk, tv) in zip(cache_tensors(cache), own_cache(small, prompts[0])):
            assert torch.allclose(k, tk, atol=1e-3) and torch.allclose(v, tv, atol=1e-3)


def test_bank_rejects_bad_config(models):
    large, small = models
    with pytest.raises(InputError, match="stitch-input"):
        make_bank(shape_of(large), shape_of(small), [0, 1], "keys")
    with pytest.raises(InputError, match="alignment"):
        make_bank(shape_of(large), shape_of(small), [0], "hidden")
    with pytest.raises(InputError, match="equal widths"):
        make_bank(shape_of(large), shape_of(small), [0, 1], "hidden").identity_()


def test_features_use_attention_inputs(models):
    large, _ = models
    prompt = torch.randint(0, 300, (1, 5))
    seen = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.__setitem__(i, kw["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(large.model.layers)]
    with torch.no_grad():
        hs = large(input_ids=prompt, output_hidden_states=True).hidden_states
        feats = large_features(large, hs, [0, 2], "hidden")
    for h in hooks:
        h.remove()
    assert torch.equal(feats[0], seen[0]) and torch.equal(feats[2], seen[2])


def test_handover_scores_like_a_fresh_stitched_prefill(models):
    """eval scores the cache that greedy_stitched handed over (no second large prefill): the decode left it as it
    was, so the per-position NLL equals the one from a fresh stitched prefill exactly."""
    from gpulab.stitchkv.evaluate import _nll_stitched

    large, small = models
    bank = make_bank(shape_of(large), shape_of(small), alignment("uniform-nearest", 3, 2), "kv")
    prompt = torch.randint(0, 300, (2, 9))
    ref = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        g = greedy_stitched(large, small, bank, prompt, 6, keep_handover=True)
        kept = [(k.clone(), v.clone()) for k, v in g.handover[1]]
        reused = _nll_stitched(large, small, bank, prompt, ref, handover=g.handover)
        fresh = _nll_stitched(large, small, bank, prompt, ref)
    assert torch.equal(reused, fresh)
    assert all(torch.equal(a, k) and torch.equal(b, v) for (a, b), (k, v) in zip(kept, g.handover[1]))
    assert greedy_stitched(large, small, bank, prompt, 2).handover is None


def test_residual_stage2_loss_reaches_the_small_models_prompt_prefill(models, monkeypatch):
    """Residual stitches read the small model's own prefill; the LM loss's gradient flows through it (stage 2
    trains the small model's LoRA end to end), unlike with the prefill's features detached."""
    import copy

    from gpulab.stitchkv import stitch as S
    from gpulab.stitchkv.train import lm_loss_stitched

    large, small = models
    small = copy.deepcopy(small).train()
    ls, ss = shape_of(large), shape_of(small)
    bank = make_bank(ls, ss, alignment("uniform-nearest", ls["layers"], ss["layers"]), "residual")
    with torch.no_grad():
        for lin in bank.linears():
            lin.weight.normal_(std=0.02)
    prompt, cont = torch.randint(0, 300, (2, 9)), torch.randint(0, 300, (2, 5))
    first = next(p for n, p in small.named_parameters() if "layers.0.mlp" in n)  # feeds layer 1's prompt K/V

    def grad():
        small.zero_grad()
        lm_loss_stitched(large, small, bank, prompt, cont).backward()
        return first.grad.clone()

    with_prefill = grad()
    real = S.own_features
    monkeypatch.setattr(S, "own_features", lambda *a: {k: v.detach() for k, v in real(*a).items()})
    detached = grad()
    assert not torch.allclose(with_prefill, detached)
    assert torch.isfinite(with_prefill).all()
