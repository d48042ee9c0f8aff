"""Valid FP8 checkpoint variants other tools write, read as they are meant (tiny checkpoints made in code)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpulab.vajra.load import load_model

from .helpers import Runner, tiny_and_quantized

PROMPT = [1, 5, 9, 22, 7, 3]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_and_quantized(tmp_path_factory.mktemp("fmt"), "qt", "fp8-tensor")


def _last_logits(d) -> torch.Tensor:
    r = Runner(load_model(d))
    return r.step({r.add(): PROMPT})


def _rewrite(d, fn):
    from safetensors.torch import load_file, save_file

    shard = next(d.glob("*.safetensors"))
    t = load_file(str(shard))
    fn(t)
    save_file(t, str(shard))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard.name for k in t}}))


def test_naive_quantized_static_fp8_as_llm_compressor_wrote_it(base, tmp_path):
    """neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8's layout: compressed-tensors ``format: naive-quantized`` (the
    format name older llm-compressor wrote for FP8; vLLM and transformers read it as float-quantized), static
    per-tensor activations without a ``dynamic`` key, weight and input scales stored as bf16 ``[1]``. It was
    refused ("format 'naive-quantized' is not supported")."""
    d = tmp_path / "naive"
    shutil.copytree(base / "qt", d)

    def bf16_scales(t):
        for name in [n for n in t if n.endswith(".weight_scale")]:
            t[name] = t[name].bfloat16().reshape(1)
            t[name.replace(".weight_scale", ".input_scale")] = torch.tensor([0.02], dtype=torch.bfloat16)
    _rewrite(d, bf16_scales)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {
        "config_groups": {"group_0": {
            "input_activations": {"num_bits": 8, "strategy": "tensor", "type": "float"},
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "strategy": "tensor", "type": "float"}}},
        "format": "naive-quantized", "ignore": ["lm_head"], "quant_method": "compressed-tensors",
        "quantization_status": "frozen"}
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(d)
    assert m.quant == {"method": "compressed-tensors", "weights": "tensor", "block": None, "activations": "static"}
    # the same weights as float-quantized: the same logits
    same = tmp_path / "float"
    shutil.copytree(d, same)
    cfg["quantization_config"]["format"] = "float-quantized"
    (same / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(_last_logits(d), _last_logits(same))


def test_kv_cache_scales_as_k_proj_and_v_proj_output_scales(base, tmp_path):
    """AutoFP8 and older llm-compressor wrote a calibrated FP8 KV cache's scales as the k/v projections' output
    scales (``self_attn.k_proj.output_scale``, ``v_proj.output_scale``; vLLM's fp8 and compressed-tensors loaders
    map them onto the attention's k_scale/v_scale). They were not read: the FP8 cache stored K/V with scale 1.0 and
    the note said the checkpoint held no scales."""
    d = tmp_path / "kv"
    shutil.copytree(base / "qt", d)
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.output_scale": torch.tensor([0.03]),
                                     "model.layers.0.self_attn.v_proj.output_scale": torch.tensor(0.02)}))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                     "dynamic": False, "symmetric": True}
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(d, kv_cache_dtype="fp8")
    assert m.kv_scales == [(pytest.approx(0.03), pytest.approx(0.02))]
    assert any("per layer from the checkpoint" in n for n in m.notes)
    assert not any("holds no" in n for n in m.notes)


def test_float64_scales_load_and_integer_input_scales_are_refused(base, tmp_path):
    """Scales are floats of any width: float64 ones were refused with "scales must be floating point, got F64"
    (other runtimes copy them into their fp32 scales). An input scale stored as integers was read as numbers
    (the weight scales' dtype is checked, the input scales' was not)."""
    from gpulab.core.errors import InputError
    from tests.assertions import assert_one_line

    d = tmp_path / "f64"
    shutil.copytree(base / "qt", d)
    _rewrite(d, lambda t: t.update({n: v.double() for n, v in t.items() if n.endswith(".weight_scale")}))
    assert torch.equal(_last_logits(d), _last_logits(base / "qt"))
    s = tmp_path / "static"
    shutil.copytree(base / "qt", s)
    cfg = json.loads((s / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (s / "config.json").write_text(json.dumps(cfg))

    def input_scales(t):
        for name in [n for n in t if n.endswith(".weight_scale")]:
            t[name.replace(".weight_scale", ".input_scale")] = torch.tensor([0.02], dtype=torch.float64)
        t["model.layers.0.mlp.down_proj.input_scale"] = torch.tensor([1], dtype=torch.int32)
    _rewrite(s, input_scales)
    with pytest.raises(InputError) as e:
        load_model(s)
    assert_one_line(e, "model.layers.0.mlp.down_proj.input_scale", "I32")
