"""The model configuration vajra reads from a Hugging Face ``config.json`` (Llama family).

Handles the transformers 4.x layout (``rope_theta`` + ``rope_scaling``) and the 5.x layout
(``rope_parameters``), Llama 3.x RoPE scaling, tied embeddings, Qwen2-style q/k/v biases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpulab.core.errors import InputError
from gpulab.core.files import read_json_object, read_model_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    model_type: str = "llama"
    name: str = ""
    quantization_config: dict[str, Any] | None = None
    # the attention window of Mistral (sliding_window) and Qwen2 (use_sliding_window, on some layers), None where
    # every layer attends to the whole context; vajra attends to the whole context, so a longer one is refused
    sliding_window: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _req(cfg: dict[str, Any], key: str, where: str, *alts: str) -> Any:
    for k in (key, *alts):
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    raise InputError(f"{where}: missing '{key}'")


def _positive_int(v: Any, key: str, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise InputError(f"{where}: '{key}' must be a positive integer, got {v!r}")
    return v


def _flag(cfg: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    """A JSON boolean (null: the default): bool("false") would be True."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InputError(f"{where}: '{key}' must be true or false, got {v!r}")
    return v


def _number(cfg: dict[str, Any], key: str, where: str, default: float, positive: bool = True) -> float:
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (positive and not v > 0):
        raise InputError(f"{where}: '{key}' must be a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def json_object(v: Any, what: str, where: str) -> dict[str, Any]:
    """A JSON object of a config (None: empty), or a one-line error naming ``what`` in ``where``."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise InputError(f"{where}: {what} must be an object, got {type(v).__name__}")
    return v


def eos_token_ids(cfg: dict[str, Any], where: str) -> tuple[int, ...]:
    """``eos_token_id`` of a config.json or generation_config.json: one token id, a list of them, or absent."""
    eos = cfg.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos_list):
        raise InputError(f"{where}: 'eos_token_id' must be a token id or a list of them, got {eos!r}")
    return tuple(eos_list)


def parse_config(cfg: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Validate a config.json dict and return a :class:`LlamaConfig` (one-line errors)."""
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: expected a JSON object")
    mt = cfg.get("model_type", "llama")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise InputError(f"{where}: hidden_act {act!r} is not supported (Llama family uses silu)")
    hidden = _positive_int(_req(cfg, "hidden_size", where), "hidden_size", where)
    heads = _positive_int(_req(cfg, "num_attention_heads", where), "num_attention_heads", where)
    kv_heads = _positive_int(cfg.get("num_key_value_heads") or heads, "num_key_value_heads", where)
    if heads % kv_heads:
        raise InputError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = cfg.get("head_dim") or hidden // heads
    head_dim = _positive_int(head_dim, "head_dim", where)
    rope = json_object(cfg.get("rope_parameters"), "'rope_parameters'", where)
    theta = _number(rope, "rope_theta", where, _number(cfg, "rope_theta", where, 10000.0))
    scaling = (json_object(cfg.get("rope_scaling"), "'rope_scaling'", where)
               or (rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None))
    if scaling:
        rt = scaling.get("rope_type", scaling.get("type", "default"))
        if rt not in ("default", "llama3", "linear"):
            raise InputError(f"{where}: rope scaling type {rt!r} is not supported (default, linear, llama3)")
        if rt == "default":
            scaling = None
        else:
            scaling = dict(scaling, rope_type=rt)
            f = scaling.get("factor")
            if not isinstance(f, (int, float)) or isinstance(f, bool) or not f > 0:
                raise InputError(f"{where}: rope scaling {rt!r} needs a 'factor' > 0, got {f!r}")
            if rt == "llama3":  # read as numbers when the model is built: a string there was a traceback
                for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key in scaling and scaling[key] is None:
                        raise InputError(f"{where}: '{key}' must be a positive number, got None")
                    _number(scaling, key, where, 1.0)
    eos_ids = eos_token_ids(cfg, where)
    mpe = cfg.get("max_position_embeddings")
    max_pos = 4096 if mpe is None else _positive_int(mpe, "max_position_embeddings", where)
    bias = _flag(cfg, "attention_bias", where)
    qc = cfg.get("quantization_config") or cfg.get("compression_config")
    return LlamaConfig(
        vocab_size=_positive_int(_req(cfg, "vocab_size", where), "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_positive_int(_req(cfg, "intermediate_size", where), "intermediate_size", where),
        num_layers=_positive_int(_req(cfg, "num_hidden_layers", where), "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_number(cfg, "rms_norm_eps", where, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=_flag(cfg, "tie_word_embeddings", where),
        qkv_bias=bias or mt == "qwen2",
        o_bias=bias and mt != "qwen2",
        mlp_bias=_flag(cfg, "mlp_bias", where),
        eos_token_ids=eos_ids,
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        model_type=mt,
        name=str(cfg.get("_name_or_path", "")),
        quantization_config=qc,
        sliding_window=_sliding_window(cfg, mt, where),
        raw=cfg,
    )


def _sliding_window(cfg: dict[str, Any], mt: str, where: str) -> int | None:
    """The attention window some layers use (transformers' semantics), or None: Mistral's ``sliding_window``;
    Qwen2's when ``use_sliding_window`` is true and some layer is at or above ``max_window_layers``."""
    w = cfg.get("sliding_window")
    if w is None:
        return None
    if mt == "qwen2":
        layers = cfg.get("num_hidden_layers", 0)
        if not _flag(cfg, "use_sliding_window", where):
            return None
        mwl = cfg.get("max_window_layers", layers)
        if not isinstance(mwl, int) or isinstance(mwl, bool) or mwl < 0:
            raise InputError(f"{where}: 'max_window_layers' must be a non-negative integer, got {mwl!r}")
        if mwl >= layers:
            return None
    elif mt not in ("mistral",):
        return None
    return _positive_int(w, "sliding_window", where)


def read_config(model_dir: Path | str) -> LlamaConfig:
    p = Path(model_dir)
    c = parse_config(read_model_config(p), where=str(p / "config.json"))
    if not c.name:
        c.name = p.name
    # generation_config.json's eos_token_id stops generation too (as in transformers' generate and vLLM): a chat
    # model's end-of-turn token is often listed there only, and without it a reply would run on to max_tokens
    g = p / "generation_config.json"
    if g.is_file():
        gen = read_json_object(g, str(g))
        c.eos_token_ids = tuple(dict.fromkeys(c.eos_token_ids + eos_token_ids(gen, str(g))))
    return c


def rope_inv_freq(cfg: LlamaConfig):
    """Inverse frequencies [head_dim/2] (float32 math, as transformers), with llama3/linear scaling."""
    import torch

    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))
    s = cfg.rope_scaling
    if s and s["rope_type"] == "llama3":
        factor = float(s["factor"])
        lo = float(s.get("low_freq_factor", 1.0))
        hi = float(s.get("high_freq_factor", 4.0))
        old = float(s.get("original_max_position_embeddings", 8192))
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        inv = torch.where(medium, smoothed, out)
    elif s and s["rope_type"] == "linear":
        inv = inv / float(s["factor"])
    return inv.to(torch.float32)
