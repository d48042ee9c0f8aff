"""Tokenizer loading and incremental detokenization with stop strings.

:func:`load_tokenizer` reads the tokenizer of a model folder (``tokenizer.json`` and
``tokenizer_config.json``, as transformers writes them) without any download.
:class:`IncrementalDetokenizer` turns one sequence's new token ids into new text: it decodes a short
window of earlier tokens plus the new ones and emits the difference, holding text back while the
window ends in an incomplete UTF-8 character (``\\ufffd``) — so the streamed pieces always add up to
the full decode. Stop strings end the sequence; the text is cut before the stop string, and while a
stream is running the last ``len(longest stop) - 1`` characters are held back so that a stop
string split over two tokens never reaches the client. With ``min_tokens`` (as vLLM), the text of the first
``min_tokens`` output tokens is not searched for stop strings.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from gpulab.core.errors import InputError

_WINDOW = 5  # earlier tokens decoded with the new ones (context for spaces/merges)


class Tokenizer:
    """A thin wrapper: encode, fast decode (the Rust tokenizer), chat template, eos ids."""

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        self._fast = getattr(hf_tokenizer, "backend_tokenizer", None) or getattr(hf_tokenizer, "_tokenizer", None)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._fast is not None:
            return self._fast.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (OpenAI's logprobs ``bytes``). A token that holds part of a UTF-8 character
        decodes alone to U+FFFD; its bytes are read from its vocabulary piece instead: byte-level BPE's printable
        stand-ins for bytes (GPT-2, Llama 3) or a byte-fallback piece ``<0xNN>`` (SentencePiece). A piece that is
        neither, or whose bytes do not decode to what the tokenizer decodes, gives the decoded text's bytes."""
        text = self.decode([token], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self._fast.id_to_token(token) if self._fast is not None else self.hf.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            table = _byte_level_decoder()
            if piece and all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
                if raw.decode("utf-8", errors="replace") == text:
                    return raw
        return text.encode("utf-8")

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.hf.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.has_chat_template:
            raise InputError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors: bad roles, missing content
            raise InputError(f"the chat template rejected the messages: {str(e).splitlines()[0]}") from None
        # the template already holds the BOS token when the model wants one
        return self.encode(text, add_special_tokens=False)


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's map from the printable character that stands for a byte to the byte (GPT-2's table:
    printable Latin-1 bytes stand for themselves, the others for U+0100 onwards in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def load_tokenizer(model_dir: Path | str) -> Tokenizer:
    """The tokenizer in ``model_dir``; a one-line InputError when there is none or it is malformed."""
    d = Path(model_dir)
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
        raise InputError(f"{d}: no tokenizer (tokenizer.json / tokenizer_config.json) in the model folder")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise InputError(f"{d}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return Tokenizer(tok)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Optional[Tokenizer], prompt_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True, min_tokens: int = 0):
        self.tok = tokenizer
        # as vLLM: the text of the first min_tokens output tokens is never searched for stop strings (a stop string
        # may still begin in it and end in a later token's text)
        self.min_tokens = min_tokens
        self.num_tokens = 0  # output tokens taken
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # output text so far (cut at a stop string)
        self.emitted = 0  # characters of self.text handed out
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped: Optional[str] = None  # the stop string that matched
        self._prefix: Optional[str] = None  # decode of ids[prefix_offset:read_offset], kept until they move

    def _prefix_text(self) -> str:
        if self._prefix is None:
            self._prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        return self._prefix

    def add(self, token_id: int) -> None:
        """Take one new token; updates ``text`` (and ``stopped`` when a stop string appears)."""
        if self.tok is None or self.stopped is not None:
            return
        self.num_tokens += 1
        self.ids.append(int(token_id))
        prefix = self._prefix_text()  # one decode per token: the prefix's text is kept while it is unchanged
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # nothing printable yet (a partial character)
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self._prefix = None
        if len(self.ids) > 4 * _WINDOW:  # keep the window short
            drop = self.prefix_offset
            self.ids = self.ids[drop:]
            self.prefix_offset -= drop
            self.read_offset -= drop
        self._extend(delta)

    def _extend(self, delta: str) -> None:
        """Append ``delta`` to the text and look for a stop string that ends in it (none while the output has no
        more than min_tokens tokens); the text is cut before the earliest."""
        base = len(self.text)
        self.text += delta
        if self.stop and self.num_tokens > self.min_tokens:
            best = None
            for s in self.stop:
                k = self.text.find(s, max(0, base - len(s) + 1))
                if k >= 0 and (best is None or k < best[0]):
                    best = (k, s)
            if best is not None:
                self.text = self.text[:best[0]]
                self.stopped = best[1]

    def flush(self) -> None:
        """At the end: add the text still held back for an incomplete character (as the full decode shows it)."""
        if self.tok is None or self.stopped is not None or self.read_offset == len(self.ids):
            return
        prefix = self._prefix_text()
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix = None
        if len(full) > len(prefix):
            self._extend(full[len(prefix):])  # a stop string in this tail is cut too

    def take(self, finished: bool) -> str:
        """New text to hand out (everything when finished; else all but the held-back tail)."""
        end = len(self.text) if finished or self.stopped is not None else max(self.emitted, len(self.text) - self.hold)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece
