"""A family folder on disk, written atomically.

::

    <family>/family.yaml          schema gpulab.seam.family/1: spec, training summary, data
    <family>/weights.safetensors  the whole family's state dict (anchors, baselines, stitches)
    <family>/checkpoint.pt        training state for --resume (model, optimiser, phase, step)
    <family>/eval.yaml            schema gpulab.seam.eval/1: one entry per model (top1, FLOPs, ...)
    <family>/select-*.yaml/.png   what `gpulab seam select` wrote

Every reader turns a missing or corrupt file, a missing model or a wrong shape into a one-line
InputError naming the file and the problem.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gpulab.core import atomic
from gpulab.core.errors import InputError
from gpulab.core.files import read_yaml_mapping
from gpulab.core.results import atomic_write_yaml, yaml_text
from gpulab.seam.models import FamilySpec, StitchedFamily

FAMILY_SCHEMA = "gpulab.seam.family/1"
EVAL_SCHEMA = "gpulab.seam.eval/1"
EVAL_FIELDS = ("name", "kind", "top1", "flops", "params")


def save_family(folder: Path, family: StitchedFamily, info: dict[str, Any]) -> None:
    """The weights and family.yaml, renamed into place together: never one without the other."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in family.state_dict().items()}
    text = yaml_text({"schema": FAMILY_SCHEMA, "spec": family.spec.as_dict(), **info})
    atomic.write_all([(folder / "weights.safetensors", lambda tmp: save_file(sd, tmp), ""),
                      (folder / "family.yaml", lambda tmp: Path(tmp).write_text(text), "")])


def _yaml(path: Path, what: str) -> dict[str, Any]:
    return read_yaml_mapping(path, f"{path.parent}: no {path.name} ({what})")


def read_family_info(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"family folder not found: {folder}")
    data = _yaml(folder / "family.yaml", "not a family folder; run `gpulab seam train` first")
    if data.get("schema") != FAMILY_SCHEMA:
        raise InputError(f"{folder / 'family.yaml'}: not a seam family (no 'schema: {FAMILY_SCHEMA}')")
    data["spec_obj"] = FamilySpec.from_dict(data.get("spec"), str(folder / "family.yaml"))
    return data


def load_family(folder: Path, device: str = "cpu") -> tuple[StitchedFamily, dict[str, Any]]:
    """The trained family of a folder (weights checked key by key and shape by shape)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_family_info(folder)
    family = StitchedFamily(info["spec_obj"])
    wpath = folder / "weights.safetensors"
    if not wpath.is_file():
        raise InputError(f"{folder}: no weights.safetensors (training did not finish?)")
    try:
        sd = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{wpath}: corrupt weights file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    own = family.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        model = _model_of_key(missing[0])
        raise InputError(f"{wpath}: model {model} is missing (no tensor '{missing[0]}')")
    for k, v in own.items():
        if sd[k].shape != v.shape:
            raise InputError(f"{wpath}: '{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
        if sd[k].is_floating_point() != v.is_floating_point():  # int32 bytes read as weights
            raise InputError(f"{wpath}: '{k}' is {sd[k].dtype}, expected a {v.dtype} tensor")
    extra = [k for k in sd if k not in own]
    if extra:
        raise InputError(f"{wpath}: unexpected tensor '{extra[0]}' (weights of another family?)")
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise InputError(f"{wpath}: model {_model_of_key(k)} is corrupt (non-finite values in '{k}')")
    family.load_state_dict(sd)
    return family.to(device), info


def _model_of_key(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "stitches" and len(parts) > 1:
        f, p, _, b, q = parts[1].split("_")
        return f"{f}[:{p}]>{b}[{q}:]"
    return parts[1] if len(parts) > 1 else key


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    atomic.write_with(Path(folder) / "checkpoint.pt", lambda tmp: torch.save(state, tmp))


def load_checkpoint(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "checkpoint.pt"
    if not path.is_file():
        raise InputError(f"{folder}: no checkpoint.pt to resume from")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"{path}: corrupt checkpoint ({type(e).__name__})") from None


def save_eval(folder: Path, data: dict[str, Any]) -> Path:
    """eval.yaml; the selections made from the earlier one (select-*.yaml, .png) are removed: they described it."""
    path = atomic_write_yaml(Path(folder) / "eval.yaml", {"schema": EVAL_SCHEMA, **data})
    remove_selections(folder)
    return path


def check_writable(folder: Path) -> None:
    """Before an eval or a selection: its outputs go into the family folder, which this process must be able to
    write (found at the end of a long evaluation, the results would be lost)."""
    import os

    if Path(folder).is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: this process cannot write in the family folder")


def remove_selections(folder: Path) -> None:
    """Delete what `gpulab seam select` wrote into the family folder (select-*.yaml, .png)."""
    for stale in [*Path(folder).glob("select-*.yaml"), *Path(folder).glob("select-*.png")]:
        stale.unlink(missing_ok=True)


def load_eval(path: Path) -> dict[str, Any]:
    """An evaluated family (a folder holding eval.yaml, or the file itself), validated model by model."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"family folder not found: {path}")
    if path.is_dir():
        path = path / "eval.yaml"
    data = _yaml(path, "the family is not evaluated; run `gpulab seam eval` first")
    if data.get("schema") != EVAL_SCHEMA:
        raise InputError(f"{path}: not a seam evaluation (no 'schema: {EVAL_SCHEMA}')")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise InputError(f"{path}: 'models' must be a non-empty list")
    names = set()
    for i, m in enumerate(models):
        if not isinstance(m, dict):
            raise InputError(f"{path}: models[{i}] is not a mapping")
        for f in EVAL_FIELDS:
            if m.get(f) is None:
                raise InputError(f"{path}: model {m.get('name', f'#{i}')!s} is missing '{f}'")
        for f in ("top1", "flops", "params", *(k for k in m if k.startswith("latency_") and k.endswith("_ms"))):
            v = m[f]
            if v is None and f.startswith("latency_"):
                continue  # not measured at that batch size
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"{path}: model {m['name']}: '{f}' must be a finite non-negative number, got {v!r}")
        if m["top1"] > 1:
            raise InputError(f"{path}: model {m['name']}: 'top1' is a fraction in [0, 1], got {m['top1']}")
        if m["kind"] not in ("anchor", "stitch", "baseline"):
            raise InputError(f"{path}: model {m['name']}: unknown kind {m['kind']!r}")
        if m["name"] in names:
            raise InputError(f"{path}: model {m['name']} appears twice")
        names.add(m["name"])
    if sum(m["kind"] == "anchor" for m in models) != 2:
        raise InputError(f"{path}: expected exactly 2 anchors, found {sum(m['kind'] == 'anchor' for m in models)}")
    if (path.parent / "family.yaml").is_file():  # beside its family: every member evaluated, nothing else
        spec = read_family_info(path.parent)["spec_obj"]
        with torch.device("meta"):  # the member names only: no weights allocated
            want = {m.name: m.kind for m in StitchedFamily(spec).members()}
        have = {m["name"]: m["kind"] for m in models}
        lost = sorted(set(want) - set(have))
        if lost:
            raise InputError(f"{path}: {len(lost)} of the family's models are not in it (e.g. {lost[0]}); run "
                             "`gpulab seam eval` again")
        other = sorted(n for n in have if want.get(n) != have[n])
        if other:
            raise InputError(f"{path}: model {other[0]} is not a {have[other[0]]} of the family in family.yaml")
    data["path"] = str(path)
    return data
