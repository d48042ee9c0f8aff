"""Other supported families (qwen2: k/v biases, qwen3: per-head k_norm and explicit head_dim, mistral, nemotron:
LayerNorm1P and partial RoPE), and saved
pairs: identity stitches reproduce the small model exactly, a saved pair loads, stitched caches
have the small model's shapes. Tiny random-init models built in code."""
from __future__ import annotations

import pytest
import torch

from gpulab.stitchkv.generate import greedy, greedy_stitched
from gpulab.stitchkv.models import SUPPORTED_TYPES, load_pair, save_model, shape_of, tiny_llama
from gpulab.stitchkv.reference import own_cache
from gpulab.stitchkv.stitch import alignment, cache_tensors, make_bank, stitched_cache
from tests.stitchkv.conftest import LARGE, SMALL


def family_model(family: str, shape: dict, vocab: int, seed: int, rope_theta: float = 10000.0):
    """A random-init causal LM of ``family`` with the given shape (tiny; no download)."""
    import transformers as tf

    if family == "llama":
        return tiny_llama(shape, vocab, 256, seed=seed, rope_theta=rope_theta)
    cls_cfg, cls_model = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "nemotron": (tf.NemotronConfig, tf.NemotronForCausalLM),  # Minitron-8B/4B-Base; partial_rotary_factor 0.5
    }[family]
    kw = dict(vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
              num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
              num_key_value_heads=shape["kv_heads"], max_position_embeddings=256, rope_theta=rope_theta,
              tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "qwen3":
        kw["head_dim"] = 2 * shape["hidden"] // shape["heads"]  # qwen3 decouples head_dim from hidden/heads
    cfg = cls_cfg(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    m = cls_model(cfg)
    if family == "qwen2":  # qwen2's k/v biases start at zero: make them matter
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
                layer.self_attn.v_proj.bias.normal_(0, 0.5)
    return m.eval()


FAMILIES = [f for f in SUPPORTED_TYPES if f != "llama"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["hidden", "kv"])
def test_identity_stitch_is_exact_for_family(family, mode, tokenizer):
    small = family_model(family, SMALL, len(tokenizer), seed=2, rope_theta=500.0)
    large = family_model(family, SMALL, len(tokenizer), seed=5, rope_theta=500.0)
    large.load_state_dict(small.state_dict())  # a twin: same weights and RoPE, separate modules
    sh = shape_of(small)
    if family == "qwen3":
        assert sh["head_dim"] != sh["hidden"] // sh["heads"]
    bank = make_bank(sh, sh, alignment("uniform-nearest", sh["layers"], sh["layers"]), mode).identity_()
    prompt = torch.randint(2, len(tokenizer), (2, 11))
    with torch.no_grad():
        _, cache = stitched_cache(large, small, bank, prompt)
        for (k, v), (tk, tv) in zip(cache_tensors(cache), own_cache(small, prompt)):
            assert torch.equal(k, tk) and torch.equal(v, tv)
    assert torch.equal(greedy_stitched(large, small, bank, prompt, 5).tokens, greedy(small, prompt, 5).tokens)


@pytest.mark.parametrize("large_family,small_family", [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("mistral", "llama"),
                                                      ("nemotron", "nemotron")])
def test_family_pair_loads_and_stitches(large_family, small_family, tokenizer, tmp_path):
    """A saved pair of each family (a pair shares one tokenizer, so in practice one family) loads and stitches."""
    large = family_model(large_family, LARGE, len(tokenizer), seed=1)
    small = family_model(small_family, SMALL, len(tokenizer), seed=2, rope_theta=500.0)
    save_model(large, tokenizer, tmp_path / "large")
    save_model(small, tokenizer, tmp_path / "small")
    pair = load_pair(tmp_path / "large", tmp_path / "small")
    assert pair.large.config.model_type == large_family and pair.small.config.model_type == small_family
    ls, ss = shape_of(pair.large), shape_of(pair.small)
    bank = make_bank(ls, ss, alignment("last-aligned", ls["layers"], ss["layers"]), "kv")
    prompt = torch.randint(2, len(tokenizer), (3, 9))
    with torch.no_grad():
        logits, cache = stitched_cache(pair.large, pair.small, bank, prompt)
    assert logits.shape == (3, ls["vocab"])
    for k, v in cache_tensors(cache):
        assert k.shape == v.shape == (3, ss["kv_heads"], 9, ss["head_dim"])
    assert greedy_stitched(pair.large, pair.small, bank, prompt, 3).tokens.shape == (3, 3)


def test_partial_rope_matches_transformers():
    """apply_rope rotates only the first cos.shape[-1] dims of each head, as transformers' nemotron RoPE does."""
    from transformers.models.nemotron.modeling_nemotron import apply_rotary_pos_emb

    from gpulab.stitchkv.stitch import apply_rope

    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 7, 16, generator=g)
    for rot in (8, 16):  # partial_rotary_factor 0.5, and the whole head
        ang = torch.randn(2, 7, rot // 2, generator=g)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        assert torch.equal(apply_rope(k, cos, sin), apply_rotary_pos_emb(k, k, cos, sin)[1])


def test_nemotron_partial_rope_is_the_small_models(tokenizer):
    """Same weights, another RoPE base: the identity stitch gives the small model's exact layer-0 keys; of the
    other model's keys only the rotated first half differs, the pass-through half carries no RoPE."""
    small = family_model("nemotron", SMALL, len(tokenizer), seed=2, rope_theta=500.0)
    other = family_model("nemotron", SMALL, len(tokenizer), seed=5, rope_theta=123456.0)
    other.load_state_dict(small.state_dict())  # inv_freq is not in the state dict: the bases stay apart
    sh = shape_of(small)
    rot = 2 * small.model.rotary_emb.inv_freq.numel()
    assert rot == sh["head_dim"] // 2
    bank = make_bank(sh, sh, [0, 1], "hidden").identity_()
    prompt = torch.randint(2, len(tokenizer), (2, 13))
    with torch.no_grad():
        _, cache = stitched_cache(other, small, bank, prompt)
        k, want, naive = cache_tensors(cache)[0][0], own_cache(small, prompt)[0][0], own_cache(other, prompt)[0][0]
    assert torch.equal(k, want)
    assert not torch.allclose(naive[..., :rot], want[..., :rot], atol=1e-3)
    assert torch.equal(naive[..., rot:], want[..., rot:])
