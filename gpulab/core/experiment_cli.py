"""``gpulab run EXPERIMENT.yaml``: validate, run every invocation, print a summary table."""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command()
def run(
    experiment: Path = typer.Argument(..., help="An experiment file, e.g. experiments/smoke.yaml."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and list the command lines only."),
    keep_going: bool = typer.Option(True, "--keep-going/--stop-on-error", help="Continue after a failed run."),
) -> None:
    """Run an experiment file; every run writes its own result YAML, the summary goes to run-*.yaml."""
    import time

    from rich.console import Console
    from rich.markup import escape

    from gpulab.cli import invoke
    from gpulab.core import experiment as exp
    from gpulab.core import options, results
    from gpulab.core.errors import GpulabError

    data = exp.load_file(experiment)
    device_arg = options.get().device  # the call's own --device (or GPULAB_DEVICE), before the file's
    if "device" in data and options.get().device == "auto":
        options.set_options(device=data["device"])
    invocations = exp.plan(data, source=str(experiment))
    console = Console()
    opts = options.get()  # every run inherits this run's global options
    for inv in invocations:  # "{out}" in a value: the --out folder of this call (where its runs write)
        inv.argv = [a.replace("{out}", str(opts.out)) for a in inv.argv]
    if dry_run:
        import shlex

        device = [] if opts.device == "auto" else ["--device", opts.device]  # the file's device, or the call's
        for inv in invocations:
            typer.echo("gpulab " + shlex.join([*device, *inv.argv]))  # as a shell would take it; no rich markup
        return
    if opts.device == "cuda":  # `device: cuda` (or --device cuda) with no GPU: every run would fail, one by one
        from_file = data.get("device") == "cuda" and device_arg == "auto"
        options.resolve_device(what=f"{experiment}: device cuda" if from_file else "gpulab run")
    results.check_out_folder(opts.out)  # before any run: a sweep must not fail at its first save
    summary = results.Record(name="run", config={"experiment": str(experiment), "name": data.get("name"),
                                                  "invocations": [" ".join(i.argv) for i in invocations]})
    failures = 0
    global_args = ["--device", opts.device, "--out", str(opts.out)] + (["--debug"] if opts.debug else [])
    for i, inv in enumerate(invocations):
        console.rule(f"[bold]{escape(inv.label)}")
        before = len(results.written)
        t0 = time.perf_counter()
        error = None
        try:
            code = invoke(global_args + inv.argv)  # an interrupt raises (Interrupted): the sweep stops
            if isinstance(code, int) and not isinstance(code, bool) and code != 0:  # typer.Exit(code)
                error = f"exit {code}"
        except SystemExit as e:  # a command that exits non-zero itself
            if e.code not in (0, None):
                error = f"exit {e.code}"
        except GpulabError as e:
            error = str(e).splitlines()[0]
        except Exception as e:  # keep going, but say what broke
            if options.get().debug:
                raise
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        seconds = time.perf_counter() - t0
        files = results.written[before:]
        row = {"run": inv.label, "seconds": round(seconds, 2)}
        ok = error is None
        headline: list[str] = []
        for f in files:
            data_f = results.load(f)
            ok = ok and bool(data_f.get("ok", True))
            for k, v in (data_f.get("summary") or {}).items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    row.setdefault(k, v)
                    headline.append(f"{k}={results.fmt(v)}")
        row["summary"] = "; ".join(headline[:8])
        row["ok"] = ok if inv.expect_ok else (not ok)
        row["result"] = ", ".join(Path(f).name for f in files) or "-"
        if error:
            row["error"] = error
            console.print(f"[red]error:[/] {escape(error)}")
        summary.rows.append(row)
        summary.check(f"{i + 1}: {inv.label}", row["ok"], error)  # numbered: two runs may share a label
        if not row["ok"]:
            failures += 1
            if not keep_going:
                break
    path = summary.save()
    console.rule("[bold]summary")
    table_rows = [{k: r.get(k) for k in ("run", "ok", "seconds", "summary", "error")} for r in summary.rows]
    if not any(r.get("error") for r in table_rows):
        table_rows = [{k: v for k, v in r.items() if k != "error"} for r in table_rows]
    console.print(results.rows_table(table_rows, title=f"{data.get('name') or experiment}"))
    console.print(f"wrote {path}")
    if failures:
        skipped = len(invocations) - len(summary.rows)
        raise GpulabError(f"{failures} of {len(summary.rows)} runs failed"
                          + (f", {skipped} not run (--stop-on-error)" if skipped else "") + f" (see {path})")
