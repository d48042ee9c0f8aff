"""``gpulab report DIR``: one table over many result files (or over their rows), for reading or for plotting."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(add_completion=False)

FORMATS = ("table", "markdown", "csv", "json")


def _well_formed(data: dict[str, Any]) -> bool:
    """The parts a report reads have their types: summary, config and device mappings, rows a list of mappings;
    the keys of summary, config and rows (a report's columns) strings; name, finished_utc and ok (every line's
    head) plain values (an unquoted timestamp reads as a datetime, which JSON cannot take)."""
    rows, device = data.get("rows") or [], data.get("device") or {}
    summary, config = data.get("summary") or {}, data.get("config") or {}
    return (all(_scalar(data.get(k)) for k in ("name", "finished_utc", "ok"))
            and isinstance(summary, dict) and isinstance(config, dict)
            and isinstance(device, dict) and isinstance(device.get("gpu") or {}, dict)
            and isinstance(device.get("cpu") or {}, dict) and isinstance(rows, list)
            and all(isinstance(r, dict) for r in rows)
            and all(isinstance(k, str) for m in (summary, config, *rows) for k in m))


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def report_rows(data: dict[str, Any], file: str, per_row: bool) -> list[dict[str, Any]]:
    """One row per result (its summary's scalar fields) or, ``per_row``, one per row of its table followed by the
    result's config fields that the row lacks (a sweep's n, dtype...), each led by the result's file, name,
    finish time, device and status (a row's own field of one of those names becomes ``row_<name>``). Nested values
    (lists, mappings) are left out."""
    from gpulab.core import device

    head = {"file": file, "name": data.get("name"), "finished_utc": data.get("finished_utc"),
            "device": device.describe(data.get("device") or {}), "ok": data.get("ok")}
    if not per_row:
        row = dict(head)
        for k, v in (data.get("summary") or {}).items():
            if _scalar(v):
                row.setdefault(k, v)
        return [row]
    out = []
    for r in data.get("rows") or []:
        if isinstance(r, dict):
            row = dict(head)
            for k, v in r.items():  # a row's own name, device... (a model's, an implementation's) kept as row_*
                if _scalar(v):
                    row["row_" + k if k in head else k] = v
            for k, v in (data.get("config") or {}).items():
                if _scalar(v):
                    row.setdefault(k, v)
            out.append(row)
    return out


def _json_value(v: Any) -> Any:
    """NaN and infinities as null: JSON has no literal for them (json.dumps would write NaN, which strict parsers
    reject)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV with every column any row has (empty where a row lacks it or holds None); numbers unrounded."""
    import csv
    import io

    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


@app.command()
def report(
    folder: Optional[Path] = typer.Argument(None, help="Folder (searched recursively) or a single result file "
                                                       "(default: gpulab's --out folder)."),
    format: str = typer.Option("table", "--format", help="table | markdown | csv | json (csv and json keep "
                                                          "numbers unrounded, for plots)"),
    name: str = typer.Option("", "--name", help="Only results whose name starts with this."),
    rows_: bool = typer.Option(False, "--rows", help="One line per row of each result's table (e.g. each "
                                                      "implementation of a bench) instead of one per result."),
) -> None:
    """Aggregate result YAML files: one row per file with its device, status and summary metrics."""
    from rich.console import Console

    from gpulab.core import options, results
    from gpulab.core.errors import InputError, series

    if folder is None:  # where this call's results go (--out, GPULAB_OUT; in `gpulab run`, the run's --out)
        folder = options.get().out
    if format not in FORMATS:
        raise InputError(f"--format must be {series(FORMATS)}, got {format!r}")
    if not folder.exists():
        raise InputError(f"no such folder or file: {folder}")
    files = [folder] if folder.is_file() else sorted(folder.rglob("*.yaml"))
    rows = []
    skipped = matched = 0
    for f in files:
        try:
            data = results.load(f)
        except InputError:
            if folder.is_file():
                raise
            skipped += 1  # other YAML in the folder (configs, checkpoints' metadata)
            continue
        if not _well_formed(data):
            if folder.is_file():
                raise InputError(f"{f}: a result file whose name, finished_utc, ok, summary, config, rows or device is "
                                 "not of the expected type")
            skipped += 1
            continue
        if name and not str(data.get("name", "")).startswith(name):
            continue
        matched += 1
        # its path below the folder: records of the same name in two subfolders (a sweep per card) stay apart
        rows += report_rows(data, f.name if folder.is_file() else str(f.relative_to(folder)), rows_)
    if not matched:
        raise InputError(f"no gpulab result files under {folder}" + (f" named {name}*" if name else ""))
    if not rows:
        raise InputError(f"the {matched} matching result files under {folder} have no table rows")
    if format == "markdown":
        typer.echo(results.markdown_table(rows))
    elif format == "csv":
        typer.echo(csv_text(rows), nl=False)
    elif format == "json":
        import json

        typer.echo(json.dumps([{k: _json_value(v) for k, v in r.items()} for r in rows], indent=1, allow_nan=False))
    else:
        Console().print(results.rows_table(rows, title=f"{len(rows)} {'rows' if rows_ else 'results'} from {folder}"))
    if skipped and format == "table":
        Console(stderr=True).print(f"skipped {skipped} YAML files that are not gpulab results")
