"""Two-stage stitch training, resumable from checkpoints in the run folder.

The run folder (layout, resume and skip rules): :mod:`gpulab.stitchkv.run_folder`.

Stage 1 (warm-up): both models frozen; the stitches regress the stitched cache onto the small
model's own cache of the same prompt (MSE or L1 over K and V of every layer).
Stage 2 (end to end): LoRA on the small model + the stitches; language-modelling loss of the
continuation decoded by the small model from the stitched cache of the prompt (teacher forcing;
the first continuation token is the large model's, so the loss covers tokens 2..C).

Several processes (``torchrun --nproc-per-node N``, see :mod:`gpulab.stitchkv.distributed`): every
rank draws the same global batch of ``--batch`` windows and keeps its own ``batch / N`` rows (a .jsonl
corpus: N records per step, one per rank); the stitches (stage 1) and the stitches + LoRA (stage 2)
are wrapped in DistributedDataParallel, which averages the gradients: with equal shards that is the
gradient of the global batch, so N ranks follow the single-process run up to float rounding. The
least-squares fit and the held-out NMSE use whole (unsharded) batches on every rank. Rank 0 alone
writes run.yaml, checkpoints and stage results; every rank reads a checkpoint to resume (the run
folder must be on a file system all ranks see). Logged losses are means over the ranks.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from gpulab.core import atomic
from gpulab.core.errors import InputError
from gpulab.stitchkv.run_folder import (
    PATH_FIELDS, check_run_config, load_checkpoint, read_run_yaml, record_stage, save_checkpoint, stage_plan,
    stage_record, stage_settings, write_run_yaml,
)
from gpulab.stitchkv.step_losses import StepLosses
from gpulab.stitchkv.store import FINGERPRINT_FIELDS, first_line, load_bank, model_fingerprint, save_bank, save_stage2

STAGES = ("warmup", "lora", "all")
LOSSES = ("mse", "l1")
INITS = ("ls", "random", "identity")


def kv_loss(pred: list[tuple[Any, Any]], target: list[tuple[Any, Any]], kind: str = "mse") -> Any:
    import torch.nn.functional as F

    fn = F.mse_loss if kind == "mse" else F.l1_loss
    total = 0.0
    for (pk, pv), (tk, tv) in zip(pred, target):
        total = total + 0.5 * (fn(pk.float(), tk.float()) + fn(pv.float(), tv.float()))
    return total / len(pred)


def nmse_parts(pred: list[tuple[Any, Any]], target: list[tuple[Any, Any]]) -> tuple[float, float]:
    """(squared error, squared deviation of the target from its mean) over all stitched K and V tensors."""
    num = sum(float(((p - t) ** 2).sum()) for pt, tt in zip(pred, target) for p, t in zip(pt, tt))
    den = sum(float(((t - t.mean()) ** 2).sum()) for tt in target for t in tt)
    return num, den


def nmse(pred: list[tuple[Any, Any]], target: list[tuple[Any, Any]]) -> float:
    """Normalized MSE (1 - R^2) over all stitched K and V tensors."""
    num, den = nmse_parts(pred, target)
    return num / den if den > 0 else float("nan")


def heldout_prompts(corpus: Any, cfg: dict[str, Any]) -> list[Any]:
    """Up to --batch prompts of the validation split (never trained on; as many as it holds), in equal-length
    batches: what the warm-up's held-out NMSE is measured on."""
    import torch

    from gpulab.stitchkv import data as D

    groups: dict[int, list[Any]] = {}
    n = min(cfg["batch"], D.eval_room(corpus, cfg["prompt_len"], 1))  # --batch is not an eval option: never refused
    for p, _ in D.eval_windows(corpus, n, cfg["prompt_len"], 1):
        groups.setdefault(len(p), []).append(p)
    return [torch.stack(g) for g in groups.values()]


def stitched_lm(bank: Any, small: Any) -> Any:
    """An nn.Module holding the stitches and the (LoRA) small model: ``(feats, pos, tokens) -> logits``
    of ``tokens`` decoded from the stitched cache (one module, so that DDP sees every trainable parameter)."""
    from torch import nn

    from gpulab.stitchkv.models import cache_kwarg
    from gpulab.stitchkv.stitch import build_cache

    class StitchedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bank, self.small = bank, small
            self._kw = cache_kwarg(small)

        def forward(self, feats: Any, pos: Any, tokens: Any) -> Any:
            cache = build_cache(self.bank(feats, self.small, pos))
            return self.small(input_ids=tokens, use_cache=True, **{self._kw: cache}).logits

    return StitchedLM()


def lm_loss_stitched(large: Any, small: Any, bank: Any, prompt: Any, cont: Any, module: Any = None) -> Any:
    """Mean next-token cross-entropy of cont[:, 1:] decoded by ``small`` from the stitched cache.

    ``module``: a (DDP-wrapped) :func:`stitched_lm` of this bank and small model to run instead."""
    import torch
    import torch.nn.functional as F

    from gpulab.stitchkv.stitch import own_features, stitch_inputs

    with torch.no_grad():  # the large model is frozen
        feats = stitch_inputs(large, small, bank, prompt, with_own=False)
    if bank.mode == "residual":  # the small model's own prefill, with its gradient (its LoRA, in stage 2)
        feats["own"] = own_features(small, bank, prompt)
    pos = torch.arange(prompt.shape[1], device=prompt.device).unsqueeze(0).expand(prompt.shape[0], -1)
    logits = (module or stitched_lm(bank, small))(feats, pos, cont[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), cont[:, 1:].reshape(-1))


def warmup_step_loss(large: Any, small: Any, bank: Any, prompt: Any, loss: str,
                     module: Any = None) -> tuple[Any, list, list]:
    """Warm-up loss of the stitched cache against the small model's own; ``module``: a DDP-wrapped bank."""
    import torch

    from gpulab.stitchkv.reference import own_cache
    from gpulab.stitchkv.stitch import stitch_inputs

    with torch.no_grad():
        feats = stitch_inputs(large, small, bank, prompt)
        target = own_cache(small, prompt)
    pos = torch.arange(prompt.shape[1], device=prompt.device).unsqueeze(0).expand(prompt.shape[0], -1)
    pred = (module or bank)(feats, small, pos)
    return kv_loss(pred, target, loss), pred, target


def rank_batches(corpus: Any, cfg: dict[str, Any], seed: int, skip: int, rank: int = 0, world: int = 1):
    """This rank's share of the single-process run's batches (after ``skip`` steps): rows
    ``[rank * B/world, (rank + 1) * B/world)`` of each global text batch; for .jsonl (one record per
    step and process) ``world`` records per step, record ``rank`` of them."""
    from gpulab.stitchkv import data as D

    it = D.train_batches(corpus, cfg["batch"], cfg["prompt_len"], cfg["cont_len"], seed)
    per = world if corpus.kind == "jsonl" else 1
    for _ in range(skip * per):
        next(it)
    while True:
        items = [next(it) for _ in range(per)]
        p, c = items[rank] if per > 1 else items[0]
        if world > 1 and corpus.kind != "jsonl":
            b = cfg["batch"] // world
            p, c = p[rank * b:(rank + 1) * b], c[rank * b:(rank + 1) * b]
        yield p, c


def grad_scaler(cfg: dict[str, Any], device: str) -> Any:
    """A GradScaler for float16 model weights (their activation gradients underflow without loss scaling;
    the trained parameters, stitches and LoRA, are float32); None for float32 and bfloat16."""
    if cfg.get("dtype", "float32") != "float16":
        return None
    import torch

    return torch.amp.GradScaler(str(device).split(":")[0])


def _optim_state(opt: Any, scaler: Any) -> dict[str, Any]:
    """What a checkpoint keeps of the optimizer and the loss scaler (None without one)."""
    return {"opt": opt.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}


def _restore_optim(st: dict[str, Any], opt: Any, scaler: Any) -> None:
    try:
        opt.load_state_dict(st["opt"])
    except ValueError as e:  # e.g. a stage-2 checkpoint from before the stitches got their own --stitch-lr group
        raise InputError(f"checkpoint.pt: its optimizer state does not fit this run ({first_line(e)}); delete it "
                         "to restart the stage") from None
    if scaler is not None and st.get("scaler"):
        scaler.load_state_dict(st["scaler"])


def _optimizer_step(opt: Any, loss: Any, scaler: Any = None) -> None:
    """Backward + update (loss-scaled with ``scaler``)."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)  # skipped (and the scale lowered) when a gradient overflowed
        scaler.update()


def _run_steps(ctx: Any, device: str, stage: str, lr_flag: str, start: int, n: int, done: list[float], every: int,
               step_loss: Any, opt: Any, scaler: Any, log: Any, log_line: Any, checkpoint: Any) -> list[float]:
    """A stage's steps ``start``..``n - 1``: ``step_loss()`` (the next batch's loss), an optimizer step, a log
    line every tenth of the stage (``log_line(step, loss)``) and every ``every`` steps a checkpoint
    (``checkpoint(step, hist)``, rank 0 alone) of the losses read back and checked on every rank first (a
    collective). ``done``: the losses of the steps before ``start`` (resumed); returns all ``n`` losses."""
    losses = StepLosses(ctx, device, n, done, stage, lr_flag)
    for step in range(start, n):
        loss = step_loss()
        _optimizer_step(opt, loss, scaler)
        losses.add(step, loss)
        if step % max(1, n // 10) == 0:
            log(log_line(step, losses.read(step + 1)[-1]))
        if every and (step + 1) % every == 0 and step + 1 < n:
            hist = losses.read(step + 1)
            if ctx.is_main:
                checkpoint(step + 1, list(hist))
    return losses.read(n)


def _stage_result(steps: int, hist: list[float], t0: float, **extra: Any) -> dict[str, Any]:
    return {"steps": steps, "loss_first": hist[0] if hist else None, "loss_last": hist[-1] if hist else None,
            "loss_history": hist, **extra, "seconds": time.perf_counter() - t0}


def validate_cfg(cfg: dict[str, Any]) -> None:
    """The checks of the training options that need no model (one-line errors)."""
    from gpulab.stitchkv.stitch import MODES

    for key, choices in (("stage", STAGES), ("loss", LOSSES), ("init", INITS), ("stitch_input", MODES)):
        if cfg[key] not in choices:
            raise InputError(f"--{key.replace('_', '-')} must be one of {', '.join(choices)}, got {cfg[key]!r}")
    for k, low in (("steps", 0), ("lora_steps", 0), ("ckpt_every", 0), ("batch", 1), ("prompt_len", 1),
                   ("cont_len", 1), ("lora_r", 1), ("ls_batches", 1)):
        v = cfg.get(k, low)
        if v < low:
            raise InputError(f"--{k.replace('_', '-')} must be >= {low}, got {v}")
    for k in ("lr", "lora_lr", "lora_alpha"):
        if not cfg[k] > 0:
            raise InputError(f"--{k.replace('_', '-')} must be > 0, got {cfg[k]}")
        if not math.isfinite(cfg[k]):  # an infinite rate makes every trained weight NaN after one step
            raise InputError(f"--{k.replace('_', '-')} must be a finite number, got {cfg[k]}")
    if cfg["stage"] in ("lora", "all") and cfg["cont_len"] < 2:
        raise InputError(f"--cont-len must be >= 2 for stage 2 (its loss predicts continuation tokens 2..C from "
                         f"token 1), got {cfg['cont_len']}")
    if cfg.get("stitch_lr") is not None:
        if not cfg["stitch_lr"] > 0:
            raise InputError(f"--stitch-lr must be > 0, got {cfg['stitch_lr']}")
        if not math.isfinite(cfg["stitch_lr"]):
            raise InputError(f"--stitch-lr must be a finite number, got {cfg['stitch_lr']}")
    if not cfg["ridge"] >= 0:
        raise InputError(f"--ridge must be >= 0, got {cfg['ridge']}")
    if not math.isfinite(cfg["ridge"]):
        raise InputError(f"--ridge must be a finite number, got {cfg['ridge']}")
    from gpulab.stitchkv.data import check_task

    check_task(cfg.get("task", "continue"))


def train(cfg: dict[str, Any], device: str, log: Any = print, dist_ctx: Any = None) -> dict[str, Any]:
    """Run the requested stage(s); returns per-stage metrics (loss histories, times, steps).

    ``dist_ctx``: a :class:`gpulab.stitchkv.distributed.Ctx` of several ranks (None: one process)."""
    import torch

    from gpulab.stitchkv import data as D
    from gpulab.stitchkv.distributed import Ctx, ddp
    from gpulab.stitchkv.models import check_length, load_pair, shape_of
    from gpulab.stitchkv.stitch import alignment, make_bank, least_squares_init

    validate_cfg(cfg)
    cfg = {"stitch_lr": None, "dtype": "float32", "lora_control": False, "task": "continue", **cfg}
    stage = cfg["stage"]
    ctx = dist_ctx or Ctx(device=device)
    rank, world = ctx.rank, ctx.world
    if world > 1 and cfg["batch"] % world:
        raise InputError(f"--batch {cfg['batch']} is not divisible by the {world} ranks")
    if not ctx.is_main:
        log = lambda m: None  # noqa: E731 - rank 0 alone reports
    run = Path(cfg["run"])
    stage2 = stage in ("lora", "all")
    pair = load_pair(cfg["large"], cfg["small"], device=device, dtype=cfg["dtype"])
    corpus = D.load_corpus(cfg["data"], pair.tokenizer, min_ref=2 if stage2 else 1, task=cfg["task"])
    # bad options are one-line errors before run.yaml pins the run folder to them
    ls, ss = shape_of(pair.large), shape_of(pair.small)
    align = alignment(cfg["alignment"], ls["layers"], ss["layers"])
    next(D.train_batches(corpus, cfg["batch"], cfg["prompt_len"], cfg["cont_len"], 0))  # the data holds a window
    if stage2:
        lora_targets(pair.small, cfg)
    check_length(pair, cfg["prompt_len"] + (cfg.get("cont_len") or 0) + 1)
    if cfg.get("init") == "identity" and stage in ("warmup", "all"):  # before run.yaml pins the folder
        with torch.device("meta"):
            make_bank(ls, ss, align, cfg["stitch_input"]).identity_()
    if stage == "lora" and not (run / "warmup" / "stitch.safetensors").is_file():
        raise InputError(f"{run}: stage 'lora' needs the warm-up stitches first (run --stage warmup or all)")
    ckpt_p = run / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_p)
    cfg.update({k: str(Path(cfg[k]).resolve()) for k in PATH_FIELDS})
    cfg.update({id_key: model_fingerprint(cfg[key]) for key, id_key in FINGERPRINT_FIELDS.items()})
    cfg["prompt_bos"] = list(corpus.bos)  # what every prompt starts with (the tokenizer's BOS, if it adds one)
    old = read_run_yaml(run)
    plan = stage_plan(run, stage, cfg, ckpt, old.get("trained", {}))
    held = heldout_prompts(corpus, cfg) if plan.get("warmup") in ("train", "resume") else []
    settings = stage_settings(cfg, world if corpus.kind == "jsonl" else None)
    saved = check_run_config(run, old, cfg, plan, settings, ckpt)
    at = ckpt.get("stage") if ckpt else None
    if at is not None and plan.get(at) != "resume":
        if at == "warmup" and "warmup" not in plan:  # --stage lora would build on the old stitches and lose it
            raise InputError(f"{run}/checkpoint.pt holds an interrupted warm-up (step {ckpt.get('step')}); finish "
                             "it with --stage warmup (or all), or delete checkpoint.pt to keep the stitches there")
        fresh = [n for n, how in plan.items() if how == "train"]
        if fresh:  # their first checkpoint replaces it
            log(f"checkpoint.pt of an interrupted {at} (step {ckpt.get('step')}) will be replaced: this call trains "
                f"{', '.join(fresh)} from scratch")
    if ctx.is_main:
        write_run_yaml(run, saved)
    ctx.barrier()  # run.yaml written, nothing of this run saved yet: every rank sees the same folder
    cfg = saved

    def pin(name: str) -> None:
        """Record in run.yaml the settings of ``name``'s result, once it is in its folder (rank 0 writes)."""
        record_stage(saved, name, settings[name])
        if ctx.is_main:
            write_run_yaml(run, saved)

    def save_ckpt(name: str, state: dict[str, Any]) -> None:  # the settings it is trained with go with it
        save_checkpoint(ckpt_p, name, {**state, "settings": stage_record(saved, name, settings[name])})

    def finish(name: str, write_folder: Any) -> None:
        """Stage ``name``'s result into its folder, then its record in run.yaml, then its checkpoint is gone:
        killed in between, the checkpoint resumes the stage and writes both again."""
        if ctx.is_main:
            write_folder()
        pin(name)
        if ctx.is_main:
            ckpt_p.unlink(missing_ok=True)
        ctx.barrier()

    torch.manual_seed(cfg["seed"])
    results: dict[str, Any] = {"align": align, "large_shape": ls, "small_shape": ss, "notes": []}
    every = cfg.get("ckpt_every") or 0
    results["distributed"] = {"world_size": world, "backend": ctx.backend,
                              "global_batch": cfg["batch"] * (world if corpus.kind == "jsonl" else 1),
                              "per_rank_batch": 1 if corpus.kind == "jsonl" else cfg["batch"] // world}
    if corpus.kind == "jsonl":
        results["notes"].append(f"--batch {cfg['batch']} is not used for training on .jsonl data: records differ in "
                                f"length, so each step takes one record per rank ({world} per step); --batch only "
                                "sets how many validation records the held-out NMSE uses")

    def batches(offset: int, skip: int, shard: bool = True):
        for p, c in rank_batches(corpus, cfg, cfg["seed"] * 1000 + offset, skip, rank if shard else 0,
                                 world if shard else 1):
            yield p.to(device), c.to(device)

    def resumed(name: str) -> dict[str, Any] | None:
        return ckpt if plan.get(name) == "resume" else None

    # ---------------------------------------------------------------- stage 1
    if plan.get("warmup") == "skip":
        log(f"warmup: already done in {run / 'warmup'}, skipped")
        results["warmup"] = {"skipped": "already trained"}
    elif "warmup" in plan:
        bank = make_bank(ls, ss, align, cfg["stitch_input"]).to(device)
        st = resumed("warmup")
        t0 = time.perf_counter()
        start, hist = 0, []
        opt = torch.optim.AdamW(bank.parameters(), lr=cfg["lr"], weight_decay=0.0)
        scaler = grad_scaler(cfg, device)
        r2 = None
        residual = bank.mode == "residual"
        n_steps = 0 if residual else cfg["steps"]
        if st is not None:
            bank.load_state_dict(st["bank"])
            _restore_optim(st, opt, scaler)
            start, hist = st["step"], st["hist"]
            log(f"warmup: resuming at step {start}")
        elif residual:  # zero maps reproduce the small model's own cache: the warm-up optimum already
            bank.reset_random(cfg["seed"])
            log("warmup: residual stitches start at zero (the small model's own cache): nothing to regress")
        elif cfg["init"] == "ls":
            it = batches(7, 0, shard=False)
            r2 = least_squares_init(bank, pair.large, pair.small, [next(it)[0] for _ in range(cfg["ls_batches"])],
                                    ridge=cfg["ridge"])
        elif cfg["init"] == "identity":
            bank.identity_()
        else:
            bank.reset_random(cfg["seed"])
        wrapped = ddp(bank, ctx)
        it = batches(1, start)
        hist = _run_steps(
            ctx, device, "warmup", "--lr", start, n_steps, hist, every,
            lambda: warmup_step_loss(pair.large, pair.small, bank, next(it)[0], cfg["loss"], module=wrapped)[0],
            opt, scaler, log, lambda step, v: f"warmup step {step}: {cfg['loss']} {v:.5g}",
            lambda step, h: save_ckpt("warmup", {"step": step, "bank": bank.state_dict(),
                                                 **_optim_state(opt, scaler), "hist": h}))
        num = den = 0.0
        with torch.no_grad():  # on validation prompts: never trained on (nor used by the least-squares fit)
            for prompt in held:
                _, pred, target = warmup_step_loss(pair.large, pair.small, bank, prompt.to(device), cfg["loss"])
                n, d = nmse_parts(pred, target)
                num, den = num + n, den + d
        def write_warmup() -> None:
            with atomic.build_folder(run / "warmup") as tmp:  # weights and stitch.yaml appear together
                save_bank(bank, tmp)

        finish("warmup", write_warmup)  # stage 2 of every rank reads warmup/ after it
        results["warmup"] = _stage_result(n_steps, hist, t0, heldout_nmse=num / den if den > 0 else float("nan"),
                                          heldout_prompts=sum(len(p) for p in held), ls_r2=r2)

    # ---------------------------------------------------------------- stage 2
    if plan.get("lora") == "skip":
        log(f"lora: already done in {run / 'lora'}, skipped")
        results["lora"] = {"skipped": "already trained"}
    elif "lora" in plan:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        t0 = time.perf_counter()
        # a control of an earlier stage 2 does not belong to this one (with --no-lora-control none replaces it)
        drop_lora_control(run, saved, ctx.is_main)
        ctx.barrier()
        bank = load_bank(run / "warmup", device)
        # the LoRA's initial weights from the run's seed alone: the global RNG's state here depends on what
        # this process did before (a warm-up trained in the same call or not), and a restarted stage 2 must
        # start where the uninterrupted one did
        torch.manual_seed(cfg["seed"])
        small = with_lora(pair.small, cfg)
        opt = torch.optim.AdamW([{"params": [p for p in small.parameters() if p.requires_grad]},
                                 {"params": list(bank.parameters()), "lr": cfg.get("stitch_lr") or cfg["lora_lr"]}],
                                lr=cfg["lora_lr"], weight_decay=0.0)
        scaler = grad_scaler(cfg, device)
        start, hist = 0, []
        st = resumed("lora")
        if st is not None:
            bank.load_state_dict(st["bank"])
            set_peft_model_state_dict(small, st["lora"])
            _restore_optim(st, opt, scaler)
            start, hist = st["step"], st["hist"]
            log(f"lora: resuming at step {start}")
        wrapped = ddp(stitched_lm(bank, small), ctx)
        it = batches(2, start)
        hist = _run_steps(
            ctx, device, "lora", "--lora-lr", start, cfg["lora_steps"], hist, every,
            lambda: lm_loss_stitched(pair.large, small, bank, *next(it), module=wrapped),
            opt, scaler, log, lambda step, v: f"lora step {step}: lm loss {v:.4f}",
            lambda step, h: save_ckpt("lora", {"step": step, "bank": bank.state_dict(),
                                               "lora": get_peft_model_state_dict(small),
                                               **_optim_state(opt, scaler), "hist": h}))
        finish("lora", lambda: save_stage2(small, bank, run / "lora"))
        results["lora"] = _stage_result(cfg["lora_steps"], hist, t0)
    if plan.get("lora_control") == "skip":
        log(f"lora-control: already done in {run / 'lora-control'}, skipped")
        results["lora_control"] = {"skipped": "already trained"}
    elif "lora_control" in plan:
        results["lora_control"] = train_lora_control(cfg, batches, ctx, device, log, run, resumed("lora_control"),
                                                     save_ckpt, finish)
    return results


def drop_lora_control(run: Path, saved: dict[str, Any], write: bool = True) -> None:
    """Forget the LoRA control of an earlier stage 2 (its settings in run.yaml's ``saved``; ``write``: also
    delete lora-control/ and rewrite run.yaml, rank 0's part): stage 2 is being retrained, and eval must not
    compare the new stage 2 with a control trained for another one. The folder is renamed away before it is
    deleted (never left half-deleted)."""
    import shutil
    import uuid

    had = saved.get("trained", {}).pop("lora_control", None) is not None
    if not write:
        return
    folder = run / "lora-control"
    if folder.exists():
        trash = run / f".lora-control.stale-{uuid.uuid4().hex[:8]}"
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    if had:
        write_run_yaml(run, saved)


def with_lora(small: Any, cfg: dict[str, Any]) -> Any:
    """``small`` with the run's LoRA adapter (--lora-targets, --lora-r, --lora-alpha) injected, trainable."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(small, LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                                             target_modules=lora_targets(small, cfg), lora_dropout=0.0, bias="none"))
    for p in model.parameters():  # peft >= 0.12 makes the adapter float32 itself; 0.11 keeps the base's dtype
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def lora_targets(small: Any, cfg: dict[str, Any]) -> list[str]:
    """The module names of --lora-targets, each checked against the small model."""
    targets = [t.strip() for t in cfg["lora_targets"].split(",") if t.strip()]
    if not targets:
        raise InputError("--lora-targets names no module")
    twice = next((t for i, t in enumerate(targets) if t in targets[:i]), None)
    if twice is not None:
        raise InputError(f"--lora-targets names {twice!r} twice")
    names = {n.split(".")[-1] for n, _ in small.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise InputError(f"--lora-targets: the small model has no module named {missing[0]!r}")
    tied = [t for t in targets if t in ("lm_head", "embed_tokens")]
    if tied and getattr(small.config, "tie_word_embeddings", False):
        # merging the adapter (kvstitch export) would write the lm_head change into the shared matrix, and so
        # into the input embeddings too: the exported model would not be the one that was evaluated
        raise InputError(f"--lora-targets {tied[0]}: the small model ties lm_head to its input embeddings, so an "
                         "adapter there cannot be merged faithfully; leave it out of --lora-targets")
    return targets


def lm_loss_own(model: Any, prompt: Any, cont: Any) -> Any:
    """Mean cross-entropy of cont[:, 1:] when ``model`` reads prompt + cont[:, :-1] itself (its own cache):
    the same targets as :func:`lm_loss_stitched`, without the stitches."""
    import torch
    import torch.nn.functional as F

    seq = torch.cat([prompt, cont[:, :-1]], 1)
    logits = model(input_ids=seq, use_cache=False).logits[:, prompt.shape[1]:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), cont[:, 1:].reshape(-1))


def train_lora_control(cfg: dict[str, Any], batches: Any, ctx: Any, device: str, log: Any, run: Path,
                       st: dict[str, Any] | None, save_ckpt: Any, finish: Any) -> dict[str, Any]:
    """The control of stage 2: the same LoRA (targets, rank, lr, steps, batches) on a fresh copy of the small
    model, trained on the same continuations from its own prompt cache, without stitches. Stage 2 also
    fine-tunes the small model on the corpus, so a stitched model that beats small-only may owe that to the
    LoRA training alone; ``kvstitch eval`` compares stitched-lora with this small-lora control.

    Checkpointed like stage 2 (``save_ckpt(stage, state)``; ``st``: a checkpoint to resume); ``finish(stage,
    write)`` saves its result to ``run/lora-control`` and then records its settings in run.yaml."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from gpulab.stitchkv.distributed import ddp
    from gpulab.stitchkv.models import load_model

    t0 = time.perf_counter()
    base = load_model(cfg["small"], "small", device, cfg.get("dtype", "float32"), checked=True)
    torch.manual_seed(cfg["seed"])  # right before the LoRA's initial weights, as in stage 2
    model = with_lora(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lora_lr"], weight_decay=0.0)
    scaler = grad_scaler(cfg, device)
    start, hist = 0, []
    if st is not None:
        set_peft_model_state_dict(model, st["lora"])
        _restore_optim(st, opt, scaler)
        start, hist = st["step"], st["hist"]
        log(f"lora-control: resuming at step {start}")
    wrapped = ddp(model, ctx)
    it = batches(2, start)  # the stage-2 batches, in the same order
    n = cfg["lora_steps"]
    hist = _run_steps(
        ctx, device, "lora-control", "--lora-lr", start, n, hist, cfg.get("ckpt_every") or 0,
        lambda: lm_loss_own(wrapped, *next(it)), opt, scaler, log,
        lambda step, v: f"lora-control step {step}: lm loss {v:.4f}",
        lambda step, h: save_ckpt("lora_control", {"step": step, "lora": get_peft_model_state_dict(model),
                                                   **_optim_state(opt, scaler), "hist": h}))
    def write_control() -> None:
        with atomic.build_folder(run / "lora-control") as tmp:
            model.save_pretrained(str(tmp / "adapter"))

    finish("lora_control", write_control)
    return _stage_result(n, hist, t0)
