"""The run folder of ``gpulab kvstitch train``: what it holds, and what a rerun may reuse of it.

Layout::

    run.yaml                    what was trained (pair, data, alignment, input mode, hyper-parameters; absolute
                                paths), and under ``trained`` the settings each stage's saved state was trained with
    warmup/stitch.safetensors   stage 1 result (+ stitch.yaml: mode, alignment, shapes)
    lora/stitch.safetensors     stage 2 result, with lora/adapter/ (peft adapter of the small model)
    lora-control/adapter/       the LoRA control (same LoRA, small model alone, no stitches)
    checkpoint.pt               in-progress stage: step, stitches, LoRA, optimizer, loss history

A rerun of ``--stage all`` skips every finished stage and resumes an interrupted one from checkpoint.pt; a
stage resumed or skipped must have been trained with the same settings (STAGE_FIELDS), else a one-line error
names the setting. An explicit ``--stage warmup`` or ``--stage lora`` retrains that stage. Whenever stage 2
(re)starts from scratch, the LoRA control of the earlier stage 2 (lora-control/ and its ``trained`` record)
is removed: with ``--lora-control`` a new one is trained after stage 2, with ``--no-lora-control`` none is
left (eval also leaves out a control whose recorded settings differ from stage 2's).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gpulab.core.errors import InputError
from gpulab.core.files import read_yaml_mapping
from gpulab.core.results import atomic_write_yaml
from gpulab.stitchkv.store import (FINGERPRINT_FIELDS, atomic_torch_save, first_line, holds_model, stale_model_error,
                                   trained_stages)

KEY_FIELDS = ("large", "small", "alignment", "stitch_input")  # the whole run folder is pinned to these
PATH_FIELDS = ("large", "small", "data", "run")  # stored absolute: eval may run from another directory
_SHARED = ("data", "task", "seed", "batch", "prompt_len", "prompt_bos", "dtype")  # prompt_bos: data.bos_prefix
# what shapes each stage's result: a stage resumed from its checkpoint or skipped as finished must match
STAGE_FIELDS = {
    # cont_len: the warm-up reads prompts only, but its windows' starts are drawn over prompt + continuation
    "warmup": (*_SHARED, "cont_len", "steps", "lr", "init", "loss", "ls_batches", "ridge"),
    "lora": (*_SHARED, "cont_len", "lora_steps", "lora_lr", "stitch_lr", "lora_r", "lora_alpha", "lora_targets"),
    "lora_control": (*_SHARED, "cont_len", "lora_steps", "lora_lr", "lora_r", "lora_alpha", "lora_targets"),
}
RETRAIN = {"warmup": "warmup", "lora": "lora", "lora_control": "lora"}  # the --stage that retrains each


def read_run_yaml(run: Path) -> dict[str, Any]:
    """The run folder's run.yaml ({} when there is none yet; else with a ``trained`` mapping)."""
    p = run / "run.yaml"
    if not p.is_file():
        return {}
    old = read_yaml_mapping(p, f"{p}: not found", f"{p}: expected a mapping; use a new --run folder")
    if not isinstance(old.get("trained"), dict):
        old["trained"] = {}  # a folder of an older version: its stages' settings were not recorded
    return old


def write_run_yaml(run: Path, content: dict[str, Any]) -> None:
    """run.yaml replaced whole (a run killed while writing leaves the old one)."""
    atomic_write_yaml(run / "run.yaml", content)


def _same(key: str, a: Any, b: Any) -> bool:
    if key in PATH_FIELDS and a is not None and b is not None:
        return Path(str(a)).resolve() == Path(str(b)).resolve()  # an older run.yaml may hold relative paths
    return str(a) == str(b)


def stage_settings(cfg: dict[str, Any], records_per_step: int | None = None) -> dict[str, dict[str, Any]]:
    """The settings (STAGE_FIELDS of ``cfg``) each stage is trained with; ``records_per_step``: the .jsonl
    records of a step (one per rank: the rank count sets them), None for other data."""
    settings = {name: {k: cfg.get(k) for k in fields} for name, fields in STAGE_FIELDS.items()}
    if records_per_step is not None:
        for s in settings.values():
            s["records_per_step"] = records_per_step
    return settings


def check_run_config(run: Path, old: dict[str, Any], cfg: dict[str, Any], plan: dict[str, str],
                     settings: dict[str, dict[str, Any]], ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuse a run folder of another pair, and a stage resumed or skipped (``plan``) whose saved state was
    trained with other settings (a resumed stage's are in its checkpoint, a finished one's in run.yaml's
    ``trained``); returns run.yaml's new content (old + this run's options)."""
    if old:
        for k in KEY_FIELDS:
            if not _same(k, old.get(k), cfg.get(k)):
                raise InputError(f"{run} was trained with {k}={old.get(k)!r}, not {cfg.get(k)!r}; use a new --run folder")
        for key, id_key in FINGERPRINT_FIELDS.items():  # same paths, other models in them (cfg: their fingerprints now)
            was = old.get(id_key)
            # (cfg holds the id just computed; a recorded id of the first version is recomputed that way)
            if was is not None and str(was) != str(cfg.get(id_key)) and not holds_model(cfg[key], was):
                raise stale_model_error(str(run), key, cfg.get(key))
    for name, how in plan.items():
        was = old.get("trained", {}).get(name)
        if how == "resume" and ckpt is not None and isinstance(ckpt.get("settings"), dict):
            was = ckpt["settings"]  # what the interrupted run trained with (run.yaml: the stage's last result)
        if how not in ("resume", "skip") or not isinstance(was, dict):
            continue
        for k, v in settings[name].items():
            if k in was and not _same(k, was[k], v):
                fix = ("delete checkpoint.pt to restart it" if how == "resume"
                       else f"--stage {RETRAIN[name]} to retrain it")
                raise InputError(f"{run}: {name} was trained with {k}={was[k]!r}, not {v!r}; use a new --run "
                                 f"folder (or {fix})")
    return {**old, **cfg, "trained": dict(old.get("trained", {}))}


def stage_record(content: dict[str, Any], name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings stage ``name`` is trained with, as run.yaml's ``trained`` and its checkpoints keep them."""
    out = dict(settings)
    if name == "lora":  # stage 2 starts from these stitches: a later retrain of the warm-up makes it stale
        out["from_warmup"] = content["trained"].get("warmup")
    return out


def record_stage(content: dict[str, Any], name: str, settings: dict[str, Any]) -> None:
    """Record in run.yaml's ``content`` the settings stage ``name``'s saved result was trained with (once the
    result is in its folder: an interrupted retrain leaves the record of the result that is there)."""
    content["trained"][name] = stage_record(content, name, settings)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """checkpoint.pt (None: none); a corrupt or foreign file is a one-line error."""
    import torch

    if not path.is_file():
        return None
    try:  # on the CPU: load_state_dict moves every tensor to its parameter's device (AdamW's step stays on the CPU)
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise InputError(f"{path}: corrupt checkpoint ({first_line(e)}); delete it to restart the stage") from None
    if not isinstance(st, dict) or not {"stage", "step", "opt", "hist"} <= set(st):
        raise InputError(f"{path}: not a kvstitch checkpoint; delete it to restart the stage")
    return st


def save_checkpoint(path: Path, name: str, state: dict[str, Any]) -> None:
    """Stage ``name``'s in-progress ``state`` (step, optimizer, loss history, weights) as checkpoint.pt."""
    atomic_torch_save({"stage": name, **state}, path)


def stage_plan(run: Path, stage: str, cfg: dict[str, Any], ckpt: dict[str, Any] | None,
               trained: dict[str, Any]) -> dict[str, str]:
    """What this call does with each stage it covers: 'train' (from scratch), 'resume' (from checkpoint.pt)
    or 'skip' (finished; only under --stage all)."""
    at = ckpt.get("stage") if ckpt else None
    have_w, have_l = trained_stages(run)
    plan: dict[str, str] = {}
    if stage in ("warmup", "all"):
        plan["warmup"] = "resume" if at == "warmup" else ("skip" if have_w and stage == "all" else "train")
    if stage in ("lora", "all"):
        if plan.get("warmup", "skip") != "skip":  # new stitches this call: stage 2 starts over from them
            plan["lora"] = "train"
        elif at == "lora":
            plan["lora"] = "resume"
        else:
            # finished from the warm-up stitches there now (an explicit --stage warmup since makes it stale)
            fresh = trained.get("warmup") is not None and (trained.get("lora") or {}).get("from_warmup") == trained["warmup"]
            plan["lora"] = "skip" if have_l and stage == "all" and fresh else "train"
        if cfg.get("lora_control"):
            have_c = (run / "lora-control" / "adapter" / "adapter_config.json").is_file()
            if plan["lora"] != "skip":
                plan["lora_control"] = "train"  # the control of a new stage 2 (possibly of other settings)
            else:
                plan["lora_control"] = "resume" if at == "lora_control" else ("skip" if have_c else "train")
    return plan
