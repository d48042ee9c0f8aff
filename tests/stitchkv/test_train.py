"""Two-stage training: warm-up loss decreases, resume reproduces an uninterrupted run, LoRA save/load."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from gpulab.core.errors import InputError
from gpulab.stitchkv import run_folder as RF
from gpulab.stitchkv import store as S
from gpulab.stitchkv import train as T
from gpulab.stitchkv.models import load_model


def cfg_for(pair_dirs, corpus_file, run, **over):
    large, small = pair_dirs
    cfg = dict(large=str(large), small=str(small), data=str(corpus_file), run=str(run), stage="warmup", steps=30,
               lora_steps=0, alignment="uniform-nearest", stitch_input="hidden", init="random", loss="mse",
               batch=4, prompt_len=16, cont_len=8, lr=3e-3, lora_lr=3e-3, lora_r=4, lora_alpha=8,
               lora_targets="q_proj,k_proj,v_proj,o_proj", ls_batches=2, ridge=1e-3, ckpt_every=0,
               dtype="float32", seed=0)
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("mode,loss", [("hidden", "mse"), ("kv", "l1")])
def test_warmup_loss_decreases(pair_dirs, corpus_file, tmp_path, mode, loss):
    res = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "run", stitch_input=mode, loss=loss), "cpu", log=lambda m: None)
    hist = res["warmup"]["loss_history"]
    assert len(hist) == 30
    assert sum(hist[-5:]) / 5 < 0.85 * sum(hist[:3]) / 3
    assert (tmp_path / "run" / "warmup" / "stitch.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_least_squares_init_beats_random(pair_dirs, corpus_file, tmp_path):
    ls = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "a", init="ls", steps=1, stitch_input="kv"), "cpu",
                 log=lambda m: None)
    rnd = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "b", init="random", steps=1, stitch_input="kv"), "cpu",
                  log=lambda m: None)
    assert ls["warmup"]["heldout_nmse"] < rnd["warmup"]["heldout_nmse"]
    assert all(0.0 <= r <= 1.0 for r in ls["warmup"]["ls_r2"].values())


def test_resume_matches_uninterrupted(pair_dirs, corpus_file, tmp_path, monkeypatch):
    full = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "full", steps=6), "cpu", log=lambda m: None)
    cfg = cfg_for(pair_dirs, corpus_file, tmp_path / "cut", steps=6, ckpt_every=2)
    real, calls = T.warmup_step_loss, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # after the step-4 checkpoint, before step 6
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "warmup_step_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, "cpu", log=lambda m: None)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    monkeypatch.setattr(T, "warmup_step_loss", real)
    logs = []
    resumed = T.train(cfg, "cpu", log=logs.append)
    assert any("resuming at step 4" in m for m in logs)
    assert resumed["warmup"]["loss_history"] == pytest.approx(full["warmup"]["loss_history"], rel=1e-5)


def test_optimizer_state_of_another_layout_is_one_line():
    """A checkpoint whose optimizer had other parameter groups (e.g. stage 2 before --stitch-lr) cannot resume."""
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    old = torch.optim.AdamW(list(a.parameters()) + list(b.parameters()))
    new = torch.optim.AdamW([{"params": list(a.parameters())}, {"params": list(b.parameters()), "lr": 1e-4}])
    with pytest.raises(InputError, match="optimizer state does not fit this run") as e:
        T._restore_optim({"opt": old.state_dict()}, new, None)
    assert "\n" not in str(e.value) and "delete it" in str(e.value)


def test_lora_adapters_save_and_load(pair_dirs, corpus_file, tmp_path):
    from gpulab.stitchkv.evaluate import _nll_stitched
    from gpulab.stitchkv.models import load_pair

    run = tmp_path / "run"
    res = T.train(cfg_for(pair_dirs, corpus_file, run, stage="all", steps=3, lora_steps=6), "cpu", log=lambda m: None)
    hist = res["lora"]["loss_history"]
    assert len(hist) == 6 and all(h == h for h in hist)
    assert (run / "lora" / "adapter" / "adapter_config.json").is_file()
    assert any((run / "lora" / "adapter").glob("adapter_model.*"))
    pair = load_pair(*pair_dirs)
    prompt, ref = torch.randint(0, 300, (2, 10)), torch.randint(0, 300, (2, 5))
    bank_w = S.load_bank(run / "warmup")
    with torch.no_grad():
        before = float(_nll_stitched(pair.large, pair.small, bank_w, prompt, ref).sum())
        small_l, bank_l = S.load_stage2(pair.small, run / "lora")
        after = float(_nll_stitched(pair.large, small_l, bank_l, prompt, ref).sum())
        # the loaded adapter is not a no-op (LoRA B was trained away from zero), and loading is deterministic
        lora_b = [p for n, p in small_l.named_parameters() if "lora_B" in n]
        assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)
        pair2 = load_pair(*pair_dirs)
        small_l2, bank_l2 = S.load_stage2(pair2.small, run / "lora")
        again = float(_nll_stitched(pair2.large, small_l2, bank_l2, prompt, ref).sum())
    assert after != before
    assert after == again


def test_rerun_all_skips_finished_warmup(pair_dirs, corpus_file, tmp_path):
    run = tmp_path / "run"
    T.train(cfg_for(pair_dirs, corpus_file, run, steps=2), "cpu", log=lambda m: None)
    res = T.train(cfg_for(pair_dirs, corpus_file, run, stage="all", steps=2, lora_steps=1), "cpu", log=lambda m: None)
    assert res["warmup"] == {"skipped": "already trained"} and res["lora"]["steps"] == 1


@pytest.mark.parametrize("over,match", [
    (dict(stage="both"), "--stage"), (dict(loss="huber"), "--loss"), (dict(init="zeros"), "--init"),
    (dict(steps=-1), "--steps"), (dict(alignment="middle"), "--alignment"),
    (dict(stage="lora"), "warm-up stitches first"), (dict(prompt_len=100000), "fewer than one window"),
    (dict(stage="all", lora_targets="nope_proj"), "no module named 'nope_proj'"),
    (dict(alignment="0,9"), "out of range"), (dict(batch=0), "--batch"), (dict(stage="all", lora_r=0), "--lora-r"),
    (dict(ls_batches=0), "--ls-batches"), (dict(ridge=-1.0), "--ridge"), (dict(lr=0.0), "--lr"),
    (dict(ckpt_every=-1), "--ckpt-every"), (dict(stitch_input="states"), "--stitch-input"),
    (dict(stitch_lr=0.0), "--stitch-lr"), (dict(stage="all", cont_len=1), "--cont-len must be >= 2 for stage 2"),
    (dict(prompt_len=0), "--prompt-len must be >= 1"),
    # an infinite rate or ridge trained and saved all-NaN stitches and adapters (the first loss is still finite)
    (dict(lr=float("inf")), "--lr must be a finite number"),
    (dict(stage="all", lora_lr=float("inf")), "--lora-lr must be a finite number"),
    (dict(stage="all", stitch_lr=float("inf")), "--stitch-lr must be a finite number"),
    (dict(ridge=float("inf")), "--ridge must be a finite number"),
])
def test_bad_training_options(pair_dirs, corpus_file, tmp_path, over, match):
    with pytest.raises(InputError, match=match):
        T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "run", **{"steps": 1, **over}), "cpu", log=lambda m: None)
    # nothing written: run.yaml would pin the run folder to the bad option (a corrected rerun refused)
    assert not (tmp_path / "run").exists()


def test_residual_stitches_skip_the_warmup_and_learn_in_stage_2(pair_dirs, corpus_file, tmp_path):
    """Residual stitches start at the warm-up optimum (zero maps: the small model's own cache): stage 1 saves them
    untrained, stage 2 moves them off zero and lowers the stitched LM loss."""
    run = tmp_path / "run"
    res = T.train(cfg_for(pair_dirs, corpus_file, run, stage="all", stitch_input="residual", init="ls", steps=5,
                          lora_steps=12, lora_lr=1e-2), "cpu", log=lambda m: None)
    assert res["warmup"]["steps"] == 0 and res["warmup"]["heldout_nmse"] < 1e-10
    assert all(float(lin.weight.detach().abs().max()) == 0 for lin in S.load_bank(run / "warmup").linears())
    _, bank = S.load_stage2(load_model(pair_dirs[1], "small"), run / "lora")
    assert bank.mode == "residual" and max(float(lin.weight.detach().abs().max()) for lin in bank.linears()) > 0
    hist = res["lora"]["loss_history"]
    assert sum(hist[-3:]) / 3 < sum(hist[:3]) / 3


def test_stitch_lr_is_the_stitches_own(pair_dirs, corpus_file, tmp_path):
    """--stitch-lr sets the stitches' stage-2 learning rate apart from the LoRA's."""
    run = tmp_path / "run"
    T.train(cfg_for(pair_dirs, corpus_file, run, stage="all", stitch_input="residual", steps=1, lora_steps=4,
                    lora_lr=1e-2, stitch_lr=1e-9), "cpu", log=lambda m: None)
    _, bank = S.load_stage2(load_model(pair_dirs[1], "small"), run / "lora")
    assert 0 < max(float(lin.weight.detach().abs().max()) for lin in bank.linears()) < 1e-7


def test_run_folder_of_another_pair_is_refused(pair_dirs, corpus_file, tmp_path):
    run = tmp_path / "run"
    T.train(cfg_for(pair_dirs, corpus_file, run, steps=1), "cpu", log=lambda m: None)
    with pytest.raises(InputError, match="stitch_input"):
        T.train(cfg_for(pair_dirs, corpus_file, run, steps=1, stitch_input="kv"), "cpu", log=lambda m: None)


def test_lora_control_trains_the_same_lora_without_stitches(pair_dirs, corpus_file, tmp_path):
    """The control adapter: same targets/rank as stage 2, on a fresh small model, loss on the same targets."""
    import torch

    from gpulab.stitchkv.models import load_model
    from gpulab.stitchkv.store import load_lora_control
    from gpulab.stitchkv.train import lm_loss_own, train

    run = tmp_path / "run"
    res = train(cfg_for(pair_dirs, corpus_file, run, stage="all", steps=2, lora_steps=3, lora_control=True), "cpu",
                log=lambda m: None)
    assert res["lora_control"]["steps"] == 3 and len(res["lora_control"]["loss_history"]) == 3
    small = load_model(pair_dirs[1], "small")
    prompt = torch.randint(2, 300, (2, 7))
    cont = torch.randint(2, 300, (2, 5))
    with torch.no_grad():
        base = float(lm_loss_own(small, prompt, cont))
        # lm_loss_own is the teacher-forced loss of cont[:, 1:] after prompt + cont[:, :-1]
        lg = small(input_ids=torch.cat([prompt, cont], 1)).logits[:, prompt.shape[1]:-1]
        ref = float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), cont[:, 1:].reshape(-1)))
        assert abs(base - ref) < 1e-5
        ctrl = load_lora_control(load_model(pair_dirs[1], "small"), run / "lora-control")
        assert float(lm_loss_own(ctrl, prompt, cont)) != base  # the adapter changed the model
    assert (run / "lora" / "adapter").is_dir()  # stage 2 itself untouched


def test_float16_weights_train_with_loss_scaling(pair_dirs, corpus_file, tmp_path, monkeypatch):
    """fp16 activation gradients underflow without loss scaling: a GradScaler drives every update (bf16 and
    fp32 need none) and its state is checkpointed with the optimizer."""
    assert T.grad_scaler({"dtype": "bfloat16"}, "cuda") is None and T.grad_scaler({}, "cpu") is None
    real_step, real_save, scalers, saved = T._optimizer_step, RF.atomic_torch_save, [], []

    def spy_step(*a, **k):
        scalers.append(a[2] if len(a) > 2 else k.get("scaler"))  # (opt, loss, scaler)
        return real_step(*a, **k)

    monkeypatch.setattr(T, "_optimizer_step", spy_step)
    monkeypatch.setattr(RF, "atomic_torch_save", lambda obj, path: (saved.append(obj), real_save(obj, path)))
    res = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "run", stage="all", steps=3, lora_steps=3, ckpt_every=2,
                          dtype="float16"), "cpu", log=lambda m: None)
    assert len(scalers) == 6 and all(isinstance(s, torch.amp.GradScaler) for s in scalers)
    assert all(math.isfinite(h) for st in ("warmup", "lora") for h in res[st]["loss_history"])
    assert [c["stage"] for c in saved] == ["warmup", "lora"] and all(c["scaler"]["scale"] > 0 for c in saved)


def _die_on_call(monkeypatch, name, n):
    """Make ``T.<name>`` raise KeyboardInterrupt on its n-th call (a run killed mid-stage)."""
    real, calls = getattr(T, name), {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, name, dying)
    return real


def test_jsonl_reference_of_one_token_is_refused_for_stage_2(pair_dirs, tmp_path):
    import json

    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.models import load_pair

    j = tmp_path / "d.jsonl"
    recs = [{"prompt": f"the king {i} and the queen", "reference": f"speak {i} of love"} for i in range(8)]
    recs[3]["reference"] = "a"  # one byte-level token
    j.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(InputError, match=r"d.jsonl:4: the reference is 1 token\(s\); stage 2 needs >= 2") as e:
        T.train(cfg_for(pair_dirs, j, tmp_path / "run", stage="all", steps=1, lora_steps=1), "cpu", log=lambda m: None)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
    assert D.load_corpus(j, load_pair(*pair_dirs).tokenizer).pairs[3][1] != []  # the warm-up alone accepts it


def test_resume_or_skip_with_other_settings_is_refused(pair_dirs, corpus_file, tmp_path, monkeypatch):
    """A stage resumed from its checkpoint (or skipped as finished) must have the settings it was trained with."""
    run = tmp_path / "run"
    cfg = cfg_for(pair_dirs, corpus_file, run, stage="all", steps=2, lora_steps=4, ckpt_every=2)
    real = _die_on_call(monkeypatch, "lm_loss_stitched", 3)  # after the stage-2 step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, "cpu", log=lambda m: None)
    monkeypatch.setattr(T, "lm_loss_stitched", real)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["stage"] == "lora"
    before = (run / "run.yaml").read_bytes()
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text())
    for over, needle in [(dict(lora_r=8), "lora was trained with lora_r=4, not 8"),
                         (dict(data=str(other)), "warmup was trained with data="),
                         (dict(lora_targets="q_proj,v_proj"), "lora_targets"),
                         (dict(steps=3), "warmup was trained with steps=2, not 3; use a new --run folder (or "
                                         "--stage warmup to retrain it)")]:
        with pytest.raises(InputError, match=re.escape(needle)) as e:
            T.train({**cfg, **over}, "cpu", log=lambda m: None)
        assert "\n" not in str(e.value)
        if "lora was" in needle:
            assert "delete checkpoint.pt to restart it" in str(e.value)
        assert (run / "run.yaml").read_bytes() == before  # nothing rewritten
    logs = []
    res = T.train(cfg, "cpu", log=logs.append)  # the same settings resume
    assert any("lora: resuming at step 2" in m for m in logs) and len(res["lora"]["loss_history"]) == 4
    with pytest.raises(InputError, match="lora was trained with lora_alpha=8, not 4; .*--stage lora to retrain it"):
        T.train({**cfg, "lora_alpha": 4}, "cpu", log=lambda m: None)  # finished, skipped: also pinned
    T.train({**cfg, "stage": "lora", "lora_alpha": 4}, "cpu", log=lambda m: None)  # an explicit retrain may change it


def test_warmup_resumed_with_another_cont_len_is_refused(pair_dirs, corpus_file, tmp_path, monkeypatch):
    """The warm-up's windows span prompt and continuation (train_batches draws their starts from
    ``split - prompt_len - cont_len``), so a warm-up resumed with another --cont-len trained on other prompts after
    the resume than the uninterrupted run: refused like every other setting that shapes it."""
    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.models import load_tokenizer

    corpus = D.load_corpus(corpus_file, load_tokenizer(pair_dirs[0], "large"))
    p8, _ = next(D.train_batches(corpus, 4, 16, 8, 0))
    p12, _ = next(D.train_batches(corpus, 4, 16, 12, 0))
    assert not torch.equal(p8, p12)  # the warm-up's prompts depend on cont_len
    run = tmp_path / "run"
    cfg = cfg_for(pair_dirs, corpus_file, run, steps=4, ckpt_every=2)
    real = _die_on_call(monkeypatch, "warmup_step_loss", 4)  # after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, "cpu", log=lambda m: None)
    monkeypatch.setattr(T, "warmup_step_loss", real)
    with pytest.raises(InputError, match=re.escape("warmup was trained with cont_len=8, not 12")):
        T.train({**cfg, "cont_len": 12}, "cpu", log=lambda m: None)
    logs = []
    T.train(cfg, "cpu", log=logs.append)  # the same settings resume
    assert any("warmup: resuming at step 2" in m for m in logs)


def test_rerun_all_skips_finished_stage_2_and_resumes_the_control(pair_dirs, corpus_file, tmp_path, monkeypatch):
    """A rerun of --stage all after the LoRA control died keeps stage 2 and resumes the control from its
    checkpoint; the result equals an uninterrupted run; a further rerun skips everything."""
    cfg = dict(stage="all", steps=2, lora_steps=4, ckpt_every=2, lora_control=True)
    full = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "full", **cfg), "cpu", log=lambda m: None)
    run = tmp_path / "cut"
    real = _die_on_call(monkeypatch, "lm_loss_own", 4)  # control step 3, after its step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg_for(pair_dirs, corpus_file, run, **cfg), "cpu", log=lambda m: None)
    monkeypatch.setattr(T, "lm_loss_own", real)
    lora_w = (run / "lora" / "adapter" / "adapter_model.safetensors").read_bytes()
    logs = []
    res = T.train(cfg_for(pair_dirs, corpus_file, run, **cfg), "cpu", log=logs.append)
    assert res["warmup"] == res["lora"] == {"skipped": "already trained"}
    assert any("lora-control: resuming at step 2" in m for m in logs)
    assert (run / "lora" / "adapter" / "adapter_model.safetensors").read_bytes() == lora_w
    assert res["lora_control"]["loss_history"] == pytest.approx(full["lora_control"]["loss_history"], rel=1e-5)
    assert not (run / "checkpoint.pt").exists()
    again = T.train(cfg_for(pair_dirs, corpus_file, run, **cfg), "cpu", log=lambda m: None)
    assert all(again[s] == {"skipped": "already trained"} for s in ("warmup", "lora", "lora_control"))
    # an explicit warm-up retrain with other settings makes stage 2 stale: the next --stage all redoes it
    T.train(cfg_for(pair_dirs, corpus_file, run, **{**cfg, "stage": "warmup", "lr": 1e-3}), "cpu", log=lambda m: None)
    redo = T.train(cfg_for(pair_dirs, corpus_file, run, **{**cfg, "lr": 1e-3}), "cpu", log=lambda m: None)
    assert redo["warmup"] == {"skipped": "already trained"} and len(redo["lora"]["loss_history"]) == 4


def test_heldout_nmse_is_measured_on_the_validation_split(pair_dirs, corpus_file, tmp_path):
    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.models import load_pair
    from gpulab.stitchkv.reference import own_cache
    from gpulab.stitchkv.stitch import large_features, large_prefill

    run = tmp_path / "run"
    res = T.train(cfg_for(pair_dirs, corpus_file, run, steps=3, stitch_input="kv"), "cpu", log=lambda m: None)
    pair = load_pair(*pair_dirs)
    corpus = D.load_corpus(corpus_file, pair.tokenizer)
    wins = D.eval_windows(corpus, 4, 16, 1)
    assert int(wins[0][0][0]) == int(corpus.ids[corpus.split])  # windows of the validation split
    prompt = torch.stack([p for p, _ in wins])
    bank = S.load_bank(run / "warmup")
    with torch.no_grad():
        feats = large_features(pair.large, large_prefill(pair.large, prompt)[1], bank.align, "kv")
        pred = bank(feats, pair.small, torch.arange(16).expand(4, -1))
        want = T.nmse(pred, own_cache(pair.small, prompt))
    assert res["warmup"]["heldout_nmse"] == pytest.approx(want, rel=1e-5)
    assert res["warmup"]["heldout_prompts"] == 4


def test_a_batch_larger_than_the_validation_split_measures_what_it_holds(pair_dirs, corpus_file, tmp_path):
    """--batch sets the held-out NMSE's prompt count; a validation split with room for fewer was refused as if
    '--prompts' (not a train option) had been asked for too many."""
    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.models import load_pair

    corpus = D.load_corpus(corpus_file, load_pair(*pair_dirs).tokenizer)
    room = D.eval_room(corpus, 16, 1)
    res = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "run", steps=1, batch=room + 3), "cpu",
                  log=lambda m: None)
    assert res["warmup"]["heldout_prompts"] == room


def test_run_yaml_holds_absolute_paths(pair_dirs, corpus_file, tmp_path, monkeypatch):
    import os

    import yaml

    root = Path(os.path.commonpath([pair_dirs[0], corpus_file, tmp_path]))
    monkeypatch.chdir(root)
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    T.train(cfg_for((rel(pair_dirs[0]), rel(pair_dirs[1])), rel(corpus_file), rel(tmp_path / "run"), steps=1), "cpu",
            log=lambda m: None)
    cfg = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    for k, want in (("large", pair_dirs[0]), ("small", pair_dirs[1]), ("data", corpus_file), ("run", tmp_path / "run")):
        assert Path(cfg[k]).is_absolute() and Path(cfg[k]) == Path(want).resolve()
    monkeypatch.chdir(tmp_path)  # another directory: the run still names its models and data
    assert S.load_small(S.run_config(tmp_path / "run"), tmp_path / "run", "warmup", "cpu")[1].mode == "hidden"


def _adapter(run: Path, folder: str = "lora") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / folder / "adapter" / "adapter_model.safetensors"))


def test_stage_2_restart_reproduces_the_uninterrupted_run(pair_dirs, corpus_file, tmp_path, monkeypatch):
    """Stage 2 started over (a run killed in stage 2 before its first checkpoint and rerun, or --stage warmup
    then --stage lora) trains the same adapters as an uninterrupted --stage all: the LoRA's initial weights
    depend on the run's seed alone, not on what the process did before (building the warm-up stitches)."""
    cfg = dict(stage="all", steps=2, lora_steps=2, ckpt_every=0, init="ls")
    full = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "full", **cfg), "cpu", log=lambda m: None)
    want = _adapter(tmp_path / "full")
    real = _die_on_call(monkeypatch, "lm_loss_stitched", 1)  # stage 2's first step: no stage-2 checkpoint yet
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "cut", **cfg), "cpu", log=lambda m: None)
    monkeypatch.setattr(T, "lm_loss_stitched", real)
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    rerun = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "cut", **cfg), "cpu", log=lambda m: None)
    assert rerun["warmup"] == {"skipped": "already trained"}
    T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "split", **{**cfg, "stage": "warmup"}), "cpu", log=lambda m: None)
    split = T.train(cfg_for(pair_dirs, corpus_file, tmp_path / "split", **{**cfg, "stage": "lora"}), "cpu",
                    log=lambda m: None)
    for run, res in ((tmp_path / "cut", rerun), (tmp_path / "split", split)):
        got = _adapter(run)
        assert set(got) == set(want) and len(want) > 0
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=lambda m: f"{run.name}:{k}: {m}")
        assert res["lora"]["loss_history"] == full["lora"]["loss_history"]


def test_retraining_stage_2_removes_the_stale_lora_control(pair_dirs, corpus_file, tmp_path):
    """--stage lora --no-lora-control retrains stage 2 with other settings: the control of the earlier stage 2
    (lora-control/ and its run.yaml record) must go, not stand beside the new stage 2 in eval."""
    import yaml

    run = tmp_path / "run"
    cfg = cfg_for(pair_dirs, corpus_file, run, stage="all", steps=1, lora_steps=1, lora_control=True)
    T.train(cfg, "cpu", log=lambda m: None)
    assert (run / "lora-control" / "adapter" / "adapter_config.json").is_file()
    assert "lora_control" in yaml.safe_load((run / "run.yaml").read_text())["trained"]
    T.train({**cfg, "stage": "lora", "lora_r": 2, "lora_control": False}, "cpu", log=lambda m: None)
    assert not (run / "lora-control").exists()
    assert sorted(p.name for p in run.iterdir()) == ["lora", "run.yaml", "warmup"]  # nothing half-deleted left
    trained = yaml.safe_load((run / "run.yaml").read_text())["trained"]
    assert "lora_control" not in trained and trained["lora"]["lora_r"] == 2
    # a control trained again with the new stage 2 is recorded with its settings
    T.train({**cfg, "stage": "lora", "lora_r": 2}, "cpu", log=lambda m: None)
    trained = yaml.safe_load((run / "run.yaml").read_text())["trained"]
    assert trained["lora_control"]["lora_r"] == 2 and (run / "lora-control" / "adapter").is_dir()


@pytest.mark.parametrize("one_process", ["ctx", "none"])
def test_step_losses_are_read_back_in_blocks_and_checked(one_process):
    from gpulab.stitchkv.distributed import Ctx
    from gpulab.stitchkv.step_losses import StepLosses

    ctx = Ctx() if one_process == "ctx" else None
    losses = StepLosses(ctx, "cpu", 6, [0.5], "lora", "--lora-lr")  # step 0 from a checkpoint
    for step, v in ((1, 0.25), (2, 0.125)):
        losses.add(step, torch.tensor(v))
    assert losses.read(3) == [0.5, 0.25, 0.125]
    losses.add(3, torch.tensor(0.0625))
    losses.add(4, torch.tensor(float("inf")))
    with pytest.raises(InputError, match=r"^lora loss became inf at step 4; lower --lora-lr$"):
        losses.read(5)


def test_a_diverging_loss_is_one_line_and_never_checkpointed(pair_dirs, corpus_file, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match=r"^warmup loss became (inf|nan) at step [1-9]; lower --lr$"):
        T.train(cfg_for(pair_dirs, corpus_file, run, lr=1e30, steps=10, ckpt_every=2), "cpu", log=lambda m: None)
    assert not (run / "checkpoint.pt").exists()  # its losses were checked before the save at step 2
    assert not (run / "warmup").exists()


def _trained_on_a_copy_of_the_pair(pair_dirs, corpus_file, tmp_path):
    """(large, small, run, cfg): a warm-up of one step on copies of the pair that a test may change."""
    import shutil

    large, small = (tmp_path / "large", tmp_path / "small")
    shutil.copytree(pair_dirs[0], large)
    shutil.copytree(pair_dirs[1], small)
    run = tmp_path / "run"
    cfg = cfg_for((large, small), corpus_file, run, steps=1)
    T.train(dict(cfg), "cpu", log=lambda m: None)
    return large, small, run, cfg


def test_run_folder_refuses_another_model_in_the_same_path(pair_dirs, corpus_file, tmp_path):
    """The run is tied to what the folders hold (config, tokenizer, weight files), not only to their paths."""
    import json

    large, small, run, cfg = _trained_on_a_copy_of_the_pair(pair_dirs, corpus_file, tmp_path)
    assert S.run_config(run)["small_id"] == S.model_fingerprint(small)
    c = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**c, "rms_norm_eps": 1e-5}))  # another model, same path
    with pytest.raises(InputError, match="no longer holds the model this run was trained with"):
        T.train(dict(cfg), "cpu", log=lambda m: None)
    with pytest.raises(InputError, match="--small folder .* no longer holds the model"):
        S.run_config(run)  # eval, export and serving read the run through it


def test_identity_init_of_unequal_widths_fails_before_the_run_folder_is_pinned(pair_dirs, corpus_file, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match="identity stitches need equal widths"):
        T.train(cfg_for(pair_dirs, corpus_file, run, steps=1, init="identity"), "cpu", log=lambda m: None)
    assert not (run / "run.yaml").exists()


def test_lora_on_a_tied_lm_head_is_refused(models):
    small = models[1]
    small.config.tie_word_embeddings = True  # the fixture builds a fresh pair per test
    with pytest.raises(InputError, match="ties lm_head to its input embeddings"):
        T.lora_targets(small, {"lora_targets": "q_proj,lm_head"})


def test_an_interrupted_retrain_keeps_the_record_of_the_result_that_is_there(pair_dirs, corpus_file, tmp_path,
                                                                             monkeypatch):
    """run.yaml's `trained` describes what the stage folders hold: a warm-up retrain killed after a checkpoint
    recorded its new settings at once, so a later --stage all took the old stitches for the new ones and
    skipped them; the checkpoint carries its own settings, checked when it resumes. --stage lora does not build
    on the old stitches while a warm-up retrain is pending."""
    import yaml

    run = tmp_path / "run"
    cfg = cfg_for(pair_dirs, corpus_file, run, stage="all", steps=2, lora_steps=2)
    T.train(cfg, "cpu", log=lambda m: None)
    stitches = (run / "warmup" / "stitch.safetensors").read_bytes()
    trained = yaml.safe_load((run / "run.yaml").read_text())["trained"]
    retrain = {**cfg, "stage": "warmup", "steps": 6, "lr": 1e-2, "ckpt_every": 2}
    real = _die_on_call(monkeypatch, "warmup_step_loss", 5)  # after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        T.train(retrain, "cpu", log=lambda m: None)
    monkeypatch.setattr(T, "warmup_step_loss", real)
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["stage"] == "warmup" and ck["settings"]["steps"] == 6 and ck["settings"]["lr"] == 1e-2
    assert yaml.safe_load((run / "run.yaml").read_text())["trained"] == trained  # the old stitches' record
    assert (run / "warmup" / "stitch.safetensors").read_bytes() == stitches
    with pytest.raises(InputError, match="checkpoint.pt holds an interrupted warm-up \\(step 4\\); finish it"):
        T.train({**cfg, "stage": "lora"}, "cpu", log=lambda m: None)
    with pytest.raises(InputError, match="warmup was trained with steps=6, not 2; .*delete checkpoint.pt"):
        T.train(cfg, "cpu", log=lambda m: None)  # the pending retrain is not skipped as finished
    logs = []
    T.train({**retrain, "stage": "all"}, "cpu", log=logs.append)  # resumes it, then retrains stage 2 from it
    assert any("warmup: resuming at step 4" in m for m in logs)
    now = yaml.safe_load((run / "run.yaml").read_text())["trained"]
    assert now["warmup"]["steps"] == 6 and now["lora"]["from_warmup"] == now["warmup"]
    assert not (run / "checkpoint.pt").exists()


def test_stage_2_of_an_older_warm_up_is_not_the_runs_result(pair_dirs, corpus_file, tmp_path):
    """After --stage warmup retrains the stitches, lora/ was trained from the old ones: 'auto' (eval's result,
    export, the prefill provider) takes the warm-up; an explicit --stage lora still may."""
    run = tmp_path / "run"
    cfg = cfg_for(pair_dirs, corpus_file, run, stage="all", steps=2, lora_steps=2)
    T.train(cfg, "cpu", log=lambda m: None)
    rc = S.run_config(run)
    assert S.pick_stage(run, "auto", rc) == "lora" and S.stage2_stale(rc) is None
    T.train({**cfg, "stage": "warmup", "steps": 3}, "cpu", log=lambda m: None)
    rc = S.run_config(run)
    assert "the warm-up was retrained since" in S.stage2_stale(rc)
    assert S.pick_stage(run, "auto", rc) == "warmup" and S.pick_stage(run, "lora", rc) == "lora"
    T.train({**cfg, "steps": 3}, "cpu", log=lambda m: None)  # --stage all retrains stage 2 from the new stitches
    rc = S.run_config(run)
    assert S.pick_stage(run, "auto", rc) == "lora" and S.stage2_stale(rc) is None


def test_a_model_retrained_in_place_is_refused_and_older_ids_still_match(pair_dirs, corpus_file, tmp_path):
    """Weights rewritten in place keep their file names and sizes (a pair pretrained again): the fingerprint
    samples the weights too. A run folder of the first version (names and sizes only) still matches its unchanged
    models, and is recorded anew."""
    import yaml
    from safetensors.torch import load_file, save_file

    large, small, run, cfg = _trained_on_a_copy_of_the_pair(pair_dirs, corpus_file, tmp_path)
    ids = {k: S.run_config(run)[k] for k in ("large_id", "small_id")}
    assert all(v.startswith(S.FINGERPRINT_VERSION) for v in ids.values())
    # an older run.yaml: ids of version 1, which the same models still give
    old = yaml.safe_load((run / "run.yaml").read_text())
    old.update({k: S.model_fingerprint(d, like="0" * 16) for k, d in (("large_id", large), ("small_id", small))})
    (run / "run.yaml").write_text(yaml.safe_dump(old))
    S.run_config(run)
    T.train(dict(cfg), "cpu", log=lambda m: None)  # skipped as finished; the ids are recorded as version 2
    assert {k: S.run_config(run)[k] for k in ids} == ids
    (w,) = small.glob("*.safetensors")
    tensors = load_file(w)
    save_file({k: v + 0.5 if v.is_floating_point() else v for k, v in tensors.items()}, w, metadata={"format": "pt"})
    assert S.model_fingerprint(small, like="0" * 16) == old["small_id"]  # names and sizes alone: the same
    with pytest.raises(InputError, match="--small folder .* no longer holds the model"):
        S.run_config(run)
    with pytest.raises(InputError, match="no longer holds the model this run was trained with"):
        T.train(dict(cfg), "cpu", log=lambda m: None)
