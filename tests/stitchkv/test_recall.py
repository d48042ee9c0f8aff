"""The recall task (a passage, then its first quarter again; the reference is the rest of the passage) and the
repeated-passage pretraining windows that teach in-context copying."""
from __future__ import annotations

import pytest
import torch
import yaml

from gpulab.core.errors import InputError
from gpulab.stitchkv import data as D
from gpulab.stitchkv.pretrain import lm_batches
from tests.stitchkv.test_cli import one_line_error, run_cli


def _find(ids: torch.Tensor, piece: torch.Tensor, lo: int, hi: int) -> int:
    """Where ``piece`` starts in ids[lo:hi] (-1: nowhere)."""
    n = len(piece)
    for s in range(lo, hi - n + 1):
        if torch.equal(ids[s: s + n], piece):
            return s
    return -1


def _source(ids: torch.Tensor, text: torch.Tensor, offset: int, lo: int, hi: int) -> int:
    """Where in ids[lo:hi] ``text`` comes from: the corpus verbatim up to ``offset``, then the rest of the window
    in another order (-1: nowhere)."""
    n, tail = len(text), text[offset:].sort().values
    for s in range(lo, hi - n + 1):
        if torch.equal(ids[s: s + offset], text[:offset]) and torch.equal(ids[s + offset: s + n].sort().values, tail):
            return s
    return -1


@pytest.mark.parametrize("prompt_len,cont_len", [(32, 8), (27, 5), (4, 2)])
def test_recall_windows_repeat_a_passage_start_and_continue_it(corpus_file, tokenizer, prompt_len, cont_len):
    corpus = D.load_corpus(corpus_file, tokenizer, task="recall")
    cue, most = D.recall_cue(prompt_len, cont_len)
    assert cue == max(1, prompt_len // 8) and most == prompt_len - 2 * cue - cont_len
    windows = D.eval_windows(corpus, 12, prompt_len, cont_len)
    again = D.eval_windows(corpus, 12, prompt_len, cont_len)
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(windows, again))  # deterministic
    batches = next(D.train_batches(corpus, 12, prompt_len, cont_len, seed=3))
    cases = [(p, c, corpus.split, len(corpus.ids)) for p, c in windows]
    cases += [(p, c, 0, corpus.split) for p, c in zip(*batches)]
    offsets, shuffled = set(), 0
    for p, c, lo, hi in cases:
        assert len(p) == prompt_len and len(c) == cont_len
        text = p[: prompt_len - cue]
        # the cue repeats the start of a passage at some offset; the reference is what follows it there
        found = [o for o in range(most + 1) if torch.equal(text[o: o + cue], p[prompt_len - cue:])
                 and torch.equal(text[o + cue: o + cue + cont_len], c)
                 and _source(corpus.ids, text, o, lo, hi) >= 0]  # text of its own split (validation never trained)
        assert found, (p, c)
        o = found[0]
        offsets.add(o)
        shuffled += _find(corpus.ids, text[o:], lo, hi) < 0  # the passage: the text's tokens in another order
    assert most == 0 or len(offsets) > 1  # the distance back to the passage varies
    assert shuffled > len(cases) * 3 // 4  # (a short passage can keep its order, or recur in the corpus)


def test_recall_lengths_and_data_are_checked(corpus_file, tokenizer, tmp_path):
    corpus = D.load_corpus(corpus_file, tokenizer, task="recall")
    with pytest.raises(InputError, match="at most 12 tokens to recall, not 13"):
        D.eval_windows(corpus, 2, 16, 13)
    with pytest.raises(InputError, match="a prompt of 3 tokens"):
        next(D.train_batches(corpus, 2, 3, 2, seed=0))
    with pytest.raises(InputError, match="--task must be one of continue, recall"):
        D.load_corpus(corpus_file, tokenizer, task="copy")
    j = tmp_path / "pairs.jsonl"
    j.write_text('{"prompt": "a b", "reference": "c d"}\n' * 3)
    with pytest.raises(InputError, match="cuts a text corpus"):
        D.load_corpus(j, tokenizer, task="recall")


def test_continue_windows_are_unchanged_by_the_task_field(corpus_file, tokenizer):
    plain = D.load_corpus(corpus_file, tokenizer)
    assert plain.task == "continue"
    p, c = D.eval_windows(plain, 1, 10, 4)[0]
    assert torch.equal(torch.cat([p, c]), plain.ids[plain.split: plain.split + 14])


def test_repeat_windows_teach_copying():
    ids = torch.arange(1000)
    seq = 23
    n = seq + 1

    def repeat_len(row):  # the passage length h with row[-h:] == row[-2h:-h], if any
        return next((h for h in range(n // 4, n // 2 + 1) if torch.equal(row[n - h:], row[n - 2 * h: n - h])), None)

    plain = next(lm_batches(ids, 0, 1000, 64, seq, seed=5))
    assert torch.equal(plain, next(lm_batches(ids, 0, 1000, 64, seq, seed=5, repeat_frac=0.0)))  # same draws
    every = next(lm_batches(ids, 0, 1000, 64, seq, seed=5, repeat_frac=1.0))
    assert every.shape == (64, n)
    lens = [repeat_len(r) for r in every]
    assert None not in lens and len(set(lens)) > 3  # passages of several lengths: the distance back varies
    moved = 0
    for row, h, orig in zip(every, lens, plain):
        assert torch.equal(row[: n - 2 * h], orig[: n - 2 * h])  # text, then the passage, then the passage again
        passage = row[n - 2 * h: n - h]
        assert torch.equal(passage.sort().values, orig[n - 2 * h: n - h].sort().values)  # the text's tokens ...
        moved += not torch.equal(passage, orig[n - 2 * h: n - h])  # ... in another order (not memorizable)
    assert moved > 60
    some = next(lm_batches(ids, 0, 1000, 64, seq, seed=5, repeat_frac=0.5))
    contiguous = (some[:, 1:] - some[:, :-1] == 1).all(1)
    repeated = torch.tensor([repeat_len(r) is not None for r in some])
    assert (repeated ^ contiguous).all() and 10 < int(repeated.sum()) < 54
    with pytest.raises(InputError, match="--repeat-frac"):
        next(lm_batches(ids, 0, 1000, 4, seq, seed=0, repeat_frac=1.5))


def test_train_and_eval_on_the_recall_task(pair_dirs, corpus_file, tmp_path, capsys):
    large, small = pair_dirs
    res, run = tmp_path / "results", tmp_path / "run"
    common = ["--out", str(res), "kvstitch", "train", "--large", str(large), "--small", str(small), "--data",
              str(corpus_file), "--run", str(run), "--stage", "all", "--steps", "2", "--lora-steps", "2",
              "--batch", "2", "--prompt-len", "16", "--cont-len", "8", "--ckpt-every", "0", "--no-lora-control"]
    code, _, err = run_cli([*common, "--task", "recall"], capsys)
    assert code == 0, err
    assert yaml.safe_load((run / "run.yaml").read_text())["task"] == "recall"
    code, _, err = run_cli(["--out", str(res), "kvstitch", "eval", "--run", str(run), "--prompts", "3",
                            "--gen-len", "6", "--batch", "3"], capsys)
    assert code == 0, err
    rec = yaml.safe_load(next(res.glob("kvstitch-eval-*.yaml")).read_text())
    assert rec["ok"] is True and rec["config"]["task"] == "recall"
    # the finished stages were trained on recall prompts: reusing them for another task is refused
    code, _, err = run_cli(common, capsys)
    one_line_error(code, err, "task='recall'", "not 'continue'")
    code, _, err = run_cli([*common, "--task", "summarize"], capsys)
    one_line_error(code, err, "--task must be one of")
    # eval cuts recall prompts of --gen-len tokens to recall: too many for the prompt is a one-line error
    code, _, err = run_cli(["--out", str(res), "kvstitch", "eval", "--run", str(run), "--prompts", "3",
                            "--gen-len", "13"], capsys)
    one_line_error(code, err, "at most 12 tokens to recall")


def test_train_windows_stay_inside_the_train_split():
    """Every training window (prompt and continuation) lies in ids[:split]: none reaches into the eval split."""
    from pathlib import Path

    ids = torch.arange(1000)
    for task in ("continue", "recall"):
        corpus = D.Corpus(path=Path("x.txt"), ids=ids, split=900, task=task)
        it = D.train_batches(corpus, 64, 16, 4, seed=0)
        for _ in range(30):
            p, c = next(it)
            assert int(p.max()) < 900 and int(c.max()) < 900, task
