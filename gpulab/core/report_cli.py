"""``gpulab report DIR``: one table over many result files."""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command()
def report(
    folder: Path = typer.Argument(Path("results"), help="Folder (searched recursively) or a single result file."),
    format: str = typer.Option("table", "--format", help="table | markdown"),
    name: str = typer.Option("", "--name", help="Only results whose name starts with this."),
) -> None:
    """Aggregate result YAML files: one row per file with its device, status and summary metrics."""
    from rich.console import Console

    from gpulab.core import device, results
    from gpulab.core.errors import InputError

    if format not in ("table", "markdown"):
        raise InputError(f"--format must be table or markdown, got {format!r}")
    if not folder.exists():
        raise InputError(f"no such folder or file: {folder}")
    files = [folder] if folder.is_file() else sorted(folder.rglob("*.yaml"))
    rows = []
    skipped = 0
    for f in files:
        try:
            data = results.load(f)
        except InputError:
            if folder.is_file():
                raise
            skipped += 1  # other YAML in the folder (configs, checkpoints' metadata)
            continue
        if name and not str(data.get("name", "")).startswith(name):
            continue
        row = {"file": f.name, "name": data.get("name"), "finished_utc": data.get("finished_utc"),
               "device": device.describe(data.get("device") or {}), "ok": data.get("ok")}
        for k, v in (data.get("summary") or {}).items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                row.setdefault(k, v)
        rows.append(row)
    if not rows:
        raise InputError(f"no gpulab result files under {folder}")
    if format == "markdown":
        typer.echo(results.markdown_table(rows))
    else:
        Console().print(results.rows_table(rows, title=f"{len(rows)} results from {folder}"))
        if skipped:
            Console(stderr=True).print(f"skipped {skipped} YAML files that are not gpulab results")
