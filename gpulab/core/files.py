"""Reading the files users hand over (YAML mappings, Hugging Face ``config.json``): anything missing,
unreadable or malformed is a one-line :class:`InputError` naming the file and the problem."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpulab.core.errors import InputError


def read_yaml_mapping(path: Path | str, missing: str, not_mapping: str | None = None) -> dict[str, Any]:
    """The YAML mapping in ``path``. ``missing``: the error when there is no such file;
    ``not_mapping``: the error when the document is not a mapping (default: "expected a mapping")."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(missing)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{p}: malformed YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: unreadable ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(not_mapping or f"{p}: expected a mapping, got {type(data).__name__}")
    return data


def read_model_config(folder: Path | str, label: str = "model") -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model folder; ``label`` names the folder in errors
    (e.g. "model", "--large")."""
    p = Path(folder)
    if not p.exists():
        raise InputError(f"{label} folder not found: {p}")
    if not p.is_dir():
        raise InputError(f"{label} {p}: not a folder (expected a Hugging Face model folder with config.json)")
    f = p / "config.json"
    if not f.is_file():
        raise InputError(f"{label} {p}: no config.json (not a Hugging Face model folder)")
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{label} {f}: malformed config.json ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{label} {f}: config.json must be a JSON object, got {type(data).__name__}")
    return data
