"""``gpulab kvstitch export``: the small model a run decodes with, as a Hugging Face folder, so that a
serving engine can load it (``gpulab serve DIR --prefill stitchkv=RUN``; see :mod:`gpulab.stitchkv.provider`).

Stage 'lora': the small model with its stage-2 LoRA adapter merged into the weights; stage
'warmup': the small model as trained (unchanged). The tokenizer is the small model's. The folder is
written whole or not at all.
"""
from __future__ import annotations

from pathlib import Path

from gpulab.core.errors import InputError
from gpulab.core.files import blocking_file

EXPORT_MARKER = "kvstitch-export.yaml"  # beside the exported model: which run and stage it is the decode model of


def export_small(run: Path, out: Path, stage: str = "auto", overwrite: bool = False) -> str:
    """Write the run's decode model to ``out``; returns the stage exported."""
    from gpulab.stitchkv.models import load_tokenizer, save_model
    from gpulab.stitchkv.store import load_small, pick_stage, run_config, stage_fingerprint

    run, out = Path(run), Path(out)
    cfg = run_config(run)
    stage = pick_stage(run, stage, cfg)
    if out.exists() and not overwrite:
        raise InputError(f"--out-dir {out} exists (use --overwrite to replace it)")
    o = out.resolve()
    for what, p in (("small model", cfg["small"]), ("large model", cfg["large"]), ("run", run)):
        p = Path(p).resolve()
        if o == p or o in p.parents:  # --overwrite would delete it with the folder
            raise InputError(f"--out-dir {out} is or holds the run's {what} folder ({p}); choose a new folder")
    if (above := blocking_file(out)) is not None:  # refused before the merge, not an OSError at the save after it
        raise InputError(f"--out-dir {out}: {above} is not a folder")
    if out.exists() and (not out.is_dir() or (not (out / "config.json").is_file() and any(out.iterdir()))):
        raise InputError(f"--out-dir {out} holds files that are not a model folder; --overwrite replaces only a "
                         "model folder (choose a new or empty folder)")
    small, _ = load_small(cfg, run, stage, "cpu")
    if stage == "lora":
        small = small.merge_and_unload()
    marker = {"run": str(run.resolve()), "stage": stage, "small_id": cfg.get("small_id")}
    if stage == "lora":  # the LoRA merged into it: a retrained stage 2 needs a new export (a warm-up's is the small model)
        marker["stage_id"] = stage_fingerprint(run, stage)
    save_model(small, load_tokenizer(Path(cfg["small"]), "small"), out, extra={EXPORT_MARKER: marker})
    return stage
