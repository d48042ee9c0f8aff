"""Malformed checkpoints and bad arguments -> one-line errors that name the problem."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpulab.core.errors import DeviceError, InputError
from gpulab.vajra.load import load_model
from tests.assertions import assert_one_line

from .helpers import make_tiny, quantize_cli, tiny_and_quantized


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_and_quantized(tmp_path_factory.mktemp("err"), "q", "fp8-channel")


def _copy(base, name, tmp_path):
    d = tmp_path / name
    shutil.copytree(base / name, d)
    return d


def _rewrite(d, fn):
    """Apply fn(dict of tensors) to the single shard of a quantized folder."""
    from safetensors.torch import load_file, save_file

    shard = next(d.glob("*.safetensors"))
    t = load_file(str(shard))
    fn(t)
    save_file(t, str(shard))
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        idx.write_text(json.dumps({"weight_map": {k: shard.name for k in t}}))


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(InputError) as e:
        load_model(tmp_path / "nope")
    assert_one_line(e, "not found")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as e:
        load_model(tmp_path / "empty")
    assert_one_line(e, "no config.json")


def test_malformed_config(base, tmp_path):
    d = _copy(base, "src", tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "malformed config.json")
    cfg = json.loads((base / "src" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "gpt2")


def test_unknown_quant_method_and_format(base, tmp_path):
    d = _copy(base, "q", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "awq")
    cfg["quantization_config"]["quant_method"] = "compressed-tensors"
    cfg["quantization_config"]["format"] = "pack-quantized"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "pack-quantized")


@pytest.mark.parametrize("folder,tensor,says", [
    ("q", "model.layers.0.mlp.down_proj.weight_scale", "missing"),
    ("src", "lm_head.weight", "tie_word_embeddings"),  # an untied model's head is never silently tied
])
def test_missing_tensor_is_named(base, tmp_path, folder, tensor, says):
    d = _copy(base, folder, tmp_path)
    assert not json.loads((d / "config.json").read_text()).get("tie_word_embeddings")
    _rewrite(d, lambda t: t.pop(tensor))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, tensor, says)


def test_wrong_scale_shape_names_tensor(base, tmp_path):
    d = _copy(base, "q", tmp_path)

    def f(t):
        t["model.layers.0.self_attn.k_proj.weight_scale"] = torch.ones(5, 1)
    _rewrite(d, f)
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "model.layers.0.self_attn.k_proj.weight_scale", "[5, 1]")


def test_dense_weight_where_fp8_declared(base, tmp_path):
    d = _copy(base, "q", tmp_path)

    def f(t):
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"].float()
    _rewrite(d, f)
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "model.layers.0.self_attn.o_proj.weight", "F32")


def test_e5m2_weight_and_fp8_without_config(base, tmp_path):
    d = _copy(base, "q", tmp_path)

    def f(t):
        n = "model.layers.0.mlp.up_proj.weight"
        t[n] = t[n].float().to(torch.float8_e5m2)
    _rewrite(d, f)
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "model.layers.0.mlp.up_proj.weight", "e4m3")
    d2 = _copy(base, "q", tmp_path / "b")
    cfg = json.loads((d2 / "config.json").read_text())
    del cfg["quantization_config"]
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_model(d2)
    assert_one_line(e, "no quantization_config")


def test_shape_mismatch_and_missing_tensor(base, tmp_path):
    d = _copy(base, "src", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "gate_proj.weight", "does not match config.json")
    d2 = _copy(base, "src", tmp_path / "b")
    _rewrite(d2, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(InputError) as e:
        load_model(d2)
    assert_one_line(e, "model.norm.weight", "missing")


def test_kv_cache_scheme_is_noted_not_silently_dropped(base, tmp_path):
    d = _copy(base, "q", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    assert not any("kv_cache_scheme" in n for n in load_model(d).notes)
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                     "dynamic": False, "symmetric": True}
    (d / "config.json").write_text(json.dumps(cfg))
    assert any("kv_cache_scheme" in n and "scale 1.0" in n for n in load_model(d).notes)


def test_bad_kv_cache_scale_names_tensor(base, tmp_path):
    d = _copy(base, "src", tmp_path)
    n = json.loads((d / "config.json").read_text())["num_hidden_layers"]

    def add(t):
        for i in range(n):  # one kv_scale for both, the last one broken
            t[f"model.layers.{i}.self_attn.kv_scale"] = torch.tensor(0.0 if i == n - 1 else 0.5)
    _rewrite(d, add)
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, f"model.layers.{n - 1}.self_attn.kv_scale", "finite and > 0")


def test_corrupt_safetensors_and_index(base, tmp_path):
    d = _copy(base, "src", tmp_path)
    next(d.glob("*.safetensors")).write_bytes(b"\x00garbage")
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "safetensors")
    d2 = _copy(base, "q", tmp_path / "b")
    (d2 / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(InputError) as e:
        load_model(d2)
    assert_one_line(e, "malformed index")


def test_bad_arguments(base):
    with pytest.raises(InputError) as e:
        load_model(base / "src", attention_backend="xformers")
    assert_one_line(e, "xformers")
    with pytest.raises(InputError) as e:
        load_model(base / "src", linear_backend="cublaslt")
    assert_one_line(e, "cublaslt")
    with pytest.raises(InputError):
        load_model(base / "src", load_format="pt")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            load_model(base / "src", device="cuda")
        with pytest.raises(DeviceError):
            load_model(base / "src", attention_backend="flashinfer")


def test_quantize_cli_errors_are_one_line(base, tmp_path, capsys):
    from gpulab.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as ex:
            main(["--device", "cpu", "--out", str(tmp_path / "r"), "quantize", *map(str, args)])
        err = capsys.readouterr().err.strip()
        assert ex.value.code == 1 and err.count("\n") == 0 and err.startswith("error: "), err
        return err

    assert "--scheme" in run(base / "src", tmp_path / "x", "--scheme", "int4")
    assert "exists" in run(base / "src", base / "q", "--scheme", "fp8-tensor")
    assert "already quantized" in run(base / "q", tmp_path / "y", "--scheme", "fp8-tensor")
    assert "--calib-text" in run(base / "src", tmp_path / "z", "--scheme", "fp8-tensor", "--activations", "static")
    assert "--block" in run(base / "src", tmp_path / "w", "--scheme", "fp8-block", "--block", "16by16")
    assert "not found" in run(tmp_path / "missing", tmp_path / "v", "--scheme", "fp8-tensor")
    assert "compressed-tensors" in run(base / "src", tmp_path / "u", "--scheme", "fp8-channel", "--format", "fp8")
    assert "not a format vLLM reads" in run(base / "src", tmp_path / "t", "--scheme", "fp8-block", "--activations",
                                            "static", "--calib-text", base / "src" / "config.json")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    # options of another scheme, or of static activations, were ignored
    assert run(base / "src", tmp_path / "s", "--scheme", "fp8-tensor", "--block", "16x16") == \
        "error: --block applies only to --scheme fp8-block"
    assert run(base / "src", tmp_path / "s", "--scheme", "fp8-block", "--scale-shape", "1d") == \
        "error: --scale-shape applies only to --scheme fp8-channel"
    assert run(base / "src", tmp_path / "s", "--scheme", "fp8-channel", "--calib-samples", "3", "--calib-len", "8") \
        == "error: --calib-samples, --calib-len apply only to --activations static"
    assert not (tmp_path / "s").exists()
    # a DST that holds SRC, or that is not a model folder, would be deleted by --overwrite
    par = tmp_path / "par"
    shutil.copytree(base / "src", par / "src")
    (par / "notes.txt").write_text("keep")
    assert "holds SRC" in run(par / "src", par, "--scheme", "fp8-tensor", "--overwrite")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep")
    assert "not a model folder" in run(base / "src", notes, "--scheme", "fp8-tensor", "--overwrite")
    assert (par / "src" / "config.json").is_file() and (notes / "notes.txt").read_text() == "keep"
    # a DST under a file: refused before the calibration and quantization, not an OSError when DST is created
    assert f"{notes / 'notes.txt'} is not a folder" in run(base / "src", notes / "notes.txt" / "q", "--scheme",
                                                           "fp8-tensor")


def test_flashinfer_needs_half_precision_activations(monkeypatch):
    """flashinfer has no fp32 kernels: an explicit backend is a one-line InputError (before importing it), and
    auto on a GPU picks triton, whose decode steps CUDA graphs can capture (no GPU needed: nothing touches the
    device)."""
    from gpulab.vajra import attention as A

    kw = dict(num_heads=4, num_kv_heads=2, head_dim=64, scale=0.125)
    cuda = torch.device("cuda")
    with pytest.raises(InputError) as e:
        A.make_backend("flashinfer", device=cuda, act_dtype=torch.float32, **kw)
    assert_one_line(e, "float32")
    monkeypatch.setattr(A, "flashinfer_available", lambda: True)
    for dt in (torch.float32, torch.bfloat16):
        backend = A.make_backend("auto", device=cuda, act_dtype=dt, **kw)
        assert backend.name == "triton" and backend.graph_capturable


def test_static_input_scale_must_be_positive(base, tmp_path):
    """A zero static input scale would divide the activations by 0 (NaN logits): a one-line error naming it."""
    d = _copy(base, "q", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (d / "config.json").write_text(json.dumps(cfg))

    def add_scales(t):
        for name in [n for n in t if n.endswith(".weight_scale")]:
            t[name.replace(".weight_scale", ".input_scale")] = torch.tensor([0.01])
        t["model.layers.0.mlp.up_proj.input_scale"] = torch.tensor([0.0])

    _rewrite(d, add_scales)
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "model.layers.0.mlp.up_proj.input_scale", "> 0")


def test_block_weights_with_static_activations_are_refused():
    from gpulab.vajra.checkpoint import parse_quant_config

    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [8, 8]},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}}}}
    with pytest.raises(InputError, match="block-wise weights with static activation scales are not supported"):
        parse_quant_config(ct)
    with pytest.raises(InputError, match="weight_block_size with activation_scheme 'static'"):
        parse_quant_config({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [8, 8]})


def test_biases_on_some_shards_and_an_index_naming_the_wrong_shard(base, tmp_path):
    d = _copy(base, "src", tmp_path)
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "'model.layers.0.self_attn.k_proj.bias' is missing")
    d2 = _copy(base, "src", tmp_path / "b")
    shard = next(d2.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    t = load_file(str(shard))
    moved = "model.layers.0.mlp.up_proj.weight"
    save_file({moved: t.pop(moved)}, str(d2 / "other.safetensors"))
    save_file(t, str(shard))
    index = {k: shard.name for k in t}
    index[moved] = shard.name  # the index says the first shard; the tensor is in the other
    (d2 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(InputError) as e:
        load_model(d2)
    assert_one_line(e, f"cannot read tensor '{moved}'")


def test_rope_scaling_without_factor_and_sliding_windows(base, tmp_path):
    from gpulab.vajra.config import parse_config

    cfg = json.loads((base / "src" / "config.json").read_text())
    with pytest.raises(InputError, match="rope scaling 'llama3' needs a 'factor' > 0"):
        parse_config({**cfg, "rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0}})
    assert parse_config({**cfg, "model_type": "mistral", "sliding_window": 8}).sliding_window == 8
    assert parse_config({**cfg, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    q = {**cfg, "model_type": "qwen2", "sliding_window": 8, "num_hidden_layers": 2}
    assert parse_config({**q, "use_sliding_window": False}).sliding_window is None
    assert parse_config({**q, "use_sliding_window": True, "max_window_layers": 2}).sliding_window is None
    assert parse_config({**q, "use_sliding_window": True, "max_window_layers": 1}).sliding_window == 8
    # a Mistral with a window shorter than its positions: the context is capped there (a note says so); a longer
    # one asked for is refused (vajra attends to the whole context)
    d = _copy(base, "src", tmp_path)
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": 16}))
    m = load_model(d)
    assert m.info.max_model_len == 16 and any("sliding window (16 tokens" in n for n in m.notes)
    with pytest.raises(InputError) as e:
        load_model(d, max_model_len=32)
    assert_one_line(e, "max_model_len 32 is longer than the model's sliding window (16)")



@pytest.mark.parametrize("name, dtype", [("model.embed_tokens.weight", torch.int8),
                                         ("model.embed_tokens.weight", torch.float8_e4m3fn),
                                         ("model.norm.weight", torch.int32)])
def test_non_linear_tensors_must_be_floats(base, tmp_path, name, dtype):
    """An embedding or norm stored as integers or FP8 was read as plain numbers (loaded, silently wrong)."""
    d = _copy(base, "q", tmp_path)
    _rewrite(d, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, f"tensor '{name}': unsupported dtype")


def test_a_tensor_in_two_shards_without_an_index(base, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(base, "src", tmp_path)
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    shard = next(d.glob("*.safetensors"))
    t = load_file(str(shard))
    name = "model.layers.0.self_attn.q_proj.weight"
    save_file({name: torch.zeros_like(t[name])}, str(d / "zz-stale.safetensors"))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, f"tensor '{name}' is in both")


@pytest.mark.parametrize("edit, message", [
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    ({"attention_bias": 1}, "'attention_bias' must be true or false"),
    ({"max_position_embeddings": "abc"}, "'max_position_embeddings' must be a positive integer"),
    ({"rms_norm_eps": "x"}, "'rms_norm_eps' must be a positive number"),
    ({"eos_token_id": [None]}, "'eos_token_id' must be a token id"),
    ({"rope_scaling": "llama3"}, "'rope_scaling' must be an object"),
    ({"rope_parameters": [1]}, "'rope_parameters' must be an object"),
    # llama3 RoPE's other numbers were only read when the model was built: a ValueError/TypeError traceback
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "1"}}, "'low_freq_factor' must be"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": [8192]}},
     "'original_max_position_embeddings' must be"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": None}}, "'high_freq_factor' must be"),
    # Qwen2's window fields: max_window_layers null was a TypeError traceback; "false" read as true
    ({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True, "max_window_layers": None},
     "'max_window_layers' must be"),
    ({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": "false", "max_window_layers": 0},
     "'use_sliding_window' must be true or false"),
])
def test_config_values_of_the_wrong_type(base, tmp_path, edit, message):
    d = _copy(base, "src", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, message)


@pytest.mark.parametrize("edit, message", [
    (lambda q: q["config_groups"].__setitem__("group_0", [1]), "config group 'group_0' must be an object"),
    (lambda q: q["config_groups"]["group_0"].__setitem__("input_activations", "dynamic"),
     "input_activations must be an object"),
    (lambda q: q["config_groups"]["group_0"]["weights"].__setitem__("num_bits", "eight"), "num_bits must be an integer"),
    (lambda q: q.__setitem__("ignore", ["re:("]), "is not a valid regular expression"),
    (lambda q: q.__setitem__("ignore", "lm_head"), "ignore must be a list"),
])
def test_quantization_config_of_the_wrong_shape(base, tmp_path, edit, message):
    d = _copy(base, "q", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, message)


def test_kv_scales_in_some_layers_only(tmp_path):
    root = tmp_path
    _, src = make_tiny(root / "src", num_hidden_layers=2)
    d = _copy(root, "src", tmp_path / "c")
    _rewrite(d, lambda t: t.update({"model.layers.1.self_attn.k_scale": torch.tensor(0.1),
                                     "model.layers.1.self_attn.v_scale": torch.tensor(0.1)}))
    with pytest.raises(InputError) as e:
        load_model(d)
    assert_one_line(e, "layer 1 has them but layer 0 has none")


def test_quantized_checkpoints_other_runtimes_load_alike(tmp_path):
    """fp8-tensor: q/k/v (and gate/up) share one scale, so vLLM need not requantize and transformers computes the
    same fused weights; fp8-block with dynamic activations declares per-group activations (compressed-tensors'
    FP8_BLOCK preset); the source's other weight files are not copied; what other runtimes refuse gets a note."""
    import yaml
    from safetensors.torch import load_file

    _, src = make_tiny(tmp_path / "src", num_hidden_layers=1)
    torch.save({}, src / "pytorch_model.bin")  # a second copy of the weights some folders ship
    out = tmp_path / "res"
    quantize_cli(src, tmp_path / "qt", out, "--scheme", "fp8-tensor")
    sd = load_file(str(next((tmp_path / "qt").glob("*.safetensors"))))
    p = "model.layers.0."
    qkv = {float(sd[f"{p}self_attn.{m}_proj.weight_scale"]) for m in "qkv"}
    gu = {float(sd[f"{p}mlp.{m}_proj.weight_scale"]) for m in ("gate", "up")}
    assert len(qkv) == 1 and len(gu) == 1
    assert not (tmp_path / "qt" / "pytorch_model.bin").exists()
    quantize_cli(src, tmp_path / "qb", out, "--scheme", "fp8-block", "--block", "32x48")
    acts = json.loads((tmp_path / "qb" / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["input_activations"]
    assert acts["strategy"] == "group" and acts["group_size"] == 48 and acts["dynamic"] is True
    rec = yaml.safe_load(sorted(out.glob("vajra-quantize-*.yaml"))[-1].read_text())
    assert any("not a whole number of blocks" in n for n in rec["notes"])  # 64 columns in 48-column blocks
    quantize_cli(src, tmp_path / "q1", out, "--scheme", "fp8-channel", "--scale-shape", "1d")
    rec = yaml.safe_load(sorted(out.glob("vajra-quantize-*.yaml"))[-1].read_text())
    assert any("vLLM and transformers refuse" in n for n in rec["notes"])


@pytest.mark.parametrize("scheme, edit, message", [
    # a linear weight that is not a 2-D matrix: an IndexError/RuntimeError without the tensor's name, or (per
    # tensor) a checkpoint written that the loader then refuses
    ("fp8-channel", lambda w: w.reshape(-1), "expected a 2-D weight, got shape [8192]"),
    ("fp8-block", lambda w: w.reshape(-1), "expected a 2-D weight, got shape [8192]"),
    ("fp8-tensor", lambda w: w.reshape(-1), "expected a 2-D weight, got shape [8192]"),
    ("fp8-channel", lambda w: w[None], "expected a 2-D weight, got shape [1, 128, 64]"),
    ("fp8-tensor", lambda w: w[:0], "expected a 2-D weight, got shape [0, 64]"),
    # NaN/inf weights: NaN scales were written and the round-trip check passed (NaN compares false)
    ("fp8-channel", lambda w: w.clone().fill_(float("nan")), "NaN or infinite"),
    ("fp8-tensor", lambda w: w.clone().index_fill_(0, torch.tensor([3]), float("inf")), "NaN or infinite"),
])
def test_quantize_refuses_malformed_linear_weights(base, tmp_path, capsys, scheme, edit, message):
    from safetensors.torch import load_file, save_file

    from gpulab.cli import main

    d = _copy(base, "src", tmp_path)
    shard = next(d.glob("*.safetensors"))
    t = load_file(str(shard))
    name = "model.layers.0.mlp.up_proj.weight"
    t[name] = edit(t[name])
    save_file(t, str(shard))
    with pytest.raises(SystemExit) as ex:
        main(["--device", "cpu", "--out", str(tmp_path / "r"), "quantize", str(d), str(tmp_path / "q"), "--scheme",
              scheme])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 1 and err.count("\n") == 0 and f"tensor '{name}'" in err and message in err, err
    assert not (tmp_path / "q").exists()
