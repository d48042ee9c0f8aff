"""Write experiments/assets/tiny-llama: a tiny Llama config and a byte-level BPE tokenizer trained here.

    python experiments/assets/make_tiny_llama.py [--text ../shared/data/tinyshakespeare.txt] [--out DIR]

No weights are written: the smoke run loads the folder with ``--load-format dummy`` (random weights),
and tests save random-init weights next to a copy of these files. Everything is deterministic.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
FALLBACK_TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
    "You are all resolved rather to die than to famish? Resolved. resolved. "
) * 50


def train_tokenizer(text: str, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                       special_tokens=[("<|bos|>", bos)])
    return tok


def write_assets(out: Path, text: str, vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, max_pos: int = 512) -> Path:
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(text, vocab_size)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                 pad_token="<|pad|>", model_max_length=max_pos)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": hidden * 3,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": tok.token_to_id("<|bos|>"),
        "eos_token_id": tok.token_to_id("<|eos|>"),
        "pad_token_id": tok.token_to_id("<|pad|>"),
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    ap.add_argument("--text", type=Path, default=here.parents[2] / "shared" / "data" / "tinyshakespeare.txt")
    ap.add_argument("--out", type=Path, default=here / "tiny-llama")
    args = ap.parse_args()
    text = args.text.read_text()[:300_000] if args.text.is_file() else FALLBACK_TEXT
    print(write_assets(args.out, text))


if __name__ == "__main__":
    main()
