"""``gpulab kvstitch``: KV-cache stitching between a large prefill model and a small decode model.

Commands: ``pretrain`` (a tiny Llama pair from scratch with one shared tokenizer), ``train``
(stage 1 warm-up and/or stage 2 LoRA, resumable; DDP under torchrun), ``serve-disagg`` (prefill and
decode on two ranks over torch.distributed, the stitched cache handed over), ``eval`` (ROUGE / NLL / TTFT / TPOT / KV bytes
table + YAML), ``tiny`` (pretrain -> train all -> eval in one command: the smoke and seed-sweep
experiment). Heavy imports happen inside the commands.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from gpulab.core.paths import shared_data

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="KV-cache stitching: a large model prefills, a small one decodes from a stitched cache.")

DATA_HELP = "Text corpus (.txt, split 90/10 into train/eval windows) or .jsonl with 'prompt' and 'reference'."
TASK_HELP = ("Of a text corpus: continue (a window, then the text that follows) | recall (text ending in a passage, "
             "its tokens shuffled, then the passage's first tokens again; the reference is what follows them in the "
             "passage)")
REPEAT_HELP = ("Share of pretraining windows that end in a passage (the text's tokens shuffled) followed by itself "
               "again (teaches in-context copying, which --task recall measures).")


def _device() -> str:
    from gpulab.core import options

    return options.resolve_device(what="kvstitch")


@contextmanager
def _tiny_models_threads(device: str, threads: Optional[int] = 1):
    """Stitch training and eval of the tiny sizes (batches of 16, token-by-token decodes) are far too small for
    intra-op threads: on a shared CPU one is fastest. Pretraining batches (32 x 128 tokens) are not: there
    ``threads=None`` takes every CPU this process may use (2 threads ran 1.8-1.9x faster than 1 for tiny-small
    to tiny-large on the 2-core development machine, 2026-11-28). Restored afterwards: ``gpulab run`` runs
    other commands in the same process."""
    import os

    import torch

    old = torch.get_num_threads()
    if device == "cpu":
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _quiet_transformers() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # peft asks transformers' deprecated is_gradient_checkpointing: two lines of FutureWarning on every run
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def _pretrain(data: Path, out: Path, large_size: str, small_size: str, vocab: int, steps: int, batch: int,
              seq_len: int, lr: float, seed: int, repeat_frac: float = 0.0, flag_prefix: str = ""):
    from gpulab.core.results import Record
    from gpulab.stitchkv.pretrain import pretrain_pair

    device = _device()
    with _tiny_models_threads(device, threads=None):
        res = pretrain_pair(data, out, large_size, small_size, vocab, steps, batch, seq_len, lr, seed, device,
                            repeat_frac=repeat_frac, flag_prefix=flag_prefix)
    rec = Record(name="kvstitch-pretrain", config={"data": str(data), "out": str(out), "large_size": large_size,
                                                   "small_size": small_size, "vocab": vocab, "steps": steps,
                                                   "batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed,
                                                   "repeat_frac": repeat_frac, "device": device})
    rec.rows = res["rows"]
    rec.metrics = {k: v for k, v in res.items() if k != "rows"}
    import math

    for r in res["rows"]:
        rec.check(f"{r['model']}_val_loss_below_uniform", math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(res["vocab"]),
                  {"val_loss": r["val_loss"], "uniform": math.log(res["vocab"])})
    large, small = res["rows"]
    rec.summary = {"large_val_loss": large["val_loss"], "small_val_loss": small["val_loss"]}
    if large["val_loss"] >= small["val_loss"]:
        rec.notes.append("the large model's validation loss is not below the small one's: train longer")
    return rec


@app.command()
def pretrain(
    data: Path = typer.Option(shared_data("tinyshakespeare.txt"), "--data", help="Plain-text corpus."),
    out: Path = typer.Option(..., "--pair-dir", "--models", help="Folder to write large/ and small/ (HF format) into."),
    large_size: str = typer.Option("tiny-large", "--large-size", help="nano-large | tiny-large | nano-small | tiny-small"),
    small_size: str = typer.Option("tiny-small", "--small-size", help="Size of the small model."),
    vocab: int = typer.Option(1024, "--vocab", help="BPE vocabulary size of the shared tokenizer."),
    steps: int = typer.Option(1000, "--steps", help="Training steps per model."),
    batch: int = typer.Option(32, "--batch"),
    seq_len: int = typer.Option(128, "--seq-len"),
    lr: float = typer.Option(3e-3, "--lr"),
    repeat_frac: float = typer.Option(0.0, "--repeat-frac", help=REPEAT_HELP),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a tiny large/small Llama pair from scratch with one shared tokenizer."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    _quiet_transformers()
    rec = _pretrain(data, out, large_size, small_size, vocab, steps, batch, seq_len, lr, seed, repeat_frac)
    rec.save()
    rec.print()


def _train_cfg(**kw) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}


def _train(cfg: dict, ctx=None):
    import math

    from gpulab.core.results import Record
    from gpulab.stitchkv.train import train as run_train

    device = ctx.device if ctx is not None else _device()
    res = run_train(cfg, device, dist_ctx=ctx)
    rec = Record(name="kvstitch-train", config={**cfg, "device": device})
    rec.metrics = {"alignment": res["align"], "large_shape": res["large_shape"], "small_shape": res["small_shape"],
                   "distributed": res.get("distributed")}
    for st in ("warmup", "lora", "lora_control"):
        if st in res:
            r = res[st]
            rec.metrics[st] = r
            if "skipped" in r:
                rec.rows.append({"stage": st, "note": r["skipped"]})
                continue
            rec.rows.append({"stage": st, "steps": r["steps"], "loss_first": r["loss_first"], "loss_last": r["loss_last"],
                             "heldout_nmse": r.get("heldout_nmse"), "seconds": r["seconds"]})
            hist = r["loss_history"]
            rec.check(f"{st}_losses_finite", all(math.isfinite(x) for x in hist), {"steps": len(hist)})
            rec.summary[f"{st}_loss_last"] = r["loss_last"]
    rec.summary["alignment"] = ",".join(map(str, res["align"]))
    rec.notes.extend(res.get("notes", []))
    return rec


@app.command()
def train(
    click_ctx: typer.Context,
    large: Path = typer.Option(..., "--large", help="Large (prefill) model folder, Hugging Face format."),
    small: Path = typer.Option(..., "--small", help="Small (decode) model folder; must share the tokenizer."),
    data: Path = typer.Option(shared_data("tinyshakespeare.txt"), "--data", help=DATA_HELP),
    task: str = typer.Option("continue", "--task", help=TASK_HELP),
    run: Path = typer.Option(..., "--run", "--run-dir", "--out", help="Run folder for stitches, adapters, checkpoints (resumable)."),
    stage: str = typer.Option("all", "--stage", help="warmup | lora | all"),
    steps: int = typer.Option(200, "--steps", help="Stage-1 (warm-up) steps."),
    lora_steps: int = typer.Option(200, "--lora-steps", help="Stage-2 (LoRA) steps."),
    alignment: str = typer.Option("uniform-nearest", "--alignment",
                                  help="uniform-nearest | last-aligned | first-aligned | comma list of large layers"),
    stitch_input: str = typer.Option("hidden", "--stitch-input", help="hidden (attention input) | kv (pre-RoPE K/V) | residual (small model's own "
                                           "attention input + a zero-initialised map of the large model's)"),
    init: str = typer.Option("ls", "--init", help="ls (closed-form ridge least squares) | random | identity"),
    loss: str = typer.Option("mse", "--loss", help="Warm-up loss: mse | l1"),
    batch: int = typer.Option(16, "--batch"),
    prompt_len: int = typer.Option(64, "--prompt-len"),
    cont_len: int = typer.Option(32, "--cont-len", help="Continuation tokens of the stage-2 LM loss (>= 2 with stage "
                                 "2); the warm-up's prompts are drawn from windows of prompt + continuation too."),
    lr: float = typer.Option(1e-3, "--lr", help="Warm-up learning rate."),
    lora_lr: float = typer.Option(1e-3, "--lora-lr"),
    stitch_lr: Optional[float] = typer.Option(None, "--stitch-lr", help="Stage-2 learning rate of the stitches "
                                                                       "(default: --lora-lr)."),
    lora_r: int = typer.Option(8, "--lora-r"),
    lora_alpha: int = typer.Option(16, "--lora-alpha"),
    lora_targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj", "--lora-targets"),
    ls_batches: int = typer.Option(4, "--ls-batches", help="Batches for the least-squares fit."),
    ridge: float = typer.Option(1e-3, "--ridge",
                                help="Ridge on the weights (not the bias), relative to the mean feature energy."),
    ckpt_every: int = typer.Option(50, "--ckpt-every", help="Checkpoint every N steps (0: only at stage end)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 (model weights)."),
    lora_control: bool = typer.Option(True, "--lora-control/--no-lora-control",
                                      help="After stage 2, train the same LoRA on the small model alone (no "
                                           "stitches) as the control that eval compares stitched-lora with."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train the stitches (stage 1) and LoRA + stitches end to end (stage 2); rerun to resume.

    Under ``torchrun --nproc-per-node N``: DDP over the stitches and the LoRA parameters (nccl on GPUs,
    gloo on the CPU), each rank its 1/N of every --batch, rank 0 alone writes checkpoints and the record."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now
    from gpulab.core.clickcompat import refuse_unused

    # a warm-up trains no LoRA: stage 2's options would be ignored (a later --stage lora takes its own)
    refuse_unused(click_ctx, {"lora_steps": "--lora-steps", "lora_lr": "--lora-lr", "stitch_lr": "--stitch-lr",
                              "lora_r": "--lora-r", "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets",
                              "lora_control": "--lora-control" if lora_control else "--no-lora-control"},
                  stage != "warmup", "--stage lora or all")
    # stage 2 alone starts from the warm-up stitches in the run folder (it neither trains nor checks a warm-up):
    # the warm-up's options would be ignored
    refuse_unused(click_ctx, {"steps": "--steps", "lr": "--lr", "init": "--init", "loss": "--loss",
                              "ls_batches": "--ls-batches", "ridge": "--ridge"},
                  stage != "lora", "--stage warmup or all")

    _quiet_transformers()
    from gpulab.stitchkv import distributed

    ctx = distributed.setup(_device(), what="kvstitch train")
    try:
        rec = _train(_train_cfg(large=large, small=small, data=data, task=task, run=run, stage=stage, steps=steps,
                            lora_steps=lora_steps, alignment=alignment, stitch_input=stitch_input, init=init,
                            loss=loss, batch=batch, prompt_len=prompt_len, cont_len=cont_len, lr=lr,
                            lora_lr=lora_lr, stitch_lr=stitch_lr, lora_r=lora_r, lora_alpha=lora_alpha,
                            lora_targets=lora_targets,
                            ls_batches=ls_batches, ridge=ridge, ckpt_every=ckpt_every, dtype=dtype,
                            lora_control=lora_control, seed=seed), ctx)
        if ctx.world > 1:
            rec.notes.append(f"{ctx.world} ranks ({ctx.backend}): DDP, each rank {batch // ctx.world} of every "
                             f"global batch of {batch}; losses are means over the ranks")
        if ctx.is_main:
            rec.save()
            rec.print()
        ctx.close(sync=True)  # every rank leaves together, once rank 0 has written the record
    finally:
        ctx.close()


@app.command("eval")
def eval_cmd(
    run: Path = typer.Option(..., "--run", "--run-dir", help="A 'kvstitch train' run folder."),
    data: Optional[Path] = typer.Option(None, "--data", help="Override the run's data (" + DATA_HELP + ")"),
    prompts: int = typer.Option(32, "--prompts", help="Held-out prompts."),
    prompt_len: int = typer.Option(0, "--prompt-len", help="Prompt tokens (0: the run's --prompt-len)."),
    gen_len: int = typer.Option(32, "--gen-len", help="Tokens generated per prompt. A text corpus's reference is "
                                "the next --gen-len tokens; a .jsonl record's reference text is scored whole "
                                "by ROUGE (its reference NLL covers the first --gen-len tokens)."),
    batch: int = typer.Option(16, "--batch"),
    goal_gap: Optional[float] = typer.Option(None, "--goal-gap", help="Add a check: stitched ROUGE-L recovers >= this fraction of the gap."),
) -> None:
    """ROUGE-1/2/L, reference NLL, TTFT/TPOT and KV bytes: small, large, stitched (stage 1, stage 2)."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    _quiet_transformers()
    from gpulab.stitchkv.evaluate import evaluate

    rec = evaluate(run, _device(), prompts, prompt_len or None, gen_len, batch, data, goal_gap)
    rec.save()
    rec.print()


@app.command("export")
def export(
    run: Path = typer.Option(..., "--run", "--run-dir", help="A 'kvstitch train' run folder."),
    out: Path = typer.Option(..., "--out-dir", "-o", help="Folder to write (a Hugging Face model folder)."),
    stage: str = typer.Option("auto", "--stage", help="auto (lora if trained, else warmup) | warmup | lora"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out-dir if it exists."),
) -> None:
    """Write the small model the run decodes with (stage-2 LoRA merged) for serving with vajra:
    gpulab serve OUT --prefill stitchkv=RUN (large-model prefill + stitches, small-model decode)."""
    _quiet_transformers()
    from gpulab.stitchkv.export import export_small

    stage = export_small(run, out, stage, overwrite)
    suffix = "" if stage == "lora" else "@warmup"
    typer.echo(f"kvstitch export: {out} (stage {stage}); serve it with\n"
               f"  gpulab serve {out} --prefill stitchkv={run}{suffix}")


@app.command("serve-disagg")
def serve_disagg(
    run: Path = typer.Option(..., "--run-dir", "--run", help="A 'kvstitch train' run folder (use --run-dir under torchrun)."),
    stage: str = typer.Option("auto", "--stage", help="Stitches of: auto (lora if trained, else warmup) | warmup | lora"),
    prompts: int = typer.Option(16, "--prompts", help="Held-out prompts of the run's data."),
    prompt_len: int = typer.Option(0, "--prompt-len", help="Prompt tokens (0: the run's --prompt-len)."),
    gen_len: int = typer.Option(32, "--gen-len", help="Tokens generated per prompt (>= 2)."),
    batch: int = typer.Option(8, "--batch", help="Prompts per prefill batch."),
    check: bool = typer.Option(True, "--check/--no-check", help="Also decode in one process on rank 0: tokens must match."),
    timeout: int = typer.Option(600, "--timeout", help="Seconds before a self-launched run (and each collective) gives up."),
) -> None:
    """Prefill on rank 0 (large model), stitched KV sent to rank 1, decode there (small): TTFT, TPOT, hand-over.

    One record, from rank 0, with ROUGE and the hand-over bytes/time. Run it under ``torchrun --nproc-per-node 2`` (one GPU per rank: nccl; otherwise gloo); without torchrun it
    starts the 2 ranks itself on this machine."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    _quiet_transformers()
    import os

    from gpulab.stitchkv import disagg

    if timeout < 1:
        from gpulab.core.errors import InputError

        raise InputError(f"--timeout must be >= 1, got {timeout}")
    disagg.validate(run, stage, prompts, gen_len, batch, prompt_len or None)
    if "WORLD_SIZE" not in os.environ:
        _launch_two_ranks(["kvstitch", "serve-disagg", "--run-dir", str(run), "--stage", stage, "--prompts", str(prompts),
                           "--prompt-len", str(prompt_len), "--gen-len", str(gen_len), "--batch", str(batch),
                           "--check" if check else "--no-check", "--timeout", str(timeout)], timeout)
        return
    os.environ.setdefault("KVSTITCH_DIST_TIMEOUT_S", str(timeout))
    rec = disagg.serve(run, stage, prompts, prompt_len or None, gen_len, batch, check, _device())
    if rec is not None:
        rec.save()
        rec.print()


def _launch_two_ranks(args: list[str], timeout: int) -> None:
    """``torchrun --standalone --nproc-per-node 2 -m gpulab <global options> <args>``, killed after ``timeout`` s."""
    import os
    import subprocess
    import sys

    from gpulab.core import options, results
    from gpulab.core.child import kill_group, killed_with_parent
    from gpulab.core.errors import GpulabError

    o = options.get()
    before = set(Path(o.out).glob("kvstitch-disagg-*.yaml"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gpulab",
           "--device", o.device, "--out", str(o.out), *args]
    env = {**os.environ, "KVSTITCH_DIST_TIMEOUT_S": str(timeout), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    with killed_with_parent(proc):  # a signal that ends this process (e.g. `timeout`) ends the ranks too
        try:
            code = proc.wait(timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.wait()
            raise GpulabError(f"kvstitch serve-disagg: the 2 ranks did not finish within {timeout + 30} s "
                              "(killed)") from None
    if code != 0:
        raise GpulabError(f"kvstitch serve-disagg: the 2 ranks failed (torchrun exit {code}; their errors are above)")
    # rank 0 wrote the record in its own process: list it as written here too (``gpulab run`` reads that list)
    results.written.extend(sorted(set(Path(o.out).glob("kvstitch-disagg-*.yaml")) - before))


@app.command()
def tiny(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Folder for the pair and the run "
                                           "(default: <--out>/kvstitch-tiny)."),
    data: Path = typer.Option(shared_data("tinyshakespeare.txt"), "--data", help="Plain-text corpus."),
    task: str = typer.Option("continue", "--task", help=TASK_HELP),
    large_size: str = typer.Option("tiny-large", "--large-size"),
    small_size: str = typer.Option("tiny-small", "--small-size"),
    vocab: int = typer.Option(1024, "--vocab"),
    pretrain_steps: int = typer.Option(1000, "--pretrain-steps"),
    pretrain_batch: int = typer.Option(32, "--pretrain-batch"),
    pretrain_lr: float = typer.Option(3e-3, "--pretrain-lr", help="Peak AdamW learning rate of the pair's pretraining."),
    repeat_frac: float = typer.Option(0.0, "--repeat-frac", help=REPEAT_HELP),
    seq_len: int = typer.Option(128, "--seq-len"),
    steps: int = typer.Option(200, "--steps", help="Stage-1 steps."),
    lora_steps: int = typer.Option(200, "--lora-steps", help="Stage-2 steps."),
    lora_lr: float = typer.Option(1e-3, "--lora-lr", help="Stage-2 learning rate (LoRA and stitches)."),
    lora_r: int = typer.Option(8, "--lora-r"),
    lora_alpha: int = typer.Option(16, "--lora-alpha"),
    lora_targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj", "--lora-targets",
                                     help="Small-model modules that get a LoRA (comma list)."),
    batch: int = typer.Option(16, "--batch", help="Stitch-training batch."),
    prompt_len: int = typer.Option(64, "--prompt-len"),
    cont_len: int = typer.Option(32, "--cont-len"),
    alignment: str = typer.Option("uniform-nearest", "--alignment"),
    stitch_input: str = typer.Option("hidden", "--stitch-input"),
    prompts: int = typer.Option(32, "--prompts"),
    gen_len: int = typer.Option(32, "--gen-len"),
    goal_gap: Optional[float] = typer.Option(None, "--goal-gap"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """pretrain a tiny pair -> train both stages -> eval, in one command (one record, kvstitch-tiny)."""
    from gpulab.core.results import check_out

    check_out()  # before any work: an --out that cannot take the result fails now

    _quiet_transformers()
    if workdir is None:
        from gpulab.core import options

        workdir = Path(options.get().out) / "kvstitch-tiny"
    with _tiny_models_threads(_device()):
        rec = _tiny(workdir, data, large_size=large_size, small_size=small_size, vocab=vocab,
                    pretrain_steps=pretrain_steps, pretrain_batch=pretrain_batch, pretrain_lr=pretrain_lr,
                    seq_len=seq_len, repeat_frac=repeat_frac, task=task, steps=steps, lora_steps=lora_steps,
                    lora_lr=lora_lr, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets, batch=batch,
                    prompt_len=prompt_len, cont_len=cont_len, alignment=alignment, stitch_input=stitch_input,
                    prompts=prompts, gen_len=gen_len, goal_gap=goal_gap, seed=seed)
    rec.save()
    rec.print()


def _tiny(workdir, data, *, large_size, small_size, vocab, pretrain_steps, pretrain_batch, pretrain_lr, seq_len,
          repeat_frac, task, steps, lora_steps, lora_lr, lora_r, lora_alpha, lora_targets, batch, prompt_len,
          cont_len, alignment, stitch_input, prompts, gen_len, goal_gap, seed):
    import shutil
    import time

    from gpulab.stitchkv.data import read_text
    from gpulab.stitchkv.evaluate import check_eval_options, evaluate
    from gpulab.stitchkv.models import tiny_llama
    from gpulab.stitchkv.pretrain import check_options as check_pretrain_options
    from gpulab.stitchkv.train import lora_targets as check_lora_targets, validate_cfg

    t0 = time.perf_counter()
    wd = workdir / f"seed{seed}"
    cfg = _train_cfg(large=wd / "pair" / "large", small=wd / "pair" / "small", data=data, task=task, run=wd / "run",
                     stage="all", steps=steps, lora_steps=lora_steps, alignment=alignment, stitch_input=stitch_input,
                     init="ls", loss="mse", batch=batch, prompt_len=prompt_len, cont_len=cont_len, lr=1e-3,
                     lora_lr=lora_lr, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets, ls_batches=4,
                     ridge=1e-3, ckpt_every=0, dtype="float32", lora_control=True, seed=seed)
    # the options' errors before minutes of pretraining, and before the old run folder goes
    read_text(data)  # a missing or unreadable file
    check_pretrain_options(large_size, small_size, vocab, pretrain_steps, pretrain_batch, seq_len, pretrain_lr,
                           repeat_frac, flag_prefix="pretrain-")
    validate_cfg(cfg)
    check_lora_targets(tiny_llama(small_size, 8, 8, seed=0), cfg)
    check_eval_options(prompts, prompt_len, gen_len, batch)
    shutil.rmtree(wd / "run", ignore_errors=True)  # a fresh pair: stitches of an earlier pair must not be resumed
    pre = _pretrain(data, wd / "pair", large_size, small_size, vocab, pretrain_steps, pretrain_batch, seq_len, pretrain_lr,
                    seed, repeat_frac, flag_prefix="pretrain-")
    t1 = time.perf_counter()
    tr = _train(cfg)
    t2 = time.perf_counter()
    rec = evaluate(wd / "run", _device(), prompts, prompt_len, gen_len, batch, None, goal_gap, name="kvstitch-tiny")
    rec.config.update({"seed": seed, "pretrain": pre.config, "train_stages": {
        "steps": steps, "lora_steps": lora_steps, "lora_lr": lora_lr, "lora_r": lora_r, "lora_alpha": lora_alpha,
        "lora_targets": lora_targets}})
    rec.metrics.update({"pretrain": pre.rows, "train": tr.rows,
                        "seconds": {"pretrain": t1 - t0, "train": t2 - t1, "eval": time.perf_counter() - t2}})
    for src in (pre, tr):
        for k, c in src.checks.items():
            rec.checks[f"{src.name.split('-')[1]}:{k}"] = c
        rec.notes.extend(src.notes)
    rec.summary = {"seed": seed, "large_val_loss": pre.summary["large_val_loss"],
                   "small_val_loss": pre.summary["small_val_loss"], **rec.summary}
    return rec
