"""A stand-in for the device scripts' Python (their PY) that checks each call instead of running it.

tests/core/test_device_scripts.py runs every scripts/device/*.sh on the CPU with PY pointing here, so that a
renamed option, a test selection that matches nothing or a Python syntax error shows up here, not in a device
call (15 minutes a session). Each call appends one line to $DRYRUN_LOG ("ok ..." / "FAIL ..." / "note ...") and:

- ``-m gpulab[.cli] ARGS`` / ``-m gpulab.<module> ARGS``: parses ARGS with the command's own click types (the
  subcommand chain included) without running it; ``gpulab ... run EXP`` also validates EXP (``run --dry-run``).
- ``-m pytest ARGS``: collects ARGS (``--collect-only``); a selection with no test fails.
- ``- [ARGS]`` (a heredoc), ``FILE.py``, ``-c CODE``: compiles the source. A heredoc also runs, with the real
  interpreter (it may write a file the script reads next, as dbjoin_map.sh's does); its exit code is only noted,
  since the summaries it prints read results that a dry run does not make (the test puts CPU records where it can). ``-c`` exits 0 (so
  ``"$PY" -c "import flashinfer"`` takes the branch that has flashinfer).
Calls other than these pass. Failures exit 2.
"""
from __future__ import annotations

import os
import subprocess
import sys


def log(line: str) -> None:
    with open(os.environ["DRYRUN_LOG"], "a") as f:
        f.write(line.replace("\n", " ")[:4000] + "\n")


def fail(what: str) -> None:
    log(f"FAIL {what}")
    sys.exit(2)


def rest_args(ctx) -> list[str]:
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = getattr(ctx, "protected_args", [])
    return [*protected, *ctx.args]


def parse_only(cmd, args: list[str], name: str) -> list[str]:
    """Parse ``args`` down the command chain; returns the command words it resolved."""
    ctx = cmd.make_context(name, list(args), resilient_parsing=False)
    if not hasattr(cmd, "resolve_command"):
        return [name]
    rest = rest_args(ctx)
    if not rest:
        raise ValueError(f"{name}: no subcommand given")
    sub_name, sub, sub_args = cmd.resolve_command(ctx, rest)
    if sub is None:
        raise ValueError(f"{name}: unknown command {rest[0]!r}")
    return [name, *parse_only(sub, sub_args, sub_name)]


def check_gpulab(module: str, args: list[str]) -> None:
    import importlib

    import typer

    if module in ("gpulab", "gpulab.cli"):
        from gpulab.cli import app
    else:
        app = getattr(importlib.import_module(module), "app", None)
        if app is None:
            fail(f"-m {module}: no Typer app to parse its arguments")
    cmd = typer.main.get_command(app) if isinstance(app, typer.Typer) else app
    try:
        words = parse_only(cmd, args, module)
    except SystemExit as e:  # click's --help and the like
        fail(f"-m {module} {' '.join(args)}: exits {e.code} while parsing")
    except Exception as e:  # noqa: BLE001 - click usage errors (Typer may vendor click), bad values
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        fail(f"-m {module} {' '.join(args)}: {type(e).__name__}: {msg}")
    if words[1:2] == ["run"]:  # an experiment file: validate every run in it
        at = args.index("run")
        proc = subprocess.run([sys.executable, "-m", "gpulab", *args[:at], "run", "--dry-run", *args[at + 1:]],
                              capture_output=True, text=True, cwd=os.getcwd())
        if proc.returncode != 0:
            fail(f"-m {module} {' '.join(args)}: run --dry-run exits {proc.returncode}: "
                 f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    log(f"ok gpulab {' '.join(words[1:]) if module in ('gpulab', 'gpulab.cli') else module}: {' '.join(args)}")


def check_pytest(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, cwd=os.getcwd())
    tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:]
    if proc.returncode != 0:
        fail(f"pytest {' '.join(args)}: collection exits {proc.returncode} ({'; '.join(tail)})")
    log(f"ok pytest {' '.join(args)}: {'; '.join(tail)}")


def check_source(source: str, where: str) -> None:
    try:
        compile(source, where, "exec")
    except SyntaxError as e:
        fail(f"{where}: {e}")


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "-m":
        module, args = argv[1], argv[2:]
        if module == "pytest":
            check_pytest(args)
        elif module == "gpulab" or module.startswith("gpulab."):
            check_gpulab(module, args)
        else:
            log(f"note -m {module}: passed unchecked")
        return
    if argv and argv[0] == "-c":
        check_source(argv[1] if len(argv) > 1 else "", "-c")
        log(f"ok -c {argv[1][:60] if len(argv) > 1 else ''}")
        return
    if argv and argv[0] == "-":
        source = sys.stdin.read()
        check_source(source, "<heredoc>")
        sys.stdout.flush()
        proc = subprocess.run([sys.executable, "-", *argv[1:]], input=source, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stderr)
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:]
        log(f"ok heredoc (compiles; ran with exit {proc.returncode}{': ' + err[0] if proc.returncode else ''})")
        return
    if argv and argv[0].endswith(".py"):
        with open(argv[0]) as f:
            check_source(f.read(), argv[0])
        log(f"ok {argv[0]} (compiles)")
        return
    log(f"note {' '.join(argv)[:80]}: passed unchecked")


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main(sys.argv[1:])
