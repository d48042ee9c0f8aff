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
        expect_ok: false             # optional (default true): the run is expected to fail, an error or a
                                     # failed check; the summary counts it ok when it fails, failed when not

Unknown keys, unknown commands, unknown options, null values and values of the wrong type are one-line
errors that name the key, and all of them are found before anything runs. A value that a command checks
only when it runs (a range, a choice such as ``dist``) fails that run alone; the others still run unless
``--stop-on-error``. An option that may be given several times (``generate --prompt``) takes a list as its
values; a list of lists sweeps over them. The file is read as YAML 1.2 (``no`` is a string, ``010`` is ten,
a key given twice is an error).
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
MAX_INVOCATIONS = 10_000  # a sweep larger than this is taken for a typo (split a real one into files)
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
    if p.is_dir():
        raise InputError(f"{p} is a folder; give an experiment file (e.g. experiments/smoke.yaml)")
    data = read_yaml_mapping(p, f"experiment file not found: {p}",
                             f"{p}: an experiment file must be a mapping with a 'runs' list")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise InputError(f"{p}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(TOP_KEYS))})")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise InputError(f"{p}: 'runs' must be a non-empty list")
    for key in ("name", "description"):  # left empty (null): as if absent
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InputError(f"{p}: '{key}' must be a string, got {type(data[key]).__name__}")
    if "device" in data and data["device"] not in ("auto", "cuda", "cpu"):
        raise InputError(f"{p}: 'device' must be auto, cuda or cpu, got {data['device']!r}")
    return data


def expand(params: dict[str, Any], where: str = "experiment", repeatable: frozenset = frozenset()) -> list[dict[str, Any]]:
    """Cartesian product over list-valued parameters (a sweep), in file order. A ``repeatable`` option's list
    of plain values is one point (its values given together); its list of lists is the sweep."""
    keys = list(params)
    axes = []
    for k, v in params.items():
        if k in repeatable and isinstance(v, list) and not any(isinstance(e, list) for e in v):
            v = [v]
        axes.append(v if isinstance(v, list) else [v])
    if any(len(a) == 0 for a in axes):
        empty = keys[[len(a) for a in axes].index(0)]
        raise InputError(f"{where}: parameter '{empty}' is an empty list")
    total = 1
    for a in axes:
        total *= len(a)
    if total > MAX_INVOCATIONS:
        raise InputError(f"{where}: the sweep has {total} points, more than {MAX_INVOCATIONS}; split it")
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


def _names(opts: list[str], key: str) -> bool:
    """Whether ``key`` (with - or _) spells one of ``opts``."""
    norm = key.replace("-", "_")
    return any(o.lstrip("-").replace("-", "_") == norm for o in opts)


def _option_for(cmd: click.Command, key: str) -> click.Parameter | None:
    norm = key.replace("-", "_")
    for p in cmd.params:
        if _is_option(p) and (p.name == norm or _names(p.opts + p.secondary_opts, key)):
            return p
    return None


def _to_argv(cmd: click.Command, params: dict[str, Any], where: str) -> list[str]:
    argv: list[str] = []
    seen: dict[str, str] = {}  # option -> the key that gave it
    for key, value in params.items():
        opt = _option_for(cmd, key)
        if opt is None:
            known = sorted(p.name for p in cmd.params if _is_option(p) and p.name != "help")
            raise InputError(f"{where}: unknown parameter '{key}' (known: {', '.join(known)})")
        if opt.name in seen:  # overlap-chunks and overlap_chunks: the last would win, silently
            raise InputError(f"{where}: parameter '{key}' is given twice (also as '{seen[opt.name]}')")
        seen[opt.name] = key
        flag = max(opt.opts, key=len)
        if value is None or (isinstance(value, list) and any(v is None for v in value)):
            raise InputError(f"{where}: parameter '{key}' is null; give it a value or leave it out")
        if getattr(opt, "multiple", False) and isinstance(value, list):
            for v in value:
                if isinstance(v, (dict, list)):
                    raise InputError(f"{where}: parameter '{key}' takes single values, got a {type(v).__name__}")
                argv += [flag, str(v).lower() if isinstance(v, bool) else str(v)]
            continue
        if opt.is_flag:
            if not isinstance(value, bool):
                raise InputError(f"{where}: parameter '{key}' must be true or false, got {value!r}")
            if opt.secondary_opts:
                # a key that spells the negative form (no_amp of --amp/--no-amp) turns the option off when true
                negative = not _names(opt.opts, key) and _names(opt.secondary_opts, key)
                argv.append(flag if value != negative else max(opt.secondary_opts, key=len))
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
        param = getattr(e, "param", None)  # the option click refused (not a key whose name is a prefix of it)
        key = next((k for k in params if param is not None and _option_for(cmd, k) is param), None)
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
        params = {} if run.get("params") is None else run["params"]  # left empty (null): none
        if not isinstance(params, dict):
            raise InputError(f"{where}: 'params' must be a mapping of option names to values")
        bad_key = next((k for k in params if not isinstance(k, str)), None)
        if bad_key is not None:
            raise InputError(f"{where}: parameter names must be strings, got {bad_key!r}")
        args = [] if run.get("args") is None else run["args"]
        if not isinstance(args, list) or any(a is None or isinstance(a, (list, dict)) for a in args):
            raise InputError(f"{where}: 'args' must be a list of positional arguments (single values, not null)")
        if run.get("name") is not None and (not isinstance(run["name"], str) or not run["name"].strip()):
            raise InputError(f"{where}: 'name' must be a non-empty string, got {run['name']!r}")
        expect_ok = run.get("expect_ok", True)
        if not isinstance(expect_ok, bool):
            raise InputError(f"{where}: 'expect_ok' must be true or false")
        cmd = _resolve(root, words, where)
        repeatable = frozenset(k for k in params if getattr(_option_for(cmd, k), "multiple", False))
        for combo in expand(params, where, repeatable):
            tail = [*[str(a) for a in args], *_to_argv(cmd, combo, where)]
            _validate(cmd, tail, combo, where)
            argv = [*words, *tail]
            label = run.get("name") or command
            swept = [k for k, v in params.items() if isinstance(v, list) and (k not in repeatable
                                                                             or any(isinstance(e, list) for e in v))]
            if swept:
                label += " [" + ", ".join(f"{k}={combo[k]}" for k in swept) + "]"
            invocations.append(Invocation(label=str(label), words=words, params=combo, argv=argv,
                                          expect_ok=expect_ok))
            if len(invocations) > MAX_INVOCATIONS:
                raise InputError(f"{source}: more than {MAX_INVOCATIONS} runs; split the experiment")
    return invocations
