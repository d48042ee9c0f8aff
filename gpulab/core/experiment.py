"""Experiment files: which gpulab commands to run with which parameters; lists expand to sweeps.

Format::

    name: smoke                      # optional
    description: ...                 # optional
    device: auto                     # optional: auto | cuda | cpu
    runs:
      - command: sort bench          # a gpulab command line's words
        name: small-sort             # optional label
        params:                      # option names with - or _; a list value is a sweep axis
          n: [1000, 4096]
          dtype: int32
          impl: numpy,torch          # one value (a comma-separated option), not a sweep
        args: [MODEL_DIR]            # optional positional arguments

Unknown keys, unknown commands, unknown options and values of the wrong type are one-line
errors that name the key; nothing runs until the whole file validates.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpulab.core.clickcompat import click
from gpulab.core.errors import InputError
from gpulab.core.files import read_yaml_mapping

TOP_KEYS = {"name", "description", "device", "runs"}
RUN_KEYS = {"command", "name", "params", "args", "expect_ok"}


@dataclass
class Invocation:
    label: str
    words: list[str]
    params: dict[str, Any]
    argv: list[str] = field(default_factory=list)
    expect_ok: bool = True


def load_file(path: Path | str) -> dict[str, Any]:
    p = Path(path)
    data = read_yaml_mapping(p, f"experiment file not found: {p}",
                             f"{p}: an experiment file must be a mapping with a 'runs' list")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise InputError(f"{p}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(TOP_KEYS))})")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise InputError(f"{p}: 'runs' must be a non-empty list")
    if "device" in data and data["device"] not in ("auto", "cuda", "cpu"):
        raise InputError(f"{p}: 'device' must be auto, cuda or cpu, got {data['device']!r}")
    return data


def expand(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product over list-valued parameters (a sweep), in file order."""
    keys = list(params)
    axes = [v if isinstance(v, list) else [v] for v in params.values()]
    if any(len(a) == 0 for a in axes):
        empty = keys[[len(a) for a in axes].index(0)]
        raise InputError(f"parameter '{empty}' is an empty list")
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def _resolve(root: click.Command, words: list[str], where: str) -> click.Command:
    from gpulab.cli import LazyGroup

    cmd = root
    ctx = click.Context(root)
    for w in words:
        if not isinstance(cmd, LazyGroup) and not hasattr(cmd, "get_command"):
            raise InputError(f"{where}: '{' '.join(words)}' is not a gpulab command")
        sub = cmd.get_command(ctx, w)
        if sub is None:
            raise InputError(f"{where}: unknown command '{' '.join(words)}'")
        cmd = sub
    if hasattr(cmd, "commands") and getattr(cmd, "commands"):
        names = ", ".join(sorted(cmd.commands))
        raise InputError(f"{where}: '{' '.join(words)}' is a group; name one of its commands ({names})")
    return cmd


def _is_option(p: Any) -> bool:
    return getattr(p, "param_type_name", "") == "option"


def _option_for(cmd: click.Command, key: str) -> click.Parameter | None:
    norm = key.replace("-", "_")
    for p in cmd.params:
        if _is_option(p) and (p.name == norm or any(o.lstrip("-").replace("-", "_") == norm
                                                                   for o in p.opts + p.secondary_opts)):
            return p
    return None


def _to_argv(cmd: click.Command, params: dict[str, Any], where: str) -> list[str]:
    argv: list[str] = []
    for key, value in params.items():
        opt = _option_for(cmd, key)
        if opt is None:
            known = sorted(p.name for p in cmd.params if _is_option(p) and p.name != "help")
            raise InputError(f"{where}: unknown parameter '{key}' (known: {', '.join(known)})")
        flag = max(opt.opts, key=len)
        if opt.is_flag:
            if not isinstance(value, bool):
                raise InputError(f"{where}: parameter '{key}' must be true or false, got {value!r}")
            if opt.secondary_opts:
                argv.append(flag if value else max(opt.secondary_opts, key=len))
            elif value:
                argv.append(flag)
            continue
        if isinstance(value, (dict, list)):
            raise InputError(f"{where}: parameter '{key}' must be a single value, got {type(value).__name__}")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        argv += [flag, text]
    return argv


def _validate(cmd: click.Command, args: list[str], params: dict[str, Any], where: str) -> None:
    """Parse (not run) the command line, so that every value is converted by the command's own types."""
    try:
        cmd.make_context(cmd.name or "command", list(args), resilient_parsing=False)
    except Exception as e:  # click's usage errors (Typer may vendor its own click)
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        key = next((k for k in params if f"--{k.replace('_', '-')}" in msg or f"--{k}" in msg), None)
        raise InputError(f"{where}: {'parameter ' + repr(key) + ': ' if key else ''}{msg}") from None


def plan(data: dict[str, Any], source: str = "experiment") -> list[Invocation]:
    """Validate every run and expand sweeps into command lines (imports each command's module)."""
    from gpulab.cli import app
    import typer

    root = typer.main.get_command(app)
    invocations: list[Invocation] = []
    for i, run in enumerate(data["runs"]):
        where = f"{source}: runs[{i}]"
        if not isinstance(run, dict):
            raise InputError(f"{where}: each run must be a mapping with a 'command'")
        unknown = set(run) - RUN_KEYS
        if unknown:
            raise InputError(f"{where}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(RUN_KEYS))})")
        command = run.get("command")
        if not isinstance(command, str) or not command.strip():
            raise InputError(f"{where}: 'command' must be a string such as 'sort bench'")
        words = command.split()
        if words[0] in ("run",):
            raise InputError(f"{where}: an experiment cannot run 'gpulab run'")
        params = run.get("params") or {}
        if not isinstance(params, dict):
            raise InputError(f"{where}: 'params' must be a mapping of option names to values")
        args = run.get("args") or []
        if not isinstance(args, list):
            raise InputError(f"{where}: 'args' must be a list of positional arguments")
        expect_ok = run.get("expect_ok", True)
        if not isinstance(expect_ok, bool):
            raise InputError(f"{where}: 'expect_ok' must be true or false")
        cmd = _resolve(root, words, where)
        for combo in expand(params):
            tail = [*[str(a) for a in args], *_to_argv(cmd, combo, where)]
            _validate(cmd, tail, combo, where)
            argv = [*words, *tail]
            label = run.get("name") or command
            if len(combo) and any(isinstance(v, list) for v in params.values()):
                label += " [" + ", ".join(f"{k}={combo[k]}" for k, v in params.items() if isinstance(v, list)) + "]"
            invocations.append(Invocation(label=str(label), words=words, params=combo, argv=argv,
                                          expect_ok=expect_ok))
    return invocations
