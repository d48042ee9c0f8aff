"""The kvstitch commands end to end on a tiny pair, and one-line errors for bad pairs and files."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from gpulab.cli import main
from gpulab.core.errors import InputError
from gpulab.stitchkv.models import load_pair, save_model, tiny_llama, train_tokenizer
from tests.stitchkv.conftest import SMALL


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_line_error(code, err, *needles):
    assert code == 1, err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_help_imports_no_torch():
    code = ("import sys; from gpulab.stitchkv import cli; "
            "assert not any(m in sys.modules for m in ('torch', 'transformers', 'peft')), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_train_then_eval_end_to_end(pair_dirs, corpus_file, tmp_path, capsys):
    large, small = pair_dirs
    res, run = tmp_path / "results", tmp_path / "run"
    code, out, err = run_cli(["--out", str(res), "kvstitch", "train", "--large", str(large), "--small", str(small),
                              "--data", str(corpus_file), "--run", str(run), "--stage", "all", "--steps", "3",
                              "--lora-steps", "3", "--batch", "4", "--prompt-len", "16", "--cont-len", "8",
                              "--ckpt-every", "0"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["--out", str(res), "kvstitch", "eval", "--run", str(run), "--prompts", "5",
                              "--gen-len", "6", "--batch", "2", "--prompt-len", "12"], capsys)
    assert code == 0, err
    files = sorted(res.glob("kvstitch-eval-*.yaml"))
    assert len(files) == 1 and len(list(res.glob("kvstitch-train-*.yaml"))) == 1
    rec = yaml.safe_load(files[0].read_text())
    assert rec["ok"] is True and set(rec["checks"]) >= {"self_stitch_identity_reproduces_cache",
                                                        "cached_decode_matches_no_cache_reference",
                                                        "stitched_cache_shapes_match_small"}
    rows = {r["variant"]: r for r in rec["rows"]}
    assert set(rows) == {"small", "large", "stitched-warmup", "stitched-lora", "small-lora"}  # + the LoRA control
    for r in rows.values():
        assert 0.0 <= r["rougeL"] <= 1.0 and r["ref_nll"] > 0 and r["ttft_ms"] > 0 and r["tpot_ms"] > 0
    # the stitched cache is the small model's cache: same bytes, and fewer than the large model's
    assert rows["stitched-lora"]["kv_bytes_per_seq"] == rows["small"]["kv_bytes_per_seq"]
    assert rows["stitched-lora"]["kv_bytes_per_seq"] < rows["large"]["kv_bytes_per_seq"]
    assert "stitched-lora" in out and "rougeL" in out
    # paired-bootstrap intervals over the 5 prompts; a gap whose interval holds 0 is flagged, never claimed
    ci = rec["metrics"]["rougeL_ci95"]
    assert set(ci) == {"large_minus_small", "stitched-lora_minus_small", "gap_recovered",
                       "stitched-lora_minus_small-lora"}
    # the stitches' gain over the LoRA control after token 1 (token 1 is the large model's own prediction)
    assert rec["summary"]["stitch_gain_nll_after_tok1_over_lora_control"] == pytest.approx(
        rows["small-lora"]["ref_nll_after"] - rows["stitched-lora"]["ref_nll_after"])
    assert rec["summary"]["stitch_gain_nll_tok1_over_lora_control"] == pytest.approx(
        rows["small-lora"]["ref_nll_tok1"] - rows["stitched-lora"]["ref_nll_tok1"])
    lo, hi = rec["summary"]["rougeL_large_minus_small_ci95"]
    assert rec["summary"]["gap_significant"] == (lo is not None and lo > 0)
    # the share recovered is claimed only for a real gap; its own interval sits beside it
    g = rec["summary"]["gap_recovered_rougeL"]
    assert (g is not None) == rec["summary"]["gap_significant"]
    assert rec["summary"]["gap_recovered_rougeL_ci95"] == [
        None if x is None else round(x, 5) for x in (ci["gap_recovered"]["lo"], ci["gap_recovered"]["hi"])]
    if lo is not None:
        assert lo <= ci["large_minus_small"]["value"] <= hi
    if not rec["summary"]["gap_significant"]:
        assert any("not clearly above 0" in n for n in rec["notes"])
    # reference NLL per continuation position: token 1 of the stitched system is the large model's own
    # prediction (its prefill logits); the rest is the small model reading the handed-over cache
    curves = rec["metrics"]["ref_nll_by_position"]
    assert set(curves) == set(rows) and all(len(c) == 6 for c in curves.values())
    for v, r in rows.items():
        assert r["ref_nll_tok1"] == pytest.approx(curves[v][0], abs=1e-4)
        assert r["ref_nll"] == pytest.approx((r["ref_nll_tok1"] + 5 * r["ref_nll_after"]) / 6, rel=1e-6)
    for v in ("stitched-warmup", "stitched-lora"):
        assert rows[v]["ref_nll_tok1"] == pytest.approx(rows["large"]["ref_nll_tok1"], rel=1e-4)
    # a share of an NLL gap only where the large model's NLL is below the small one's (random tiny models: either)
    for m, key, want in (("ref_nll_tok1", "gap_recovered_nll_tok1", 1.0),
                         ("ref_nll_after", "gap_recovered_nll_after_tok1",
                          rec["metrics"]["gap_recovered"]["stitched-lora:ref_nll_after"])):
        gap = rows["large"][m] < rows["small"][m]
        assert rec["summary"][key] == (pytest.approx(want, abs=1e-3) if gap else None), key


def test_pretrain_writes_a_pair_that_loads(corpus_file, tmp_path, capsys):
    code, out, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "pretrain", "--data", str(corpus_file),
                              "--pair-dir", str(tmp_path / "pair"), "--large-size", "nano-large", "--small-size",
                              "nano-small", "--vocab", "300", "--steps", "40", "--batch", "8", "--seq-len", "32"], capsys)
    assert code == 0, err
    pair = load_pair(tmp_path / "pair" / "large", tmp_path / "pair" / "small")
    assert pair.large.config.num_hidden_layers > pair.small.config.num_hidden_layers
    rec = yaml.safe_load(next((tmp_path / "res").glob("kvstitch-pretrain-*.yaml")).read_text())
    assert rec["ok"] and [r["model"] for r in rec["rows"]] == ["large", "small"]


@pytest.mark.parametrize("bad, needle", [(["--lr", "-1"], "--lr must be > 0, got -1.0"),
                                         (["--batch", "0"], "--steps and --batch must be >= 1"),
                                         # one step at an infinite rate saved an all-NaN pair
                                         (["--lr", "inf", "--steps", "1"], "--lr must be a finite number")])
def test_pretrain_rejects_bad_options(corpus_file, tmp_path, capsys, bad, needle):
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "pretrain", "--data", str(corpus_file),
                            "--pair-dir", str(tmp_path / "pair"), "--vocab", "300", *bad], capsys)
    one_line_error(code, err, needle)
    assert not (tmp_path / "pair").exists()


@pytest.mark.parametrize("cmd", ["pretrain", "tiny"])
def test_a_diverging_pretraining_is_one_line_and_saves_no_model(corpus_file, tmp_path, capsys, cmd):
    if cmd == "pretrain":
        args = ["pretrain", "--pair-dir", str(tmp_path / "seed0" / "pair"), "--large-size", "nano-large",
                "--small-size", "nano-small", "--vocab", "300", "--steps", "6", "--batch", "4", "--seq-len", "32",
                "--lr", "1e30"]
    else:
        args = ["tiny", "--workdir", str(tmp_path), *TINY_ARGS, "--pretrain-steps", "6", "--pretrain-lr", "1e30"]
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", *args, "--data", str(corpus_file)], capsys)
    flag = "--lr" if cmd == "pretrain" else "--pretrain-lr"
    line = one_line_error(code, err, f"; lower {flag}")
    assert re.search(r"pretrain large loss became (nan|inf|-inf) at step [1-5];", line), line
    assert not (tmp_path / "seed0" / "pair").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("cmd", ["pretrain", "tiny"])
def test_a_pair_folder_under_a_file_is_refused_before_pretraining(corpus_file, tmp_path, capsys, monkeypatch, cmd):
    """--pair-dir (or tiny's --workdir) that is a file, or lies under one: a one-line error before the pretraining,
    not an OSError at the first model's save after it."""
    from gpulab.stitchkv import pretrain as P

    monkeypatch.setattr(P, "train_lm", lambda *a, **k: pytest.fail("pretrained first"))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for where in (blocker, blocker / "sub"):
        if cmd == "pretrain":
            args = ["pretrain", "--pair-dir", str(where), "--large-size", "nano-large", "--small-size", "nano-small",
                    "--vocab", "300", "--steps", "2", "--batch", "4", "--seq-len", "32"]
        else:
            args = ["tiny", "--workdir", str(where), *TINY_ARGS]
        code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", *args, "--data", str(corpus_file)],
                               capsys)
        one_line_error(code, err, f"{blocker} is not a folder")
    assert blocker.read_text() == "x" and not (tmp_path / "res").exists()


def test_a_pretraining_that_fails_on_the_small_model_leaves_the_pair_folder_as_it_was(corpus_file, tmp_path,
                                                                                        capsys, monkeypatch):
    """The large model was saved before the small one trained: a failure (divergence, Ctrl-C) in the small one's
    pretraining left a new large/ beside the old small/ (or alone), a pair that looks whole."""
    from gpulab.core.errors import InputError as IE
    from gpulab.stitchkv import pretrain as P

    real = P.train_lm

    def small_fails(model, ids, split, steps, batch, seq, lr, seed, device, log, name, *a, **k):
        if name == "small":
            raise IE("pretrain small loss became nan at step 1; lower --lr")
        return real(model, ids, split, steps, batch, seq, lr, seed, device, log, name, *a, **k)

    monkeypatch.setattr(P, "train_lm", small_fails)
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "pretrain", "--data", str(corpus_file),
                            "--pair-dir", str(tmp_path / "pair"), "--large-size", "nano-large", "--small-size",
                            "nano-small", "--vocab", "300", "--steps", "2", "--batch", "4", "--seq-len", "32"], capsys)
    one_line_error(code, err, "pretrain small loss became nan")
    assert not (tmp_path / "pair").exists() or not any((tmp_path / "pair").iterdir())


def test_pair_without_shared_tokenizer(pair_dirs, corpus_file, tmp_path, capsys):
    other_tok = train_tokenizer("completely different text, other merges. " * 200 + "xyz qrs tuv\n" * 50, vocab_size=300)
    save_model(tiny_llama(SMALL, len(other_tok), 128, seed=3), other_tok, tmp_path / "other")
    with pytest.raises(InputError, match="do not share a tokenizer"):
        load_pair(pair_dirs[0], tmp_path / "other")
    code, _, err = run_cli(["--out", str(tmp_path / "r"), "kvstitch", "train", "--large", str(pair_dirs[0]),
                            "--small", str(tmp_path / "other"), "--data", str(corpus_file), "--run",
                            str(tmp_path / "run"), "--steps", "1"], capsys)
    one_line_error(code, err, "do not share a tokenizer")
    assert not (tmp_path / "run").exists()


def test_missing_and_malformed_model_folders(pair_dirs, corpus_file, tmp_path, capsys):
    code, _, err = run_cli(["kvstitch", "train", "--large", str(tmp_path / "nope"), "--small", str(pair_dirs[1]),
                            "--data", str(corpus_file), "--run", str(tmp_path / "run")], capsys)
    one_line_error(code, err, "--large folder not found", "nope")
    bad = tmp_path / "gpt"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InputError, match="model_type 'gpt2' is not supported"):
        load_pair(pair_dirs[0], bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="malformed config.json"):
        load_pair(pair_dirs[0], bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_pair(empty, pair_dirs[1])


def test_bad_data_and_run_folders(pair_dirs, tmp_path, capsys):
    code, _, err = run_cli(["kvstitch", "train", "--large", str(pair_dirs[0]), "--small", str(pair_dirs[1]),
                            "--data", str(tmp_path / "missing.txt"), "--run", str(tmp_path / "run")], capsys)
    one_line_error(code, err, f"--data {tmp_path / 'missing.txt'}: file not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "the king"}\n{"prompt": 3}\n')
    code, _, err = run_cli(["kvstitch", "train", "--large", str(pair_dirs[0]), "--small", str(pair_dirs[1]),
                            "--data", str(bad), "--run", str(tmp_path / "run")], capsys)
    one_line_error(code, err, "bad.jsonl:2")
    code, _, err = run_cli(["kvstitch", "eval", "--run", str(tmp_path / "nothing")], capsys)
    one_line_error(code, err, "no run.yaml")


def test_jsonl_prompts_and_references(pair_dirs, tmp_path):
    from gpulab.stitchkv import data as D

    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"the king {i} and the queen", "reference": f"speak {i} of love"})
                           for i in range(10)) + "\n")
    pair = load_pair(*pair_dirs)
    c = D.load_corpus(p, pair.tokenizer)
    assert c.kind == "jsonl" and c.split == 9
    w = D.eval_windows(c, 4, 64, 64)
    assert len(w) == 1 and pair.tokenizer.decode(w[0][1].tolist()) == "speak 9 of love"
    prompt, cont = next(D.train_batches(c, 4, 8, 8, 0))
    assert prompt.shape[0] == 1 and cont.shape[1] <= 8


@pytest.mark.parametrize("where,content,needle", [
    ("warmup/stitch.yaml", "mode: [", "stitch.yaml: malformed YAML"),
    ("warmup/stitch.yaml", "mode: hidden\n", "stitch.yaml: missing key 'large_shape'"),
    ("warmup/stitch.safetensors", "garbage", "stitch.safetensors: does not load"),
    ("lora/adapter/adapter_config.json", "{bad", "the LoRA adapter does not load"),
    ("run.yaml", "- 1\n", "run.yaml: expected a mapping"),
])
def test_corrupt_run_folder_files_are_one_line(tiny_run, tmp_path, capsys, where, content, needle):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / where).write_text(content)
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "eval", "--run", str(run), "--prompts", "2",
                            "--gen-len", "3", "--batch", "2"], capsys)
    one_line_error(code, err, needle)
    assert not (tmp_path / "res").exists()


def test_corrupt_checkpoint_is_one_line(tiny_run, pair_dirs, corpus_file, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoint.pt").write_bytes(b"junk")
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "train", "--large", str(pair_dirs[0]),
                            "--small", str(pair_dirs[1]), "--data", str(corpus_file), "--run", str(run), "--stage",
                            "warmup", "--steps", "1", "--batch", "4", "--prompt-len", "16", "--cont-len", "8"], capsys)
    one_line_error(code, err, "checkpoint.pt: corrupt checkpoint", "delete it")


@pytest.mark.parametrize("cmd", [["eval"], ["serve-disagg", "--no-check"]])
def test_negative_prompt_len_is_one_line(tiny_run, tmp_path, capsys, cmd):
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", *cmd, "--run", str(tiny_run), "--prompts", "2",
                            "--gen-len", "3", "--batch", "2", "--prompt-len", "-2"], capsys)
    one_line_error(code, err, "--prompt-len must be >= 1")


def test_typo_in_an_option_does_not_pin_the_run_folder(pair_dirs, corpus_file, tmp_path, capsys):
    args = ["--out", str(tmp_path / "res"), "kvstitch", "train", "--large", str(pair_dirs[0]), "--small",
            str(pair_dirs[1]), "--data", str(corpus_file), "--run", str(tmp_path / "run"), "--stage", "warmup",
            "--steps", "1", "--batch", "2", "--prompt-len", "8", "--cont-len", "4"]
    code, _, err = run_cli([*args, "--alignment", "0,9"], capsys)
    one_line_error(code, err, "--alignment index 9")
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(args, capsys)  # the corrected command trains in the same folder
    assert code == 0, err


TINY_ARGS = ["--large-size", "nano-large", "--small-size", "nano-small", "--vocab", "300", "--pretrain-steps", "2",
             "--pretrain-batch", "4", "--seq-len", "32", "--steps", "2", "--lora-steps", "2", "--batch", "4",
             "--prompt-len", "16", "--cont-len", "8", "--prompts", "2", "--gen-len", "4"]


@pytest.mark.parametrize("bad, needle", [(["--lora-targets", "q_proj,mlp_in"], "no module named 'mlp_in'"),
                                         (["--lora-targets", "q_proj,v_proj,q_proj"], "names 'q_proj' twice"),
                                         (["--lora-r", "0"], "--lora-r must be >= 1"),
                                         (["--task", "nope"], "--task"),
                                         (["--pretrain-steps", "0"], "--pretrain-steps and --pretrain-batch must"),
                                         (["--pretrain-lr", "0"], "--pretrain-lr must be > 0"),
                                         (["--vocab", "100"], "--vocab must be >= 260"),
                                         (["--small-size", "huge"], "unknown model size 'huge'"),
                                         (["--data", "no/such.txt"], "--data no/such.txt: file not found"),
                                         (["--prompts", "0"], "--prompts must be >= 1"),
                                         (["--gen-len", "0"], "--gen-len and --batch must be >= 1")])
def test_tiny_rejects_bad_options_before_pretraining(corpus_file, tmp_path, capsys, bad, needle):
    wd = tmp_path / "wd"
    (wd / "seed0" / "run").mkdir(parents=True)  # an earlier run: a rejected command must leave it alone
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "tiny", "--workdir", str(wd),
                            "--data", str(corpus_file), *TINY_ARGS, *bad], capsys)
    one_line_error(code, err, needle)
    assert (wd / "seed0" / "run").is_dir() and not (wd / "seed0" / "pair").exists()


def test_tiny_puts_the_lora_on_the_modules_asked_for(corpus_file, tmp_path, capsys):
    targets = "q_proj,v_proj,gate_proj,down_proj"
    res, wd = tmp_path / "res", tmp_path / "wd"
    code, _, err = run_cli(["--out", str(res), "kvstitch", "tiny", "--workdir", str(wd), "--data", str(corpus_file),
                            *TINY_ARGS, "--lora-targets", targets, "--lora-r", "2", "--lora-alpha", "4"], capsys)
    assert code == 0, err
    for adapter in ("lora", "lora-control"):
        conf = json.loads((wd / "seed0" / "run" / adapter / "adapter" / "adapter_config.json").read_text())
        assert set(conf["target_modules"]) == set(targets.split(",")) and conf["r"] == 2 and conf["lora_alpha"] == 4
    rec = yaml.safe_load(next(res.glob("kvstitch-tiny-*.yaml")).read_text())
    assert rec["config"]["train_stages"]["lora_targets"] == targets


@pytest.mark.parametrize("option", [["--lora-r", "4"], ["--lora-alpha", "8"], ["--lora-steps", "3"],
                                    ["--lora-lr", "1e-2"], ["--stitch-lr", "1e-2"], ["--lora-targets", "q_proj"],
                                    ["--no-lora-control"]])
def test_lora_options_of_a_warmup_are_refused(tmp_path, capsys, option):
    """--stage warmup trains no LoRA: its options were silently ignored (and a later --stage lora, without them,
    trains with the defaults)."""
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "train", "--large", str(tmp_path / "L"),
                            "--small", str(tmp_path / "S"), "--run", str(tmp_path / "run"), "--stage", "warmup",
                            *option], capsys)
    one_line_error(code, err, f"{option[0]} applies only to --stage lora or all")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", [["--steps", "3"], ["--lr", "1e-2"], ["--init", "random"], ["--loss", "l1"],
                                    ["--ls-batches", "2"], ["--ridge", "0.1"]])
def test_warmup_options_of_a_lora_stage_are_refused(tmp_path, capsys, option):
    """--stage lora trains from the warm-up stitches already in the run folder (it never trains a warm-up, nor
    compares these options with the recorded one): the warm-up's options were silently ignored."""
    code, _, err = run_cli(["--out", str(tmp_path / "res"), "kvstitch", "train", "--large", str(tmp_path / "L"),
                            "--small", str(tmp_path / "S"), "--run", str(tmp_path / "run"), "--stage", "lora",
                            *option], capsys)
    one_line_error(code, err, f"{option[0]} applies only to --stage warmup or all")
    assert not (tmp_path / "run").exists()


def test_cont_len_help_names_the_warmup_too():
    """--cont-len is a warm-up setting too (its windows span prompt + continuation; STAGE_FIELDS['warmup']):
    the help called it the stage-2 loss's alone."""
    import typer

    from gpulab.stitchkv import cli
    from gpulab.stitchkv.run_folder import STAGE_FIELDS

    cmd = typer.main.get_command(cli.app).commands["train"]
    help_text = next(p.help for p in cmd.params if p.name == "cont_len")
    assert "cont_len" in STAGE_FIELDS["warmup"] and "warm-up" in help_text, help_text
