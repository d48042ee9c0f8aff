"""The ``gpulab`` command: one root Typer app whose command groups are imported lazily.

Each entry of :data:`COMMANDS` names the module and attribute of a Typer app (or click command)
and a one-line help. ``gpulab --help`` lists them from that table without importing any of
them, so it imports no torch; ``gpulab sort ...`` imports ``gpulab.sort.cli`` only then.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional

from gpulab.core.clickcompat import click
import typer
from typer.core import TyperCommand, TyperGroup

from gpulab.core import options
from gpulab.core.errors import GpulabError, Interrupted

# name -> (module:attribute, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "probe": ("gpulab.core.probe_cli:app", "Probe this machine's device (GPU, L2, versions) and write it as YAML."),
    "serve": ("gpulab.vajra.cli:serve_app", "Serve an FP8/BF16 Llama-family model over an OpenAI-compatible API."),
    "serve-bench": ("gpulab.vajra.cli:bench_app", "Benchmark the vajra engine: TTFT, TPOT, throughput, roofline."),
    "serve-kernels": ("gpulab.vajra.kernel_bench:app",
                      "Benchmark vajra's kernels: FP8 GEMMs (W8A8/W8A16/bf16), attention, decode roofline."),
    "generate": ("gpulab.vajra.cli:generate_app", "Generate text offline with the vajra engine."),
    "quantize": ("gpulab.vajra.quantize_cli:app", "Write a compressed-tensors FP8 checkpoint from a bf16/fp16 one."),
    "perplexity": ("gpulab.vajra.perplexity:app",
                   "Perplexity of models on a text, each against the first (e.g. FP8 against bf16)."),
    "kvstitch": ("gpulab.stitchkv.cli:app", "KV-cache stitching: a large model prefills, a small one decodes."),
    "seam": ("gpulab.seam.cli:app", "Stitched ResNet34/ResNet50 families: train, evaluate, select."),
    "l2": ("gpulab.l2.cli:app", "L2 persistence and next-layer prefetch policies for DNN inference."),
    "join": ("gpulab.dbjoin.cli:app", "Hash join on tensor cores (Triton) against a CUDA hash table."),
    "sort": ("gpulab.sort.cli:app", "CUDA bitonic sorts, transfers and CPU/library baselines."),
    "run": ("gpulab.core.experiment_cli:app", "Run an experiment file (experiments/*.yaml); lists expand to sweeps."),
    "report": ("gpulab.core.report_cli:app", "Aggregate result YAML files into one table (table, markdown, csv or json)."),
}


def load_command(name: str) -> click.Command:
    """Import and convert the command registered under ``name``."""
    target, _ = COMMANDS[name]
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise GpulabError(f"'gpulab {name}' is not available in this build ({module_name} is missing)") from None
        raise GpulabError(f"'gpulab {name}' needs the package '{e.name}', which is not installed") from None
    obj = getattr(module, attr)
    cmd = typer.main.get_command(obj) if isinstance(obj, typer.Typer) else obj
    cmd.name = name
    return cmd


class LazyGroup(TyperGroup):
    """A TyperGroup that imports registered subcommands on first use."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(dict.fromkeys([*self.commands, *COMMANDS]))

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name not in COMMANDS:
            return None
        if self._listing:  # help listing: a stand-in carrying the help text, nothing imported
            return TyperCommand(name=cmd_name, help=COMMANDS[cmd_name][1], short_help=COMMANDS[cmd_name][1])
        cmd = load_command(cmd_name)
        self.commands[cmd_name] = cmd
        return cmd

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            return super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    cls=LazyGroup,
    name="gpulab",
    help="gpulab: GPU systems experiments, each one command, checked against a reference, written as YAML.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    device: str = typer.Option("auto", "--device", help="auto | cuda | cpu", envvar="GPULAB_DEVICE"),
    out: str = typer.Option("results", "--out", help="Folder for result YAML files.", envvar="GPULAB_OUT"),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.", envvar="GPULAB_DEBUG"),
) -> None:
    if device not in options.DEVICE_CHOICES:
        raise typer.BadParameter(f"must be one of {', '.join(options.DEVICE_CHOICES)}", param_hint="--device")
    if not out.strip():  # Path("") is the current folder: result files would land there unasked
        raise typer.BadParameter("must name a folder, got an empty string", param_hint="--out")
    options.set_options(device=device, out=Path(out), debug=debug)


def _error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")


_MAIN_PID: list[int] = []  # the process whose main() installed the SIGINT handler


def _raise_interrupted(signum, frame) -> None:
    import os
    import signal

    if _MAIN_PID and os.getpid() != _MAIN_PID[-1]:  # a forked child (a DataLoader worker): what its own code
        if signum == signal.SIGINT:  # expects, a KeyboardInterrupt (raised here) or the default end; its parent
            signal.default_int_handler(signum, frame)  # reports the signal
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: known errors become one line and exit 1; usage errors exit 2; Ctrl-C exits 130."""
    import os

    from gpulab.core.child import handling

    with handling(_raise_interrupted) as installed:
        if installed:
            _MAIN_PID.append(os.getpid())
        try:
            _main(argv)
        finally:
            if installed:
                _MAIN_PID.pop()


def _main(argv: list[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # this call's own flag or the environment (not what an earlier call in this process left set)
    debug = "--debug" in args or options.debug_from_env()
    command = typer.main.get_command(app)
    from gpulab.core import results

    before = len(results.written)
    try:
        rv = _call(command, args)
        _exit_if_checks_failed(results.written[before:], results.failed_checks)
    except Interrupted as e:
        import signal

        if debug:
            import traceback

            traceback.print_exc()
        _error("terminated" if e.signum == signal.SIGTERM else "interrupted")
        sys.exit(128 + e.signum)
    except Exception as e:
        kind = type(e).__name__
        if kind == "Abort":
            _error("aborted")
            sys.exit(130)
        if kind == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if hasattr(e, "show") and hasattr(e, "exit_code") and not isinstance(e, GpulabError):  # usage errors
            if debug:
                raise
            e.show()
            sys.exit(e.exit_code)
        _report(e, debug)
    except KeyboardInterrupt:  # SIGINT with another handler than ours (not the main thread)
        _error("interrupted")
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


def _exit_if_checks_failed(paths: list[Path], failed: dict[Path, list[str]]) -> None:
    """A command whose result record failed a correctness check exits 1 (its record is written, ok: false).
    The last record decides: ``gpulab run``'s summary weighs its runs' records against what each expects."""
    if paths and failed.get(paths[-1]):
        names = failed[paths[-1]]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise GpulabError(f"checks failed: {', '.join(names[:3])}{more} (see {paths[-1]})")


def _report(e: Exception, debug: bool) -> None:
    if debug:
        raise e
    if isinstance(e, GpulabError):
        _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        sys.exit(1)
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    if type(e).__name__ == "OutOfMemoryError":  # torch's CUDA OOM: the sizes asked for do not fit this GPU
        _error(f"out of GPU memory: {first} (try smaller sizes, e.g. --batch or --n; rerun with --debug for the "
               "traceback)")
        sys.exit(1)
    if isinstance(e, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in first:  # host memory
        _error(f"out of host memory: {first or type(e).__name__} (try smaller sizes; rerun with --debug for the "
               "traceback)")
        sys.exit(1)
    _error(f"{type(e).__name__}: {first} (rerun with --debug for the traceback)")
    sys.exit(1)


def invoke(args: list[str]) -> Any:
    """Run a gpulab command line in this process (used by ``gpulab run``); errors propagate."""
    import sys

    command = typer.main.get_command(app)
    saved = sys.argv
    sys.argv = ["gpulab", *args]  # the records of this command keep its own command line (Record.argv)
    try:
        return _call(command, args)
    finally:
        sys.argv = saved


def _call(command: click.Command, args: list[str]) -> Any:
    """Run the command line; what the command returns. Typer turns a KeyboardInterrupt it caught into a return
    value of 130: that is an interrupt here too (a sweep of ``gpulab run`` would take it for one failed run)."""
    rv = command.main(args=list(args), prog_name="gpulab", standalone_mode=False)
    if rv == 130 and not isinstance(rv, bool):
        raise Interrupted()
    return rv


if __name__ == "__main__":  # python -m gpulab.cli, as python -m gpulab
    main()
