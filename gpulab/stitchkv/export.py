"""``gpulab kvstitch export``: the small model a run decodes with, as a Hugging Face folder, so that a
serving engine can load it (``gpulab serve DIR --prefill stitchkv=RUN``; see :mod:`gpulab.stitchkv.provider`).

Stage 'lora': the small model with its stage-2 LoRA adapter merged into the weights; stage
'warmup': the small model as trained (unchanged). The tokenizer is the small model's. The folder is
written whole or not at all.
"""
from __future__ import annotations

from pathlib import Path

from gpulab.core.errors import InputError


def export_small(run: Path, out: Path, stage: str = "auto", overwrite: bool = False) -> str:
    """Write the run's decode model to ``out``; returns the stage exported."""
    from gpulab.stitchkv.models import load_tokenizer, save_model
    from gpulab.stitchkv.store import load_small, pick_stage, run_config

    run, out = Path(run), Path(out)
    cfg = run_config(run)
    stage = pick_stage(run, stage)
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} exists (use --overwrite to replace it)")
    if out.resolve() in (Path(cfg["small"]).resolve(), Path(cfg["large"]).resolve(), run.resolve()):
        raise InputError(f"--out {out} is the run's own model or run folder; choose a new folder")
    small, _ = load_small(cfg, run, stage, "cpu")
    if stage == "lora":
        small = small.merge_and_unload()
    save_model(small, load_tokenizer(Path(cfg["small"]), "small"), out)
    return stage
