"""Data for stitching: a plain-text corpus cut into (prompt, continuation) windows, or a JSONL file
of ``{"prompt": ..., "reference": ...}`` records (summaries, answers).

Tasks on a text corpus (``--task``): ``continue`` (a window's first ``prompt_len`` tokens, then the next
ones) or ``recall``: a window of text whose last part is a passage, then the passage's first ``cue`` tokens
again; the reference is what follows the cue in the passage. The passage starts at a random offset in the
window, so the distance back to it varies and a fixed-offset (positional) copy does not solve the task: it
needs in-context copying by content (an induction circuit, two layers at least). The passage is the text's
tokens in a shuffled order (drawn per window), found nowhere in the corpus: a model that has memorized the
training text cannot predict it from memory, nor a language model from the text's statistics, only by copying
from the prompt. (With the text itself as the passage, a 4-layer model pretrained on repeated text memorized
the text instead of learning to copy; one pretrained on repeated shuffled passages copies those and not natural
text: BENCHMARKS.md.) The passage is only in the prompt, so a decoder can recall it only from the K/V cache it
is handed: the stitched cache must carry the prompt's content. Lengths: the prompt stays ``prompt_len`` tokens
(``prompt_len - cue`` of text, then the cue), ``cue = max(1, prompt_len // 8)``, and the passage holds at least
the cue and the reference.

Text corpora are tokenized once and split by position: the first ``1 - val_fraction`` of the
tokens for training, the rest for evaluation, so evaluation prompts are never trained on.

BOS: every prompt (a text window's and a .jsonl record's) starts with the tokenizer's BOS token when
the tokenizer adds one to an encoded text (Llama's do; :func:`bos_prefix`), ahead of its ``prompt_len``
text tokens: what ``tokenizer(text)`` gives, what real Llama models were trained on, and what a serving
engine that encodes with special tokens (vajra: ``gpulab serve SMALL --prefill stitchkv=RUN``) hands
the prefill provider. Training, eval and serve-disagg therefore see the prompts a served model sees.
Continuations and references never get one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gpulab.core.errors import InputError
from gpulab.core.paths import shared_data

DEFAULT_DATA = shared_data("tinyshakespeare.txt")
TASKS = ("continue", "recall")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def recall_cue(prompt_len: int, cont_len: int) -> tuple[int, int]:
    """(cue length, largest passage offset) of recall prompts of ``prompt_len`` tokens and ``cont_len``
    reference tokens, or a one-line error when the text before the cue cannot hold a cue and the reference."""
    cue = max(1, prompt_len // 8)
    room = prompt_len - 2 * cue
    if room < max(cont_len, 1):
        raise InputError(f"--task recall: a prompt of {prompt_len} tokens (text, then a cue of {cue}) leaves at most "
                         f"{max(room, 0)} tokens to recall, not {cont_len}; raise --prompt-len or lower the "
                         "continuation length")
    return cue, room - cont_len


def recall_window(ids: Any, start: int, offset: int, prompt_len: int, cont_len: int, g: Any) -> tuple[Any, Any]:
    """(prompt, reference) of the recall task: the text at ``start``, whose passage begins ``offset`` tokens in,
    the passage's tokens shuffled by a permutation drawn from the generator ``g`` (see the module docstring)."""
    import torch

    cue, _ = recall_cue(prompt_len, cont_len)
    text = ids[start: start + prompt_len - cue]
    passage = text[offset:][torch.randperm(len(text) - offset, generator=g)]
    return torch.cat([text[:offset], passage, passage[:cue]]), passage[cue: cue + cont_len]


def read_text(path: Path | str) -> str:
    from gpulab.core.files import read_utf8_text

    p = Path(path)
    text = read_utf8_text(p, f"--data {p}")
    if len(text.strip()) == 0:
        raise InputError(f"--data {p}: the file is empty")
    return text


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[BOS id]`` when the tokenizer starts every encoded text with its BOS token (``add_special_tokens``,
    as Llama tokenizers do), else ``[]`` (e.g. Qwen's, or the tiny pair's): the start every prompt gets."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    return [int(bos)] if with_special[:1] == [bos] and without[:1] != [bos] else []


@dataclass
class Corpus:
    """Tokenized data: ``ids`` (a 1-D LongTensor) for .txt, or ``pairs`` (token lists) for .jsonl; ``bos``:
    what every prompt starts with (:func:`bos_prefix`), ahead of its text tokens."""

    path: Path
    ids: Any = None
    split: int = 0
    pairs: list[tuple[list[int], list[int], str]] | None = None  # (prompt ids, reference ids, reference text)
    bos: list[int] = field(default_factory=list)
    task: str = "continue"  # of a text corpus: TASKS

    @property
    def kind(self) -> str:
        return "jsonl" if self.pairs is not None else "text"


VAL_FRACTION = 0.1  # the last tenth of a text corpus (or of a .jsonl file's records) is the evaluation split


def load_corpus(path: Path | str, tokenizer: Any, val_fraction: float = VAL_FRACTION, min_ref: int = 1,
                task: str = "continue") -> Corpus:
    """``min_ref``: the fewest reference tokens a .jsonl record may have (stage 2 needs 2: its loss
    predicts continuation tokens 2..C from token 1). ``task``: how a text corpus is cut (TASKS)."""
    import torch

    p = Path(path)
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    check_task(task)
    if p.suffix == ".jsonl" and task != "continue":
        raise InputError(f"--task {task} cuts a text corpus; {p} is .jsonl, whose records are the task")
    if p.suffix == ".jsonl":
        text = read_text(p)
        pairs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"--data {p}:{i}: malformed JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("reference"), str):
                raise InputError(f"--data {p}:{i}: each line needs string fields 'prompt' and 'reference'")
            pids = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
            rids = tokenizer(rec["reference"], add_special_tokens=False)["input_ids"]
            if not pids or not rids:
                raise InputError(f"--data {p}:{i}: empty prompt or reference after tokenization")
            if len(rids) < min_ref:
                raise InputError(f"--data {p}:{i}: the reference is {len(rids)} token(s); stage 2 needs >= {min_ref} "
                                 "(its loss predicts reference tokens 2..C)")
            pairs.append((pids, rids, rec["reference"]))
        if len(pairs) < 2:
            raise InputError(f"--data {p}: needs at least 2 records, got {len(pairs)}")
        split = max(1, int(round(len(pairs) * (1 - val_fraction))))
        return Corpus(path=p, pairs=pairs, split=min(split, len(pairs) - 1), bos=bos_prefix(tokenizer))
    text = read_text(p)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    split = int(len(ids) * (1 - val_fraction))
    return Corpus(path=p, ids=ids, split=split, bos=bos_prefix(tokenizer), task=task)


def _with_bos(corpus: Corpus, prompts: Any) -> Any:
    """``prompts`` [B, P] (or [P]) with the corpus's BOS in front (unchanged without one)."""
    import torch

    if not corpus.bos:
        return prompts
    bos = torch.tensor(corpus.bos, dtype=prompts.dtype)
    return torch.cat([bos.expand(*prompts.shape[:-1], len(corpus.bos)), prompts], -1)


def _need(corpus: Corpus, n: int, part: str) -> None:
    have = corpus.split if part == "train" else len(corpus.ids) - corpus.split
    if have < n + 1:
        raise InputError(f"--data {corpus.path}: the {part} split has {have} tokens, fewer than one window "
                         f"of {n}; use a longer file or shorter --prompt-len/--cont-len (--gen-len in eval and "
                         "serve-disagg)")


def train_batches(corpus: Corpus, batch: int, prompt_len: int, cont_len: int, seed: int) -> Iterator[tuple[Any, Any]]:
    """Endless (prompt [B, P], continuation [B, C]) batches of random windows of the train split (prompts
    after the corpus's BOS: P = len(bos) + prompt_len, or fewer for a short .jsonl prompt)."""
    import torch

    if batch < 1 or prompt_len < 1 or cont_len < 1:
        raise InputError(f"--batch, --prompt-len and --cont-len must be >= 1 (got {batch}, {prompt_len}, {cont_len})")
    g = torch.Generator().manual_seed(seed)
    if corpus.kind == "jsonl":
        train = corpus.pairs[: corpus.split]
        while True:  # variable lengths: one record per step, prompt/reference cut to the limits
            i = int(torch.randint(len(train), (1,), generator=g))
            pids, rids, _ = train[i]
            yield (torch.tensor([corpus.bos + pids[-prompt_len:]]), torch.tensor([rids[:cont_len]]))
    n = _window_len(corpus, prompt_len, cont_len)
    _need(corpus, n, "train")
    while True:
        starts = torch.randint(0, corpus.split - n, (batch,), generator=g)
        if corpus.task == "recall":
            offsets = torch.randint(0, recall_cue(prompt_len, cont_len)[1] + 1, (batch,), generator=g)
            p, c = zip(*(recall_window(corpus.ids, s, o, prompt_len, cont_len, g)
                         for s, o in zip(starts.tolist(), offsets.tolist())))
            yield _with_bos(corpus, torch.stack(p)), torch.stack(c)
            continue
        w = torch.stack([corpus.ids[s: s + n] for s in starts.tolist()])
        yield _with_bos(corpus, w[:, :prompt_len]), w[:, prompt_len:]


def _window_len(corpus: Corpus, prompt_len: int, cont_len: int) -> int:
    """The corpus tokens one (prompt, continuation) window spans."""
    if corpus.task == "recall":
        return prompt_len - recall_cue(prompt_len, cont_len)[0]
    return prompt_len + cont_len


def eval_room(corpus: Corpus, prompt_len: int, cont_len: int) -> int:
    """How many held-out windows of these lengths the validation split holds without overlap (records of a
    .jsonl corpus)."""
    if corpus.kind == "jsonl":
        return len(corpus.pairs) - corpus.split
    n = _window_len(corpus, prompt_len, cont_len)
    _need(corpus, n, "validation")
    return max((len(corpus.ids) - corpus.split - n) // n, 1)


def eval_windows(corpus: Corpus, n_prompts: int, prompt_len: int, cont_len: int) -> list[tuple[Any, Any]]:
    """Evenly spaced held-out (prompt [P], reference [C]) windows (deterministic; prompts after the corpus's
    BOS, as in :func:`train_batches`)."""
    import torch

    if n_prompts < 1:
        raise InputError(f"--prompts must be >= 1, got {n_prompts}")
    if corpus.kind == "jsonl":
        val = corpus.pairs[corpus.split:][:n_prompts]
        return [(torch.tensor(corpus.bos + p[-prompt_len:]), torch.tensor(r[:cont_len])) for p, r, _ in val]
    fit = eval_room(corpus, prompt_len, cont_len)  # starts span/n_prompts apart: none overlap (they would count twice)
    n = _window_len(corpus, prompt_len, cont_len)
    span = len(corpus.ids) - corpus.split - n
    if n_prompts > fit:
        raise InputError(f"--prompts {n_prompts}: the validation split holds {span + n} tokens, room for {fit} "
                         f"windows of {n} tokens that do not overlap; use at most {fit} prompts (or shorter ones)")
    starts = [corpus.split + (span * i) // max(n_prompts, 1) for i in range(n_prompts)]
    if corpus.task == "recall":  # offsets and shuffles: drawn once, the same for every eval of these lengths
        g = torch.Generator().manual_seed(20261128)
        offsets = torch.randint(0, recall_cue(prompt_len, cont_len)[1] + 1, (n_prompts,), generator=g).tolist()
        return [(_with_bos(corpus, p), c) for p, c in (recall_window(corpus.ids, s, o, prompt_len, cont_len, g)
                                                        for s, o in zip(starts, offsets))]
    return [(_with_bos(corpus, corpus.ids[s: s + prompt_len]), corpus.ids[s + prompt_len: s + n]) for s in starts]
