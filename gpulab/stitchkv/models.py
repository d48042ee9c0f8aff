"""Model pairs: loading and validating a (large, small) pair of Hugging Face causal LMs, the
accessors the stitch code needs (decoder layers, rotary embedding, cache keyword), and the tiny
from-scratch Llama pair with one shared byte-level BPE tokenizer (``gpulab kvstitch pretrain``).

Supported families are the ones whose attention is Llama-style (``k_proj``/``v_proj`` Linear
layers, optional per-head ``k_norm``, rotate-half RoPE applied to keys before they enter the
cache): llama (Llama 2/3, Llama-fied Minitron), qwen2, qwen3, mistral, and nemotron (Minitron-8B/4B-Base:
LayerNorm1P, RoPE on the first ``partial_rotary_factor`` of each head only). Other model types are a
one-line InputError.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpulab.core.errors import InputError
from gpulab.core.files import read_model_config

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral", "nemotron")


# --------------------------------------------------------------------------- accessors
def base_model(model: Any) -> Any:
    """The *ForCausalLM under a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def decoder_layers(model: Any) -> Any:
    return base_model(model).model.layers


def rotary(model: Any) -> Any:
    return base_model(model).model.rotary_emb


def cache_kwarg(model: Any) -> str:
    """transformers >= 5.2x calls the cache argument ``cache``; earlier releases ``past_key_values``."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None)


def check_lengths(configs: list[tuple[str, Any]], length: int) -> None:
    """Sequences of ``length`` tokens against each (role, model config): past the context
    (max_position_embeddings) a model runs at positions it was never trained on; and a sliding-window model keeps
    only its window's last keys in its own cache, while a stitched cache keeps every prompt position, so the two
    differ once a sequence reaches the window. Both are refused."""
    for role, c in configs:
        ctx = getattr(c, "max_position_embeddings", None)
        if isinstance(ctx, int) and not isinstance(ctx, bool) and length > ctx:
            raise InputError(f"the --{role} model's context is {ctx} tokens, and these sequences reach {length} "
                             "(shorten the prompt and continuation)")
        w = getattr(c, "sliding_window", None)
        if not w or (getattr(c, "model_type", "") == "qwen2" and not getattr(c, "use_sliding_window", False)):
            continue
        if length >= int(w):
            raise InputError(f"the --{role} model attends over a sliding window of {w} tokens, and these sequences "
                             f"reach {length}: stitched caches are only exact within the window (shorten the "
                             "prompt and continuation)")


def check_length(pair: Any, length: int) -> None:
    """:func:`check_lengths` for a loaded pair."""
    check_lengths([(role, base_model(m).config) for role, m in (("large", pair.large), ("small", pair.small))],
                  length)


def load_config(folder: Path, role: str) -> Any:
    """A model folder's config.json, without its weights, as attributes (a key it leaves out is None: no check)."""
    from types import SimpleNamespace

    return SimpleNamespace(**read_model_config(folder, f"--{role}"))


def shape_of(model: Any) -> dict[str, int]:
    """Layer count, hidden size, KV heads and head_dim of a causal LM."""
    cfg = base_model(model).config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "layers": int(cfg.num_hidden_layers),
        "hidden": int(cfg.hidden_size),
        "heads": int(heads),
        "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "vocab": int(cfg.vocab_size),
    }


# --------------------------------------------------------------------------- loading and validation
def _read_config(folder: Path, role: str) -> dict[str, Any]:
    data = read_model_config(folder, f"--{role}")
    mtype = data.get("model_type")
    if mtype not in SUPPORTED_TYPES:
        raise InputError(f"--{role} {folder}: model_type {mtype!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise InputError(f"--{role} {folder}: no weights (*.safetensors or *.bin)")
    return data


def load_tokenizer(folder: Path, role: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad folder
        msg = str(e).strip().splitlines()
        raise InputError(f"--{role} {folder}: no usable tokenizer ({msg[0] if msg else type(e).__name__})") from None


TOKENIZER_PROBES = ("Hello, world!", " a leading space", "To be, or not to be: that is the question.",
                    "na\u00efve caf\u00e9 \u2014 \u6771\u4eac 123.45", "\tTabs\nnewlines  and  double  spaces",
                    "ALLCAPS lowercase MiXeD", "emoji \U0001F642 #@$% 0xFF")


def check_shared_tokenizer(tok_large: Any, tok_small: Any, large: Path, small: Path) -> None:
    """A pair must tokenize identically: same vocabulary (token -> id) and special tokens."""
    vl, vs = tok_large.get_vocab(), tok_small.get_vocab()
    if vl != vs:
        only = sorted(set(vl.items()) ^ set(vs.items()))
        example = f"; e.g. {only[0][0]!r}" if only else ""
        raise InputError(f"{large} and {small} do not share a tokenizer "
                         f"({len(vl)} vs {len(vs)} tokens, {len(only)} entries differ{example})")
    if (tok_large.bos_token_id, tok_large.eos_token_id) != (tok_small.bos_token_id, tok_small.eos_token_id):
        raise InputError(f"{large} and {small} do not share a tokenizer (different bos/eos token ids)")
    from gpulab.stitchkv.data import bos_prefix

    if bos_prefix(tok_large) != bos_prefix(tok_small):  # the served (small) model's tokenizer starts the prompts
        raise InputError(f"{large} and {small} do not share a tokenizer (one starts an encoded text with its BOS "
                         "token, the other does not)")
    for text in TOKENIZER_PROBES:  # same vocabulary, other merges, normalizer or pre-tokenizer: other ids
        a = tok_large.encode(text, add_special_tokens=False)
        b = tok_small.encode(text, add_special_tokens=False)
        if a != b:
            raise InputError(f"{large} and {small} do not share a tokenizer (same vocabulary, but they encode "
                             f"{text!r} differently: {a[:8]} vs {b[:8]})")


@dataclass
class Pair:
    large: Any
    small: Any
    tokenizer: Any
    large_path: Path
    small_path: Path


def load_pair(large: Path | str, small: Path | str, device: str = "cpu", dtype: str = "float32") -> Pair:
    """Load and validate a pair; every problem is a one-line InputError naming it."""
    large, small = Path(large), Path(small)
    cl = _read_config(large, "large")
    cs = _read_config(small, "small")
    tl, ts = load_tokenizer(large, "large"), load_tokenizer(small, "small")
    check_shared_tokenizer(tl, ts, large, small)
    if cl.get("vocab_size") != cs.get("vocab_size"):
        raise InputError(f"{large} and {small}: vocab_size differs ({cl.get('vocab_size')} vs {cs.get('vocab_size')})")
    models = [load_model(large, "large", device, dtype, checked=True), load_model(small, "small", device, dtype, checked=True)]
    return Pair(large=models[0], small=models[1], tokenizer=tl, large_path=large, small_path=small)


def dtype_kwarg() -> str:
    """The ``from_pretrained`` keyword of the weights' dtype: ``dtype`` from transformers 4.56 on, ``torch_dtype``
    before (where an unknown ``dtype`` reaches the model's ``__init__``: TypeError)."""
    import transformers

    from gpulab.core.device import version_release

    return "dtype" if version_release(transformers.__version__) >= (4, 56) else "torch_dtype"


def load_model(folder: Path | str, role: str, device: str = "cpu", dtype: str = "float32", checked: bool = False) -> Any:
    """One frozen causal LM in eval mode (``checked``: the folder was already validated)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not checked:
        _read_config(folder, role)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise InputError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    try:
        m = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **{dtype_kwarg(): torch_dtype})
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        raise InputError(f"--{role} {folder}: cannot load the model ({msg[0] if msg else type(e).__name__})") from None
    m.config._attn_implementation = "sdpa"
    m = m.to(device).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


# --------------------------------------------------------------------------- tiny pair (from scratch)
TINY_SIZES: dict[str, dict[str, int]] = {
    # name: hidden, layers, heads, kv_heads, intermediate
    "nano-large": dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128),
    "nano-small": dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64),
    "tiny-large": dict(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=768),
    "tiny-small": dict(hidden=128, layers=3, heads=4, kv_heads=2, intermediate=384),
    # the recall pair: four layers against one (one layer cannot form an induction circuit: the small model
    # cannot copy from its own cache, only from a handed-over one whose keys already hold the context)
    "tiny-medium": dict(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512),
    "tiny-1layer": dict(hidden=128, layers=1, heads=4, kv_heads=2, intermediate=384),
}


def check_vocab(vocab_size: int) -> None:
    if vocab_size < 260:
        raise InputError(f"--vocab must be >= 260 (256 bytes + specials), got {vocab_size}")


def train_tokenizer(text: str, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on ``text`` in code (no download), as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    check_vocab(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|eos|>", clean_up_tokenization_spaces=False)


def tiny_llama(size: str | dict[str, int], vocab_size: int, max_len: int, seed: int, rope_theta: float = 10000.0) -> Any:
    """A random-init LlamaForCausalLM of one of :data:`TINY_SIZES` (or an explicit shape dict)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = TINY_SIZES[size] if isinstance(size, str) else size
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=max_len,
                      rope_theta=rope_theta, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                      pad_token_id=1, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save_model(model: Any, tokenizer: Any, folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """save_pretrained into a temporary sibling folder, then rename (no half-written model folders); ``extra``:
    file name -> mapping written beside the model as YAML (e.g. the export's marker)."""
    from gpulab.core import atomic
    from gpulab.core.results import yaml_text

    folder = Path(folder)
    with atomic.build_folder(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        for name, data in (extra or {}).items():
            (tmp / name).write_text(yaml_text(data))
    return folder
