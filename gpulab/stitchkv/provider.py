"""A kvstitch run as a vajra prefill provider: ``gpulab serve SMALL --prefill stitchkv=RUN``.

The provider holds what the prefill side of :mod:`gpulab.stitchkv.disagg` holds: the large model,
the run's stitches and the small model (with its stage-2 LoRA) for the stitches' k/v projections,
k_norm and RoPE. For a prompt it returns the large model's logits at the last prompt position (the
engine samples the first token from them) and the stitched small-model cache per small layer, K
(after the small model's RoPE) and V as [P, Hkv, D]: what the engine writes into its paged cache
before it decodes with the small model. The engine must load the *same* small model: ``gpulab
kvstitch export`` writes it as a Hugging Face folder (the LoRA merged for stage 'lora').

Prompt ids are prefilled as the engine gives them. vajra encodes a text prompt with the tokenizer's
special tokens (a Llama tokenizer's BOS first), and kvstitch's training and eval prompts start the same
way (:func:`gpulab.stitchkv.data.bos_prefix`): the stitches see the prompts they were trained on. A
prompt sent as token ids should start with BOS likewise where the tokenizer has one.

Registered as the ``stitchkv`` entry point of ``gpulab.prefill_providers``; this module does not
import vajra: the contract is the returned object's ``logits`` and ``kv``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpulab.core.errors import InputError

STAGE_SEP = "@"


@dataclass
class StitchedPrompt:
    logits: Any  # float32 [vocab]
    kv: list[tuple[Any, Any]]  # per small layer: K, V [P, Hkv, D]


class StitchPrefill:
    name = "stitchkv"

    def __init__(self, run: Path, device: str = "cpu", stage: str = "auto"):
        from gpulab.stitchkv.store import load_small, pick_stage, run_config
        from gpulab.stitchkv.models import load_model

        cfg = run_config(run)
        self.cfg = cfg
        self.run, self.stage, self.device = run, pick_stage(run, stage, cfg), device
        self.large = load_model(cfg["large"], "large", device, cfg.get("dtype", "float32"))
        self.small, self.bank = load_small(cfg, run, self.stage, device)

    def check_model(self, model_dir: Path | str) -> None:
        """The folder the engine serves must be this run's decode model for this stage: the folder
        ``gpulab kvstitch export`` wrote for it (its marker names the run and stage), or for stage 'warmup' the run's
        small model itself. Another pair's or stage's model decodes a cache it was not trained with, silently."""
        from gpulab.core.files import read_yaml_mapping
        from gpulab.stitchkv.export import EXPORT_MARKER

        d = Path(model_dir)
        marker = d / EXPORT_MARKER
        if marker.is_file():
            m = read_yaml_mapping(marker, f"{marker} not found")
            if Path(str(m.get("run"))).resolve() != self.run.resolve() or m.get("stage") != self.stage:
                raise InputError(f"{d} is the exported decode model of run {m.get('run')} stage {m.get('stage')!r}, "
                                 f"not of {self.run} stage {self.stage!r}; serve that run's export (gpulab kvstitch "
                                 f"export --run {self.run})")
            from gpulab.stitchkv.store import stage_fingerprint

            if self.stage == "lora" and m.get("stage_id") is not None \
                    and m["stage_id"] != stage_fingerprint(self.run, self.stage):
                raise InputError(f"{d} was exported before run {self.run}'s stage {self.stage!r} was retrained; "
                                 f"export it again (gpulab kvstitch export --run {self.run} --overwrite)")
        else:
            from gpulab.stitchkv.store import holds_model

            want = self.cfg.get("small_id")
            own = want is not None and holds_model(d, want)
            if (own or d.resolve() == Path(self.cfg["small"]).resolve()) and self.stage == "lora":
                raise InputError(f"{d} is run {self.run}'s small model without its stage-2 LoRA; serve the folder "
                                 f"`gpulab kvstitch export --run {self.run}` writes (or @warmup)")
            if self.stage == "warmup" and self.cfg.get("small_id") is not None and not own:
                raise InputError(f"{d} is not run {self.run}'s small model (its config, tokenizer or weights differ); "
                                 "stage 'warmup' decodes with that model itself, or with its export")

    def __call__(self, prompt_ids: list[int]) -> StitchedPrompt:
        import torch

        from gpulab.stitchkv.models import base_model
        from gpulab.stitchkv.stitch import cache_tensors, stitched_cache

        if len(prompt_ids) == 0:
            raise InputError("the prompt is empty")
        for role, m in (("large", self.large), ("small", self.small)):  # the engine may check only the small one
            ctx = getattr(base_model(m).config, "max_position_embeddings", None)
            if ctx is not None and len(prompt_ids) > int(ctx):
                raise InputError(f"the prompt has {len(prompt_ids)} tokens; the {role} model's context is {ctx} "
                                 "tokens (--prefill stitchkv)")
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits, cache = stitched_cache(self.large, self.small, self.bank, prompt)
        kv = [(k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()) for k, v in cache_tensors(cache)]
        return StitchedPrompt(logits=logits[0].float(), kv=kv)


def parse_arg(arg: str) -> tuple[Path, str]:
    """``RUN_DIR`` or ``RUN_DIR@auto|warmup|lora`` -> (run folder, stage; 'auto': the last stage trained).

    A suffix is a stage only when it is one of those names, so a run folder whose path holds an '@'
    (``runs/a@b``) is read whole; a folder whose own name ends in one (``runs/x@lora``) is ``runs/x@lora@auto``."""
    from gpulab.stitchkv.store import STAGES

    run, sep, stage = arg.rpartition(STAGE_SEP)
    if sep and stage in STAGES:
        run_dir = Path(run)
    else:
        run_dir, stage = Path(arg), "auto"
        if not run_dir.is_dir() and sep and Path(run).is_dir():  # RUN@typo: say what is wrong with the suffix
            raise InputError(f"--prefill stitchkv: {STAGE_SEP}{arg.rpartition(STAGE_SEP)[2]} is no stage: "
                             f"--stage must be one of {', '.join(STAGES)} (a run folder {run_dir} does not exist)")
    if not run_dir.is_dir():
        raise InputError(f"--prefill stitchkv: run folder not found: {run_dir}")
    return run_dir, stage


def load(arg: str, device: str = "cpu") -> StitchPrefill:
    """The ``stitchkv`` entry point: ARG is a kvstitch run folder, optionally ``@auto``, ``@warmup`` or ``@lora``."""
    run, stage = parse_arg(arg)
    return StitchPrefill(run, device, stage)
