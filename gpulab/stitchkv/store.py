"""The files of a kvstitch run folder: stitches (safetensors + stitch.yaml), peft adapters, checkpoints.
Writes are atomic (a stage folder appears whole); a missing, corrupt or foreign file is a one-line
InputError naming it. The layout is described in :mod:`gpulab.stitchkv.train`. Readers of a trained run
(eval, export, the prefill provider, serve-disagg) start from :func:`run_config` and :func:`pick_stage`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gpulab.core import atomic
from gpulab.core.errors import InputError
from gpulab.core.files import read_yaml_mapping
from gpulab.core.results import atomic_write_yaml


def save_bank(bank: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in bank.state_dict().items()}
    atomic.write_with(folder / "stitch.safetensors", lambda tmp: save_file(state, tmp))
    atomic_write_yaml(folder / "stitch.yaml", bank.meta())


def load_bank(folder: Path, device: Any = "cpu") -> Any:
    from safetensors.torch import load_file

    from gpulab.stitchkv.stitch import make_bank

    meta_p, w_p = folder / "stitch.yaml", folder / "stitch.safetensors"
    if not meta_p.is_file() or not w_p.is_file():
        raise InputError(f"{folder}: no stitch.yaml/stitch.safetensors (stage not trained)")
    meta = read_yaml_mapping(meta_p, f"{folder}: no stitch.yaml/stitch.safetensors (stage not trained)")
    missing = [k for k in ("large_shape", "small_shape", "align", "mode") if k not in meta]
    if missing:
        raise InputError(f"{meta_p}: missing key '{missing[0]}'")
    try:
        bank = make_bank(meta["large_shape"], meta["small_shape"], meta["align"], meta["mode"])
        bank.load_state_dict(load_file(str(w_p)))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file or weights of another shape
        raise InputError(f"{w_p}: does not load ({first_line(e)})") from None
    return bank.to(device)


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    atomic.write_with(path, lambda tmp: torch.save(obj, tmp))


def load_lora_control(small: Any, folder: Path, device: Any = "cpu") -> Any:
    """The small model with the control LoRA adapter (``train_lora_control``) applied."""
    return load_adapter(small, folder, device, "no control LoRA adapter")


def save_stage2(peft_model: Any, bank: Any, folder: Path) -> None:
    """Stitches + peft adapter into ``folder`` through a temporary sibling folder and a rename."""
    with atomic.build_folder(folder) as tmp:
        save_bank(bank, tmp)
        peft_model.save_pretrained(str(tmp / "adapter"))


def load_stage2(small: Any, folder: Path, device: Any = "cpu") -> tuple[Any, Any]:
    """(small model with the LoRA adapter applied, stitches) from a stage-2 folder."""
    model = load_adapter(small, folder, device, "no LoRA adapter (stage 'lora' not trained)")
    return model, load_bank(folder, device)


def load_adapter(small: Any, folder: Path, device: Any, missing: str) -> Any:
    """``small`` with the peft adapter in ``folder/adapter`` applied, frozen, in eval mode."""
    from peft import PeftModel

    if not (folder / "adapter" / "adapter_config.json").is_file():
        raise InputError(f"{folder}: {missing}")
    try:
        model = PeftModel.from_pretrained(small, str(folder / "adapter"), is_trainable=False)
    except Exception as e:  # noqa: BLE001 - a malformed config or adapter weights of another model
        raise InputError(f"{folder / 'adapter'}: the LoRA adapter does not load ({first_line(e)})") from None
    return model.to(device).eval()


# --------------------------------------------------------------------------- reading a run folder
STAGES = ("auto", "warmup", "lora")  # --stage of the commands that use a trained run


FINGERPRINT_FIELDS = {"large": "large_id", "small": "small_id"}  # run.yaml: a model folder -> what it held


FINGERPRINT_VERSION = "v2-"  # v2 also samples the weights; an id without the prefix is of v1 (names and sizes)
_SAMPLE = 1 << 16  # bytes read at the start, middle and end of each weight file


def model_fingerprint(folder: Path | str, like: str | None = None) -> str:
    """What a model folder holds, cheaply: a hash of its config.json and tokenizer files, of its weight files'
    names and sizes, and of 64 KiB at the start, middle and end of each weight file (a model retrained in place
    has the same names and sizes; its weights differ everywhere). A run folder is tied to its pair by these, not
    only by the paths: another model in the same path is refused instead of being served with stitches trained
    for the old one. ``like``: an id recorded earlier; one of version 1 (before the weights were sampled) is
    recomputed that way, so that older run folders still match their unchanged models."""
    import hashlib

    d = Path(folder)
    v1 = like is not None and not str(like).startswith(FINGERPRINT_VERSION)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        p = d / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"-") + b"\0")
    for p in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode() + b"\0")
        if not v1:
            with open(p, "rb") as f:
                for at in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                    f.seek(at)
                    h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16] if v1 else FINGERPRINT_VERSION + h.hexdigest()[:16]


def holds_model(folder: Path | str, recorded: Any) -> bool:
    """Whether ``folder`` still holds the model whose fingerprint was recorded (of either version)."""
    return model_fingerprint(folder, like=str(recorded)) == str(recorded)


def stage_fingerprint(run: Path, stage: str) -> str:
    """A hash of what a stage's folder holds (its stitches; for 'lora' also the adapter): an export records it,
    so that a stage retrained after the export is not served with the exported (older) decode model."""
    import hashlib

    folder = Path(run) / stage
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stale_model_error(where: str, key: str, folder: Any) -> InputError:
    """The error for a run whose --``key`` model folder now holds another model than the run recorded."""
    return InputError(f"{where}: the --{key} folder {folder} no longer holds the model this run was trained "
                      "with (its config, tokenizer or weight files changed); use a new --run folder")


def check_fingerprints(cfg: dict[str, Any], where: str) -> None:
    """The pair's folders still hold the models the run recorded (run folders of older versions record none)."""
    for key, id_key in FINGERPRINT_FIELDS.items():
        want = cfg.get(id_key)
        if want is not None and cfg.get(key) is not None and not holds_model(cfg[key], want):
            raise stale_model_error(where, key, cfg[key])


def run_config(run: Path) -> dict[str, Any]:
    """A run folder's run.yaml (what `gpulab kvstitch train` wrote), its models checked against their
    fingerprints."""
    p = run / "run.yaml"
    cfg = read_yaml_mapping(p, f"--run {run}: no run.yaml (not a 'gpulab kvstitch train' folder)")
    for k in ("large", "small", "data"):
        if k not in cfg:
            raise InputError(f"{p}: missing key '{k}'")
    check_fingerprints(cfg, str(p))
    return cfg


def stage2_stale(cfg: dict[str, Any]) -> str | None:
    """Why the run's stage-2 result no longer follows from its warm-up (None: it does, or the run folder is of a
    version that did not record it): the warm-up was retrained after stage 2 started from its stitches."""
    trained = cfg.get("trained") if isinstance(cfg.get("trained"), dict) else {}
    lora, warm = trained.get("lora"), trained.get("warmup")
    if isinstance(lora, dict) and "from_warmup" in lora and warm is not None and lora["from_warmup"] != warm:
        return ("stage 2 (lora/) was trained from earlier warm-up stitches: the warm-up was retrained since "
                "(retrain stage 2 with --stage lora)")
    return None


def pick_stage(run: Path, stage: str, cfg: dict[str, Any]) -> str:
    """--stage resolved against what the run trained ('auto': lora if trained and it follows from the warm-up
    there, else warmup); ``cfg``: the run's run.yaml (:func:`run_config`)."""
    if stage not in STAGES:
        raise InputError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    have_w, have_l = trained_stages(run)
    if stage == "auto":
        stage = "lora" if have_l and not stage2_stale(cfg) else "warmup"
    if stage == "warmup" and not have_w:
        raise InputError(f"--run {run}: no trained stitches (run 'gpulab kvstitch train' first)")
    if stage == "lora" and not have_l:
        raise InputError(f"--run {run}: no stage-2 (lora) result; use --stage warmup or train --stage lora")
    return stage


def trained_stages(run: Path) -> tuple[bool, bool]:
    """(stage 1 trained, stage 2 trained) in this run folder."""
    return ((run / "warmup" / "stitch.safetensors").is_file(),
            (run / "lora" / "adapter" / "adapter_config.json").is_file())


def load_small(cfg: dict[str, Any], run: Path, stage: str, device: str) -> tuple[Any, Any]:
    """(small model, its stitches) as the stage left them (with its LoRA adapter for 'lora')."""
    from gpulab.stitchkv.models import load_model

    small = load_model(cfg["small"], "small", device, cfg.get("dtype", "float32"))
    if stage == "lora":
        return load_stage2(small, run / "lora", device)
    return small, load_bank(run / "warmup", device)
