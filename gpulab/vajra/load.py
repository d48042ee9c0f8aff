"""``load_model``: read a Llama-family Hugging Face folder (bf16/fp16/fp32 or FP8) into a
:class:`gpulab.vajra.model.LlamaModel` on the CPU or a CUDA GPU.

Weights are read tensor by tensor from the memory-mapped safetensors files and moved to the
device one at a time, so the host never holds a second copy of the model. ``load_format="dummy"``
makes random weights of the config's shapes (FP8 ones when the config declares a quantization),
for benchmarks at real sizes without the real weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpulab.core import options
from gpulab.core.device import bf16_native
from gpulab.core.errors import InputError
from gpulab.vajra.attention import make_backend
from gpulab.vajra.checkpoint import (FLOAT_NAMES, CheckpointReader, QuantScheme, QuantWeight, parse_quant_config,
                                     read_linear)
from gpulab.vajra.config import LlamaConfig, read_config
from gpulab.vajra.linear import LINEAR_BACKENDS, Linear, fuse, quantize
from gpulab.vajra.model import KV_DTYPES, DecoderLayer, LlamaModel

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
LOAD_FORMATS = ("auto", "dummy")


def resolve_dtype(dtype: Any, device: torch.device, cfg: LlamaConfig) -> torch.dtype:
    """The activation dtype; ``auto``: fp32 on the CPU, else the checkpoint's fp16, else bf16 (fp16 on a GPU
    without native bf16, before Ampere)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise InputError(f"activation dtype {dtype} is not supported (bf16, fp16, fp32)")
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        if cfg.torch_dtype in ("float16", "fp16") or not bf16_native(device):
            return torch.float16
        return torch.bfloat16
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is unknown (auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


class _DummySource:
    """Random weights with the shapes of a config (and the FP8 layout of its quantization, if any)."""

    def __init__(self, cfg: LlamaConfig, scheme: QuantScheme | None, device: torch.device, seed: int = 0):
        self.cfg, self.scheme, self.device = cfg, scheme, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def dense(self, shape, dtype) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32) * 0.02).to(dtype)

    def norm(self, n: int, dtype) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=self.gen, device=self.device)).to(dtype)

    def linear(self, module: str, shape, dtype):
        s = self.scheme
        if s is None or s.is_ignored(module):
            return self.dense(shape, dtype)
        w = self.dense(shape, torch.float32)
        strategy = s.strategy or "tensor"
        q, scale = quantize(w, strategy, s.block)
        del w
        inp = torch.tensor(0.05, device=self.device) if s.act == "static" else None
        return QuantWeight(q, scale.reshape(()) if strategy == "tensor" else scale, strategy, s.block, s.act, inp)


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: Any = None, load_format: str = "auto",
               attention_backend: str = "auto", kv_cache_dtype: str = "auto", linear_backend: str = "auto",
               max_model_len: int | None = None, seed: int = 0) -> LlamaModel:
    """Load a Llama-family model; see the module docstring. Raises one-line GpulabErrors."""
    if load_format not in LOAD_FORMATS:
        raise InputError(f"load format {load_format!r} is unknown (choose from {', '.join(LOAD_FORMATS)})")
    if linear_backend not in LINEAR_BACKENDS:
        raise InputError(f"linear backend {linear_backend!r} is unknown (choose from {', '.join(LINEAR_BACKENDS)})")
    if kv_cache_dtype != "auto" and kv_cache_dtype not in KV_DTYPES:
        raise InputError(f"kv cache dtype {kv_cache_dtype!r} is unknown (auto, {', '.join(KV_DTYPES)})")
    d = str(device)
    base = "cuda" if d.startswith("cuda") else d
    if base not in options.DEVICE_CHOICES:
        raise InputError(f"device {d!r} is unknown (auto, cuda, cpu)")
    dev_name = options.resolve_device(base, what="loading the model")
    dev = torch.device(d if d.startswith("cuda:") else dev_name)
    cfg = read_config(model_dir)
    scheme = parse_quant_config(cfg.quantization_config, where=f"{Path(model_dir) / 'config.json'}")
    act_dtype = resolve_dtype(dtype, dev, cfg)
    window_note = None
    if max_model_len is None:
        max_model_len = cfg.max_position_embeddings
        if cfg.sliding_window is not None and cfg.sliding_window < max_model_len:
            max_model_len = cfg.sliding_window
            window_note = (f"context capped at the model's sliding window ({cfg.sliding_window} tokens, of "
                           f"max_position_embeddings {cfg.max_position_embeddings}): vajra has no sliding-window "
                           "attention, and within the window full attention is the same")
    if max_model_len <= 0:
        raise InputError(f"max_model_len must be > 0, got {max_model_len}")
    if cfg.sliding_window is not None and max_model_len > cfg.sliding_window:
        raise InputError(f"max_model_len {max_model_len} is longer than the model's sliding window "
                         f"({cfg.sliding_window}): vajra has no sliding-window attention, so longer contexts would "
                         "attend further back than the model was trained to")
    attention = make_backend(attention_backend, device=dev, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim, scale=cfg.head_dim ** -0.5, act_dtype=act_dtype)
    if load_format == "dummy":
        src = _DummySource(cfg, scheme, dev, seed)
        model = _build(cfg, scheme, dev, act_dtype, attention, kv_cache_dtype, linear_backend, max_model_len, dummy=src)
        if window_note:
            model.notes.append(window_note)
        return model
    reader = CheckpointReader(model_dir)
    model = _build(cfg, scheme, dev, act_dtype, attention, kv_cache_dtype, linear_backend, max_model_len, reader=reader)
    if window_note:
        model.notes.append(window_note)
    model.kv_scales = read_kv_scales(reader, cfg.num_layers)
    if model.kv_scales is not None:
        model.notes.append(f"FP8 KV cache scales: per layer from the checkpoint ({cfg.num_layers} layers' "
                           "self_attn k_scale/v_scale)")
    elif isinstance(cfg.quantization_config, dict) and cfg.quantization_config.get("kv_cache_scheme"):
        model.notes.append("the checkpoint declares a kv_cache_scheme but holds no self_attn k_scale/v_scale: an FP8 "
                           "KV cache stores K and V with scale 1.0 (vLLM's default without scales)")
    return model


def read_kv_scales(reader: CheckpointReader, num_layers: int) -> list[tuple[float, float]] | None:
    """Per layer (k_scale, v_scale) of a calibrated FP8 KV cache (``model.layers.N.self_attn.k_scale`` and
    ``v_scale``, as llm-compressor writes them, or one ``kv_scale`` for both, or ``k_proj.output_scale`` and
    ``v_proj.output_scale`` as AutoFP8 and older llm-compressor wrote them, which vLLM maps onto k/v_scale); None
    when the checkpoint has none. Per-head scales [num_kv_heads] become their maximum (a coarser step, never a
    clipped value)."""
    def scale(name: str) -> float:
        t = reader.get(name, torch.device("cpu")).float().reshape(-1)
        if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise InputError(f"tensor {name!r}: a K/V cache scale must be finite and > 0, got {t.tolist()[:8]}")
        return float(t.max())

    p = "model.layers.{}.self_attn."
    has_kv = [reader.has(p.format(i) + "k_scale") for i in range(num_layers)]
    has_one = [reader.has(p.format(i) + "kv_scale") for i in range(num_layers)]
    has_out = [reader.has(p.format(i) + "k_proj.output_scale") for i in range(num_layers)]
    if all(has_kv):
        names = [(p.format(i) + "k_scale", p.format(i) + "v_scale") for i in range(num_layers)]
    elif all(has_one):
        names = [(p.format(i) + "kv_scale",) * 2 for i in range(num_layers)]
    elif all(has_out):
        names = [(p.format(i) + "k_proj.output_scale", p.format(i) + "v_proj.output_scale") for i in range(num_layers)]
    elif any(has_kv) or any(has_one) or any(has_out):  # some layers calibrated, others not: which would they use?
        kind = [(has_kv[i], has_one[i], has_out[i]) for i in range(num_layers)]
        some = next(i for i in range(num_layers) if any(kind[i]))
        lacks = next(i for i in range(num_layers) if not any(kind[i]) or kind[i] != kind[some])
        raise InputError(f"K/V cache scales: layer {some} has them but layer {lacks} has none (or the other kind); "
                         "a calibrated checkpoint has k_scale/v_scale (or kv_scale, or k_proj/v_proj "
                         "output_scale) in every layer")
    else:
        return None
    return [(scale(k), scale(v)) for k, v in names]


def _check_shape(name: str, t, want: tuple[int, ...]) -> None:
    shape = tuple(t.shape) if not isinstance(t, QuantWeight) else t.shape
    if tuple(shape) != tuple(want):
        raise InputError(f"tensor {name!r}: shape {list(shape)} does not match config.json (expected {list(want)})")


def _build(cfg: LlamaConfig, scheme, dev, act_dtype, attention, kv_cache_dtype, linear_backend, max_model_len,
           reader: CheckpointReader | None = None, dummy: _DummySource | None = None) -> LlamaModel:
    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (cfg.q_size, H), "k_proj": (cfg.kv_size, H), "v_proj": (cfg.kv_size, H),
              "o_proj": (H, cfg.q_size), "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}

    def lin(module: str, short: str):
        if dummy is not None:
            return dummy.linear(module, shapes[short], act_dtype)
        w = read_linear(reader, module, scheme, dev, act_dtype)
        _check_shape(f"{module}.weight", w, shapes[short])
        return w

    def vec(name: str, n: int, norm: bool = False) -> torch.Tensor:
        if dummy is not None:
            return dummy.norm(n, act_dtype) if norm else torch.zeros(n, dtype=act_dtype, device=dev)
        t = dense(name)
        _check_shape(name, t, (n,))
        return t.to(act_dtype)

    def dense(name: str) -> torch.Tensor:
        """A tensor that is not a linear layer's weight (embedding, norm, bias, dense lm_head): it must be stored
        as a float; FP8 or integer bytes read as numbers would load silently wrong."""
        dt = reader.dtype_name(name)
        if dt not in FLOAT_NAMES and dt != "F64":
            raise InputError(f"tensor {name!r}: unsupported dtype {dt} (only linear layers may be FP8; this one must "
                             f"be {', '.join(FLOAT_NAMES)})")
        return reader.get(name, dev)

    def bias(module: str, n: int, want: bool):
        name = f"{module}.bias"
        if reader is not None and reader.has(name):
            return vec(name, n)
        if want and dummy is None:
            raise InputError(f"tensor {name!r} is missing (config.json declares biases)")
        return torch.zeros(n, dtype=act_dtype, device=dev) if want else None

    def cat_bias(parts, modules):
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):  # biases on some of the fused shards only
            have = next(m for m, p in zip(modules, parts) if p is not None)
            lack = next(m for m, p in zip(modules, parts) if p is None)
            raise InputError(f"tensor '{lack}.bias' is missing ('{have}.bias' is there; config.json declares no biases)")
        return torch.cat(parts)

    if dummy is not None:
        embed = dummy.dense((cfg.vocab_size, H), act_dtype)
    else:
        embed = dense("model.embed_tokens.weight").to(act_dtype)
        _check_shape("model.embed_tokens.weight", embed, (cfg.vocab_size, H))
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        names = [f"{a}.{s}" for s in ("q_proj", "k_proj", "v_proj")]
        qkv = fuse([lin(n, n.rsplit(".", 1)[1]) for n in names], [n + ".weight" for n in names])
        qkv_b = cat_bias([bias(names[0], cfg.q_size, cfg.qkv_bias), bias(names[1], cfg.kv_size, cfg.qkv_bias),
                          bias(names[2], cfg.kv_size, cfg.qkv_bias)], names)
        gnames = [f"{m}.gate_proj", f"{m}.up_proj"]
        gate_up = fuse([lin(n, n.rsplit(".", 1)[1]) for n in gnames], [n + ".weight" for n in gnames])
        gu_b = cat_bias([bias(gnames[0], I, cfg.mlp_bias), bias(gnames[1], I, cfg.mlp_bias)], gnames)
        layers.append(DecoderLayer(
            input_norm=vec(f"{p}.input_layernorm.weight", H, norm=True),
            qkv=Linear(qkv, qkv_b, act_dtype, linear_backend),
            o=Linear(lin(f"{a}.o_proj", "o_proj"), bias(f"{a}.o_proj", H, cfg.o_bias), act_dtype, linear_backend),
            post_norm=vec(f"{p}.post_attention_layernorm.weight", H, norm=True),
            gate_up=Linear(gate_up, gu_b, act_dtype, linear_backend),
            down=Linear(lin(f"{m}.down_proj", "down_proj"), bias(f"{m}.down_proj", H, cfg.mlp_bias), act_dtype,
                        linear_backend),
        ))
    norm = vec("model.norm.weight", H, norm=True)
    if reader is not None and not cfg.tie_word_embeddings and not reader.has("lm_head.weight"):
        # transformers would give such a model a random head; tying it silently would serve other logits
        raise InputError("tensor 'lm_head.weight' is missing and config.json does not tie the word embeddings "
                         "(tie_word_embeddings is not true)")
    if cfg.tie_word_embeddings:
        head_w = embed
    elif dummy is not None:
        head_w = dummy.dense((cfg.vocab_size, H), act_dtype)
    else:
        # lm_head stays in the activation dtype (usually in the ignore list; FP8 is dequantized)
        head = read_linear(reader, "lm_head", scheme, dev, act_dtype) if reader.dtype_name("lm_head.weight").startswith("F8") \
            else dense("lm_head.weight").to(act_dtype)
        _check_shape("lm_head.weight", head, (cfg.vocab_size, H))
        head_w = head if isinstance(head, torch.Tensor) else Linear(head, None, act_dtype, "dequant").w
    lm_head = Linear(head_w, None, act_dtype)
    quant = None
    if scheme is not None:
        quant = {"method": scheme.method, "weights": scheme.strategy or "tensor", "block": scheme.block,
                 "activations": scheme.act}
    return LlamaModel(cfg, dev, act_dtype, embed, layers, norm, lm_head, attention, kv_cache_dtype, max_model_len, quant)
