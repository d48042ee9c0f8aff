"""Reading the files users hand over (YAML mappings, Hugging Face ``config.json``): anything missing,
unreadable or malformed is a one-line :class:`InputError` naming the file and the problem."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from gpulab.core.errors import InputError


@functools.lru_cache(maxsize=1)
def strict_loader():
    """A yaml SafeLoader with YAML 1.2's plain scalars and no duplicate keys. PyYAML follows YAML 1.1, where
    ``no``/``yes``/``on``/``off`` are booleans, ``010`` is octal 8 and ``1:30`` is 90: an experiment's
    ``order: no`` or ``n: 010`` would be misread silently. Here only true/false are booleans, integers are
    decimal (or 0x/0o), ``1:30`` stays a string, and a key given twice in one mapping is an error."""
    import re

    import yaml

    bool_tag, int_tag, float_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges, it is no key
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        dup = key in seen
                        seen.add(key)
                    except TypeError:  # an unhashable key: the base class says so
                        break
                    if dup:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                            key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node):
            v = self.construct_scalar(node)
            sign, digits = (-1, v[1:]) if v[0] == "-" else (1, v.lstrip("+"))
            if digits[:2] in ("0x", "0X"):
                return sign * int(digits[2:], 16)
            if digits[:2] in ("0o", "0O"):
                return sign * int(digits[2:], 8)
            return sign * int(digits, 10)

    StrictLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (bool_tag, int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    StrictLoader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    StrictLoader.add_implicit_resolver(int_tag, re.compile(r"^(?:[-+]?[0-9]+|0[xX][0-9a-fA-F]+|0[oO][0-7]+)$"),
                                       list("-+0123456789"))
    StrictLoader.add_implicit_resolver(
        float_tag, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    StrictLoader.add_constructor(int_tag, StrictLoader.construct_yaml_int)
    return StrictLoader


@functools.lru_cache(maxsize=1)
def safe_dumper():
    """A yaml SafeDumper that quotes every string which YAML 1.1 *or* 1.2 would read as something else: PyYAML's
    own dumper follows 1.1 only and leaves "008", "1e5" or "0o17" plain, which :func:`strict_loader` (1.2) reads
    back as numbers (a class folder named "008", a fingerprint of digits)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}
    for first, resolvers in strict_loader().yaml_implicit_resolvers.items():
        for tag, rx in resolvers:
            if (tag, rx) not in Dumper.yaml_implicit_resolvers.setdefault(first, []):
                Dumper.yaml_implicit_resolvers[first].append((tag, rx))
    return Dumper


def read_yaml_mapping(path: Path | str, missing: str, not_mapping: str | None = None) -> dict[str, Any]:
    """The YAML mapping in ``path``. ``missing``: the error when there is no such file;
    ``not_mapping``: the error when the document is not a mapping (default: "expected a mapping")."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(missing)
    try:
        data = yaml.load(p.read_text(), Loader=strict_loader())
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
    return read_json_object(f, f"{label} {f}")


def read_json_object(f: Path, where: str) -> dict[str, Any]:
    """The JSON object in file ``f`` (e.g. a model folder's config.json); ``where`` starts each one-line error."""
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{where}: malformed {f.name} ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: {f.name} must be a JSON object, got {type(data).__name__}")
    return data


def read_utf8_text(path: Path | str, what: str) -> str:
    """The UTF-8 text in ``path``; ``what`` names it in the errors (e.g. ``"--text notes.txt"``): a missing file,
    a folder, or bytes that are not UTF-8 (a binary file given by mistake) are one-line InputErrors."""
    from gpulab.core.paths import data_hint

    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what}: is a folder, not a text file")
    if not p.is_file():
        raise InputError(f"{what}: file not found{data_hint(p)}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what}: not UTF-8 text (byte {e.start} of the file: {e.object[e.start:e.start + 1]!r})") \
            from None
    except OSError as e:
        raise InputError(f"{what}: unreadable ({type(e).__name__}: {e.strerror or e})") from None


def blocking_file(path: Path | str, include_self: bool = False) -> Path | None:
    """The file (not a folder) that stands where ``path``'s folders would be created: its nearest existing parent
    (or ``path`` itself, with ``include_self``) when that is not a folder, else None. A command that writes under
    ``path`` at the end of its work checks this first, for a one-line error instead of an OSError after it."""
    p = Path(path).absolute()
    for q in ((p,) if include_self else ()) + tuple(p.parents):
        if q.exists():
            return None if q.is_dir() else q
    return None
