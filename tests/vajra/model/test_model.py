"""vajra's Llama forward (paged cache, varlen batches) against transformers, dense and FP8."""
from __future__ import annotations

import json

import pytest
import torch

from gpulab.vajra.load import load_model

from .helpers import Runner, cpu_w8a8_or_skip, dequantized_hf, hf_greedy, hf_last_logits, make_tiny, quantize_cli, rel_err

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return make_tiny(d, rope_scaling=LLAMA3_ROPE)


@pytest.fixture(scope="module")
def qdirs(tiny, tmp_path_factory):
    """The tiny model quantized by `gpulab quantize` in every scheme/format/scale shape."""
    _, src = tiny
    root = tmp_path_factory.mktemp("q")
    specs = {
        "ct-tensor": ["--scheme", "fp8-tensor"],
        "ct-channel-2d": ["--scheme", "fp8-channel"],
        "ct-channel-1d": ["--scheme", "fp8-channel", "--scale-shape", "1d"],
        "ct-block": ["--scheme", "fp8-block", "--block", "16x32"],
        "ct-block-ragged": ["--scheme", "fp8-block", "--block", "24x32"],  # 32-row k/v shards: not a multiple
        "fp8-tensor": ["--scheme", "fp8-tensor", "--format", "fp8"],
        "fp8-block": ["--scheme", "fp8-block", "--block", "16x32", "--format", "fp8"],
        "ct-channel-weightonly": ["--scheme", "fp8-channel", "--activations", "none"],
    }
    out = {}
    for name, args in specs.items():
        quantize_cli(src, root / name, root / "results", *args)
        out[name] = root / name
    return out


def prompts(n: int, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (L,), generator=g).tolist() for L in lens[:n]]


def test_dense_matches_transformers_varlen_chunked(tiny):
    hf, src = tiny
    vm = load_model(src)
    p = prompts(3, [11, 7, 19])
    r = Runner(vm)
    s = [r.add() for _ in p]
    # step 1: seq0 whole, seq1 whole, seq2 first chunk of 8; step 2: seq2's rest + decodes of seq0/seq1
    out = r.step({s[0]: p[0], s[1]: p[1], s[2]: p[2][:8]})
    assert rel_err(out[0], hf_last_logits(hf, p[0])) < 1e-5
    assert rel_err(out[1], hf_last_logits(hf, p[1])) < 1e-5
    assert rel_err(out[2], hf_last_logits(hf, p[2][:8])) < 1e-5
    out = r.step({s[2]: p[2][8:], s[0]: [5], s[1]: [9]})
    assert rel_err(out[0], hf_last_logits(hf, p[2])) < 1e-5
    assert rel_err(out[1], hf_last_logits(hf, p[0] + [5])) < 1e-5
    assert rel_err(out[2], hf_last_logits(hf, p[1] + [9])) < 1e-5


def test_dense_greedy_32_steps(tiny):
    hf, src = tiny
    prompt = prompts(1, [9])[0]
    assert Runner(load_model(src)).greedy(prompt, 32) == hf_greedy(hf, prompt, 32)


@pytest.mark.parametrize("name", ["ct-channel-2d", "ct-channel-1d", "ct-block", "fp8-block", "ct-channel-weightonly"])
def test_fp8_exact_fusion_matches_transformers_on_dequantized(name, tiny, qdirs):
    """Channel scales and block scales on block-aligned shards fuse losslessly: fp32-tight."""
    hf, _ = tiny
    ref = dequantized_hf(hf, qdirs[name])
    vm = load_model(qdirs[name])
    p = prompts(2, [13, 6])
    r = Runner(vm)
    s = [r.add() for _ in p]
    out = r.step({s[0]: p[0], s[1]: p[1]})
    for i in range(2):
        assert rel_err(out[i], hf_last_logits(ref, p[i])) < 1e-5


@pytest.mark.parametrize("name", ["ct-tensor", "fp8-tensor", "ct-block-ragged"])
def test_fp8_requantized_fusion_bounded(name, tiny, qdirs):
    """Per-tensor q/k/v with different scales are requantized onto the largest one (and ragged
    blocks re-blocked): logits stay within a few percent of transformers on the dequantized weights."""
    hf, _ = tiny
    ref = dequantized_hf(hf, qdirs[name])
    vm = load_model(qdirs[name])
    p = prompts(1, [15])[0]
    r = Runner(vm)
    out = r.step({r.add(): p})
    e = rel_err(out[0], hf_last_logits(ref, p))
    assert e < 0.05, e
    # and the fused layer really is on one scale where the format is per-tensor
    if "tensor" in name:
        assert vm.layers[0].qkv.qw is None  # CPU default: dequantized once at load
        from gpulab.vajra.linear import w8a8_unavailable

        keeps_fp8 = "w8a16" if w8a8_unavailable(torch.device("cpu"), True) else "w8a8"  # either keeps qw
        raw = load_model(qdirs[name], linear_backend=keeps_fp8).layers[0].qkv.qw
        assert raw.strategy == "tensor" and raw.scale.numel() == 1


def test_fp8_greedy_32_steps_identical(tiny, qdirs):
    hf, _ = tiny
    ref = dequantized_hf(hf, qdirs["ct-channel-2d"])
    prompt = prompts(1, [7], seed=3)[0]
    assert Runner(load_model(qdirs["ct-channel-2d"])).greedy(prompt, 32) == hf_greedy(ref, prompt, 32)


@pytest.mark.parametrize("name", ["ct-channel-2d", "ct-tensor"])
def test_w8a8_scaled_mm_matches_fake_quant_reference(name, tiny, qdirs):
    """W8A8 through torch._scaled_mm (runs on the CPU too) against the fake-quant torch reference."""
    from gpulab.vajra import reference as R

    cpu_w8a8_or_skip()
    vm = load_model(qdirs[name], linear_backend="w8a8")
    lin = vm.layers[0].gate_up
    x = torch.randn(7, 64)
    qw = lin.qw
    ref = R.linear_w8a8(x, qw.q, qw.scale, "dynamic")
    assert rel_err(lin(x), ref) < 1e-5
    # and the whole model stays close to the weight-only result
    p = prompts(1, [10])[0]
    r1, r2 = Runner(vm), Runner(load_model(qdirs[name]))
    a = r1.step({r1.add(): p})
    b = r2.step({r2.add(): p})
    assert rel_err(a[0], b[0]) < 0.1  # e4m3 activation rounding, two layers


def needs_triton():
    from gpulab.vajra.linear import triton_usable

    if not triton_usable(torch.device("cpu")):  # these models run on the CPU, so Triton only interpreted
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")


def prefill_decode_logits(model, lens=(6, 3)) -> torch.Tensor:
    """Logits of a varlen prefill of two prompts and then one decode step of both."""
    p = prompts(2, list(lens))
    r = Runner(model, block_size=16, num_blocks=8)
    s = [r.add() for _ in p]
    return torch.cat([r.step({s[0]: p[0], s[1]: p[1]}), r.step({s[0]: [3], s[1]: [4]})])


def test_w8a16_triton_and_triton_attention_in_model(tiny, qdirs):
    """The Triton W8A16 GEMM and paged attention inside the model (interpreter on the CPU)."""
    needs_triton()
    name = "ct-block"
    base = load_model(qdirs[name])
    tri = load_model(qdirs[name], linear_backend="w8a16", attention_backend="triton")
    assert rel_err(prefill_decode_logits(tri), prefill_decode_logits(base)) < 1e-5


def test_fused_decoder_kernels_in_model(tiny, qdirs):
    """The fused RMSNorm / RoPE / SiLU kernels inside the model (interpreter on the CPU, where the model does not
    choose them by itself): the unfused model's logits over a varlen prefill and a decode step."""
    needs_triton()
    base, fused = load_model(qdirs["ct-channel-2d"]), load_model(qdirs["ct-channel-2d"])
    assert base.fused_ops is torch.cuda.is_available() and not base.notes
    base.fused_ops, fused.fused_ops = False, True
    assert rel_err(prefill_decode_logits(fused), prefill_decode_logits(base)) < 1e-5


def test_attention_kv_store_follows_the_models_fused_kernels(tiny, qdirs):
    """The Triton backend stores K/V with the fused kernel only while the model runs its fused kernels (a failed
    probe turns both off), also after a bench swaps in another backend; logits agree either way."""
    from gpulab.vajra.attention import make_backend

    needs_triton()
    m = load_model(qdirs["ct-channel-2d"], attention_backend="triton")
    assert m.attention.fused_store is m.fused_ops is torch.cuda.is_available()
    m.fused_ops = True
    assert m.attention.fused_store
    fused = prefill_decode_logits(m)
    c = m.cfg
    m.attention = make_backend("triton", device=m.device, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                               head_dim=c.head_dim, scale=m.scale, act_dtype=m.dtype)
    assert m.attention.fused_store
    m.fused_ops = False
    assert not m.attention.fused_store
    assert rel_err(prefill_decode_logits(m), fused) < 1e-5
    m.attention = make_backend("torch", device=m.device, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                               head_dim=c.head_dim, scale=m.scale, act_dtype=m.dtype)
    m.fused_ops = True
    assert not m.attention.fused_store  # the torch reference backend never takes the Triton store


def test_fused_kernels_take_w8a16_split_k_partials_in_model(tiny, qdirs, monkeypatch):
    """W8A16 forced to split K: the fused norm and RoPE kernels sum its partials (no reduction kernel); the logits
    are the unfused dequant model's."""
    from gpulab.vajra import w8a16 as W

    needs_triton()
    real = W.choose_config
    monkeypatch.setattr(W, "choose_config", lambda *a, **kw: {**real(*a, **kw), "SPLIT_K": 2, "BK": 16})
    seen = []
    real_mm = W.w8a16_matmul

    def spy(*a, **kw):
        out = real_mm(*a, **kw)
        seen.append(out.dim())
        return out

    monkeypatch.setattr(W, "w8a16_matmul", spy)
    base = load_model(qdirs["ct-channel-2d"])
    fused = load_model(qdirs["ct-channel-2d"], linear_backend="w8a16")
    base.fused_ops, fused.fused_ops = False, True
    want, got = prefill_decode_logits(base, (5, 3)), prefill_decode_logits(fused, (5, 3))
    assert 3 in seen  # partials were handed over
    assert rel_err(got, want) < 1e-5


def test_fp8_kv_cache_bounded(tiny):
    hf, src = tiny
    vm = load_model(src, kv_cache_dtype="fp8")
    p = prompts(1, [12])[0]
    r = Runner(vm)
    assert r.kv.dtype == torch.float8_e4m3fn
    out = r.step({r.add(): p})
    assert rel_err(out[0], hf_last_logits(hf, p)) < 0.1
    assert vm.kv_bytes_per_block(16) * 2 == load_model(src).kv_bytes_per_block(16, "bf16")


def with_kv_scales(src, dst, scales):
    """A copy of ``src`` whose shard holds per-layer self_attn k_scale/v_scale tensors (as llm-compressor writes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (shard,) = dst.glob("*.safetensors")
    t = load_file(str(shard))
    for i, (ks, vs) in enumerate(scales):
        t[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(ks)
        t[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([vs])  # scalar or [1]: both seen in the wild
    save_file(t, str(shard))
    return dst


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the paged kernels under the interpreter
def test_fp8_kv_cache_uses_the_checkpoints_layer_scales(tiny, tmp_path, backend):
    """Calibrated per-layer K/V scales: layer i stores K / k_scale_i (times k_scale_i it is the unscaled K of an
    fp32 cache) and attends with them; the logits stay close to transformers'."""
    hf, src = tiny
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    scales = [(0.02 * (i + 1), 0.015 * (i + 2)) for i in range(n)]
    d = with_kv_scales(src, tmp_path / "scaled", scales)
    vm = load_model(d, kv_cache_dtype="fp8", attention_backend=backend)
    assert vm.kv_scales == [(pytest.approx(k), pytest.approx(v)) for k, v in scales]
    assert any("per layer from the checkpoint" in note for note in vm.notes)
    p = prompts(1, [12])[0]
    r8, r32 = Runner(vm), Runner(load_model(d))  # same seed: the same pages
    assert r8.kv.layer_scales == vm.kv_scales and r32.kv.layer_scales is None
    s8, s32 = r8.add(), r32.add()
    out = r8.step({s8: p})
    r32.step({s32: p})
    assert rel_err(out[0], hf_last_logits(hf, p)) < 0.1
    nxt = int(out[0].argmax())  # a decode step reads the scaled cache back (the decode kernel with triton)
    assert rel_err(r8.step({s8: [nxt]})[0], hf_last_logits(hf, p + [nxt])) < 0.1
    r32.step({s32: [nxt]})
    for i, (ks, vs) in enumerate(scales):
        for j, sc in ((0, ks), (1, vs)):
            got, want = r8.kv.layers[i][:, j].float() * sc, r32.kv.layers[i][:, j].float()
            if i == 0:  # layer 0's K/V come from the embeddings alone: equal up to FP8 rounding
                assert torch.allclose(got, want, rtol=0.07, atol=sc * 2 ** -6), (i, j)
            else:  # later ones carry the earlier layers' FP8 error: the same magnitudes
                assert float(got.abs().max()) == pytest.approx(float(want.abs().max()), rel=0.2), (i, j)


def test_qwen2_biases_and_tied_embeddings(tmp_path):
    hf, src = make_tiny(tmp_path / "qwen", model_type="qwen2", tie_word_embeddings=True)
    vm = load_model(src)
    p = prompts(1, [10])[0]
    r = Runner(vm)
    assert rel_err(r.step({r.add(): p})[0], hf_last_logits(hf, p)) < 1e-5


def test_sharded_checkpoint_and_info(tmp_path):
    hf, src = make_tiny(tmp_path / "m", seed=2)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    vm = load_model(sharded)
    p = prompts(1, [8])[0]
    r = Runner(vm)
    assert rel_err(r.step({r.add(): p})[0], hf_last_logits(hf, p)) < 1e-5
    assert vm.info.num_layers == 2 and vm.info.num_kv_heads == 2 and vm.info.head_dim == 16
    assert vm.info.vocab_size == 128 and vm.info.dtype == torch.float32


def test_dummy_load_format(tmp_path, tiny):
    _, src = tiny
    only_cfg = tmp_path / "cfg"
    only_cfg.mkdir()
    (only_cfg / "config.json").write_text((src / "config.json").read_text())
    vm = load_model(only_cfg, load_format="dummy")
    r = Runner(vm)
    out = r.step({r.add(): [1, 2, 3]})
    assert out.shape == (1, 128) and torch.isfinite(out).all()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 32]}
    (only_cfg / "config.json").write_text(json.dumps(cfg))
    vm = load_model(only_cfg, load_format="dummy", linear_backend="auto")
    r = Runner(vm)
    assert torch.isfinite(r.step({r.add(): [1, 2, 3]})).all()


def test_static_activations_calibrated(tmp_path, tiny):
    """--activations static: calibration over text with SRC's tokenizer.json writes input_scale."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf, _ = tiny
    src = tmp_path / "src"
    hf.save_pretrained(src)
    vocab = {chr(ord("a") + i): i for i in range(26)}
    vocab.update({"[UNK]": 26})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(src / "tokenizer.json"))
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    dst = tmp_path / "static"
    quantize_cli(src, dst, tmp_path / "res", "--scheme", "fp8-tensor", "--activations", "static",
                 "--calib-text", str(text), "--calib-len", "32", "--calib-samples", "2")
    from safetensors import safe_open

    idx = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.input_scale"
    with safe_open(str(dst / idx[name]), "pt") as f:
        s = f.get_tensor(name)
    assert float(s) > 0
    cpu_w8a8_or_skip()
    vm = load_model(dst, linear_backend="w8a8")
    assert vm.layers[0].qkv.qw.act == "static"
    p = prompts(1, [10])[0]
    r = Runner(vm)
    out = r.step({r.add(): p})
    assert rel_err(out[0], hf_last_logits(dequantized_hf(hf, dst), p)) < 0.1
