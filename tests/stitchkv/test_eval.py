"""kvstitch eval: ROUGE scores the text up to EOS, a stale LoRA control is left out, short prompts work,
the interpolation flag needs a gap, and prompts start with BOS as a served model's do."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from gpulab.core.errors import InputError
from gpulab.stitchkv import data as D
from gpulab.stitchkv import evaluate as E
from gpulab.stitchkv import generate as G
from tests.stitchkv.conftest import LARGE, SMALL, synthetic_text
from tests.stitchkv.test_cli import one_line_error, run_cli
from tests.stitchkv.test_train import cfg_for


def test_until_eos_and_eos_ids(models, tokenizer):
    assert G.until_eos([5, 7, 9, 7], {9}) == [5, 7] and G.until_eos([5, 7], {9}) == [5, 7]
    assert G.until_eos([9, 5], {1, 9}) == []
    _, small = models
    small.generation_config.eos_token_id = [1, 42]  # e.g. Llama-3 instruct: <|eot_id|> ends a turn too
    assert G.eos_ids(tokenizer, small) == {tokenizer.eos_token_id, 1, 42}


def test_rouge_scores_the_continuation_up_to_its_first_eos(models, tokenizer, monkeypatch):
    """The decode loop runs --gen-len steps whatever it generates; ROUGE must score the text before the first
    EOS (a model that answers, ends and babbles on is scored on its answer)."""
    _, small = models
    answer = tokenizer("the king", add_special_tokens=False)["input_ids"]
    junk = tokenizer(" sword blood death night", add_special_tokens=False)["input_ids"]
    script = answer + [tokenizer.eos_token_id] + junk
    no_eos = answer + junk[:1 + len(junk) // 2]
    rows = torch.tensor([script, (no_eos + junk)[:len(script)]])
    monkeypatch.setattr(G, "greedy", lambda model, prompt, n: G.Generation(rows[:, :n], 1.0, [1.0], 8))
    prompts, refs = torch.randint(2, 300, (2, 5)), torch.tensor([answer + answer] * 2)[:, :4]
    pair = type("P", (), {"large": small, "small": small})()
    row, samples, items, _ = E.run_variant("small", pair, small, None, [(prompts, refs, [0, 1])], tokenizer,
                                           ["the king", "the king"], len(script), "cpu")
    assert samples[0] == "the king"  # nothing of what follows the EOS
    assert samples[1] == tokenizer.decode(rows[1].tolist(), skip_special_tokens=True)  # no EOS: all of it
    assert items[0] == 1.0 and items[1] == pytest.approx(E.rouge_scores([samples[1]], ["the king"])["rougeL"])
    assert items[1] < 1.0 and row["rougeL"] == pytest.approx((1.0 + items[1]) / 2)


@pytest.mark.parametrize("sm,lg,st,want", [(0.0, 0.0, 0.0, False), (0.2, 0.2, 0.2, False), (0.1, 0.3, 0.2, True),
                                           (0.3, 0.1, 0.1, True), (0.1, 0.3, 0.35, False), (0.1, 0.3, 0.05, False)])
def test_interpolation_needs_a_gap(sm, lg, st, want):
    assert E.interpolates(sm, lg, st) is want


def _control_run(pair_dirs, corpus_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("ctl") / "run"
    from gpulab.stitchkv import train as T

    T.train(cfg_for(pair_dirs, corpus_file, run, stage="all", steps=1, lora_steps=1, lora_control=True), "cpu",
            log=lambda m: None)
    return run


def test_control_of_other_settings_is_left_out(pair_dirs, corpus_file, tmp_path_factory, tmp_path):
    """eval compares stitched-lora with the control only when run.yaml says both were trained alike."""
    run = _control_run(pair_dirs, corpus_file, tmp_path_factory)
    cfg = yaml.safe_load((run / "run.yaml").read_text())
    assert E.control_mismatch(cfg, True) is None
    assert "not trained" in E.control_mismatch(cfg, False)
    stale = {**cfg, "trained": {**cfg["trained"], "lora_control": {**cfg["trained"]["lora_control"], "lora_r": 8}}}
    assert E.control_mismatch(stale, True) == ("it was trained with lora_r=8, stage 2 with lora_r=4 (retrain with "
                                               "--stage lora)")
    gone = {**cfg, "trained": {k: v for k, v in cfg["trained"].items() if k != "lora_control"}}
    assert "does not record the control's" in E.control_mismatch(gone, True)
    (run / "run.yaml").write_text(yaml.safe_dump(stale))
    rec = E.evaluate(run, "cpu", 2, 8, 3, 2, log=lambda m: None)
    assert {r["variant"] for r in rec.rows} == {"small", "large", "stitched-warmup", "stitched-lora"}
    assert any("lora-control left out (no small-lora row): it was trained with lora_r=8" in n for n in rec.notes)
    assert "stitch_gain_nll_after_tok1_over_lora_control" not in rec.summary


def test_one_token_prompts_evaluate(tiny_run, tmp_path, capsys, models):
    """Training accepts --prompt-len 1, and so does eval (its cached-decode check extends the prompt by the
    model's own next token)."""
    _, small = models
    ok, det = E.cache_decode_check(small, torch.tensor([[5], [7]]))
    assert ok and det["logit_max_abs_diff"] <= det["tol"]
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "eval", "--run", str(tiny_run), "--prompts",
                            "2", "--gen-len", "3", "--batch", "2", "--prompt-len", "1"], capsys)
    assert code == 0, err
    rec = yaml.safe_load(next((tmp_path / "res").glob("kvstitch-eval-*.yaml")).read_text())
    assert rec["ok"] and rec["config"]["prompt_len"] == 1


def test_serve_disagg_checks_the_data_before_starting_ranks(tiny_run, tmp_path, capsys):
    from gpulab.stitchkv import disagg

    with pytest.raises(InputError, match="--prompts 100000: the validation split holds"):
        disagg.validate(tiny_run, "auto", 100000, 4, 2, 8)
    for opts, message in ((["--prompts", "100000", "--prompt-len", "8"], "--prompts 100000: the validation split"),
                          (["--prompt-len", "100000"], "model's context is 256 tokens, and these sequences reach")):
        code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "serve-disagg", "--run", str(tiny_run),
                                *opts, "--timeout", "30"], capsys)
        one_line_error(code, err, message)
        assert "gloo" not in err and "torchrun" not in err and not (tmp_path / "res").exists()


def _bos_pair(root):
    """The conftest pair's models with a tokenizer that starts every encoded text with <|bos|> (as Llama's)."""
    from tokenizers import processors

    from gpulab.stitchkv.models import save_model, tiny_llama, train_tokenizer

    tok = train_tokenizer(synthetic_text(), vocab_size=300)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", tok.bos_token_id)])
    save_model(tiny_llama(LARGE, len(tok), 256, seed=1, rope_theta=10000.0), tok, root / "large")
    save_model(tiny_llama(SMALL, len(tok), 256, seed=2, rope_theta=500.0), tok, root / "small")
    return root / "large", root / "small"


def test_prompts_start_with_bos_like_the_served_model_s(tmp_path, pair_dirs):
    """With a tokenizer that adds BOS, kvstitch's training and eval prompts are exactly the ids vajra encodes a
    prompt text to (and hands the stitchkv provider); a tokenizer without one leaves prompts as they were."""
    from gpulab.stitchkv import train as T
    from gpulab.stitchkv.models import check_shared_tokenizer, load_tokenizer
    from gpulab.vajra.detokenizer import load_tokenizer as vajra_tokenizer

    large, small = _bos_pair(tmp_path / "pair")
    tok = load_tokenizer(large, "large")
    assert D.bos_prefix(tok) == [tok.bos_token_id] and D.bos_prefix(load_tokenizer(pair_dirs[0], "large")) == []
    with pytest.raises(InputError, match="one starts an encoded text with its BOS token"):
        check_shared_tokenizer(tok, load_tokenizer(pair_dirs[1], "small"), large, pair_dirs[1])
    served = vajra_tokenizer(small)  # what `gpulab serve SMALL --prefill stitchkv=RUN` encodes a prompt with
    recs = [{"prompt": f"the king {i} and the queen of night", "reference": f"speak {i} of love"} for i in range(6)]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    corpus = D.load_corpus(j, tok)
    (p, r), = D.eval_windows(corpus, 4, 64, 8)
    assert p.tolist() == served.encode(recs[-1]["prompt"]) and p[0] == tok.bos_token_id
    assert r.tolist() == tok(recs[-1]["reference"], add_special_tokens=False)["input_ids"]  # no BOS
    p3, _ = D.eval_windows(corpus, 1, 3, 8)[0]  # the last 3 text tokens after BOS
    assert p3.tolist() == [tok.bos_token_id] + served.encode(recs[-1]["prompt"])[-3:]
    for i, (p, _) in zip(range(3), D.train_batches(corpus, 2, 64, 4, 0)):
        assert p[0].tolist() in [served.encode(x["prompt"]) for x in recs[:corpus.split]]
    # a text corpus: each window's prompt is BOS + its prompt_len tokens of the stream
    txt = tmp_path / "c.txt"
    txt.write_text(synthetic_text(200))
    tc = D.load_corpus(txt, tok)
    p, c = next(D.train_batches(tc, 3, 6, 4, 0))
    assert p.shape == (3, 7) and c.shape == (3, 4) and (p[:, 0] == tok.bos_token_id).all()
    assert all(int(x) != tok.bos_token_id for x in tc.ids)  # the stream itself carries none
    (wp, wr), = D.eval_windows(tc, 1, 6, 4)
    assert wp.tolist() == [tok.bos_token_id] + tc.ids[tc.split: tc.split + 6].tolist()
    # training records it; eval of that run says nothing about it
    run = tmp_path / "run"
    T.train(cfg_for((large, small), j, run, steps=1, batch=2), "cpu", log=lambda m: None)
    cfg = yaml.safe_load((run / "run.yaml").read_text())
    assert cfg["prompt_bos"] == [tok.bos_token_id] and cfg["trained"]["warmup"]["prompt_bos"] == [tok.bos_token_id]
    assert E.prompt_bos_note(cfg, [tok.bos_token_id]) is None
    assert "trained before kvstitch started prompts" in E.prompt_bos_note({}, [tok.bos_token_id])
    assert E.prompt_bos_note({}, []) is None


def test_no_interval_is_claimed_below_eight_prompts():
    from gpulab.stitchkv.evaluate import MIN_CI_PROMPTS, _ci

    items = {"small": [0.1] * 3, "large": [0.9] * 3}
    r = _ci(items, lambda m: m["large"] - m["small"])
    assert MIN_CI_PROMPTS == 8 and r["lo"] is None and r["hi"] is None and abs(r["value"] - 0.8) < 1e-12
    items = {"small": [0.1, 0.2] * 4, "large": [0.9, 0.8] * 4}
    r = _ci(items, lambda m: m["large"] - m["small"])
    assert r["lo"] is not None and r["lo"] > 0


def _fake_rows(monkeypatch, nll):
    """eval's variants replaced by rows of the given reference NLL (every position alike) and ROUGE-L 0."""
    def fake(name, pair, decoder, bank, batches, tok, ref_texts, n_new, device):
        v = nll[name]
        row = {"variant": name, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "ref_nll": v, "ref_nll_tok1": v,
               "ref_nll_after": v, "ttft_ms": 1.0, "tpot_ms": 1.0, "kv_bytes_per_seq": 8}
        return row, [], [0.0] * len(ref_texts), [v] * n_new

    monkeypatch.setattr(E, "run_variant", fake)


@pytest.mark.parametrize("large,want", [(2.0, 0.5), (3.5, None), (3.0, None)])
def test_nll_gap_share_needs_a_large_model_that_is_better(tiny_run, monkeypatch, large, want):
    """gap_recovered = (stitched - small) / (large - small): with a large model whose reference NLL is no lower
    than the small one's there is no gap to recover, and the ratio credits a stitched system that got worse than
    small-only (3.0 -> 3.4 against a large 3.5: '80% recovered'). The summary leaves such a share out, as it
    does ROUGE-L's; metrics.gap_recovered keeps the raw ratio."""
    _fake_rows(monkeypatch, {"small": 3.0, "large": large, "stitched-warmup": 3.0, "stitched-lora": 2.5 if large < 3.0
                             else 3.4})
    rec = E.evaluate(tiny_run, "cpu", 2, 8, 3, 2, log=lambda m: None)
    for key in ("gap_recovered_nll", "gap_recovered_nll_tok1", "gap_recovered_nll_after_tok1"):
        assert rec.summary[key] == (None if want is None else pytest.approx(want)), key
    raw = rec.metrics["gap_recovered"].get("stitched-lora:ref_nll")
    assert raw == (None if large == 3.0 else pytest.approx((3.4 - 3.0) / (large - 3.0) if large > 3.0 else 0.5))
    assert (want is None) == any("reference NLL is not below" in n for n in rec.notes)
