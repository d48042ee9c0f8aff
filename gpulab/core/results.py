"""Result records: what every gpulab command writes.

A :class:`Record` holds name, config, device probe, metrics, table rows, correctness checks,
notes, started/finished UTC and the git commit; :meth:`Record.save` writes it atomically as
YAML to ``<out>/<name>-<UTC time>.yaml``; :meth:`Record.print` shows it as rich tables (the
summary one line per field where one column per field would not fit the terminal).
"""
from __future__ import annotations

import datetime as _dt
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpulab.core import atomic, files, nvml, options
from gpulab.core.errors import InputError

SCHEMA = "gpulab.result/1"
# Paths written by this process, in order (``gpulab run`` summarises them), and the failed checks of each
written: list[Path] = []
failed_checks: dict[Path, list[str]] = {}


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def git_state(cwd: Path | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the checkout gpulab runs from, or None outside a checkout."""
    where = cwd or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def plain(obj: Any) -> Any:
    """Convert numpy/torch scalars, tuples, paths and dataclasses into YAML-safe Python values."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "as_dict"):
        return plain(obj.as_dict())
    if hasattr(obj, "item") and getattr(obj, "shape", None) in ((), None):
        try:
            return plain(obj.item())
        except Exception:
            pass
    if hasattr(obj, "tolist"):
        return plain(obj.tolist())
    return str(obj)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write text to path through a temporary file in the same folder and a rename."""
    return atomic.write_text(path, text)


def yaml_text(data: Any) -> str:
    """``data`` as gpulab writes YAML (plain types, keys in order, 120 columns)."""
    return yaml.dump(plain(data), Dumper=files.safe_dumper(), sort_keys=False, allow_unicode=True, width=120)


def atomic_write_yaml(path: Path, data: Any) -> Path:
    return atomic_write_text(path, yaml_text(data))


@dataclass
class Record:
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: dict[str, Any] | None = None
    started: _dt.datetime = field(default_factory=utc_now)
    finished: _dt.datetime | None = None
    argv: list[str] = field(default_factory=lambda: list(sys.argv[1:]))
    # every NVML device's energy and clock-limit counters when the record was made (None without NVML)
    nvml_start: Any = field(default_factory=lambda: nvml.snapshot(), repr=False)

    def check(self, name: str, passed: bool, detail: Any = None) -> bool:
        """Record a correctness check; returns ``passed`` so callers can branch on it."""
        entry: dict[str, Any] = {"passed": bool(passed)}
        if detail is not None:
            entry["detail"] = detail
        self.checks[name] = entry
        return bool(passed)

    @property
    def ok(self) -> bool:
        return all(c["passed"] for c in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        from gpulab import __version__
        from gpulab.core.device import probe

        finished = self.finished or utc_now()
        seconds = (finished - self.started).total_seconds()
        gpu_counters = nvml.during(self.nvml_start, nvml.snapshot(), nvml.torch_pci(), seconds)
        hot = nvml.thermal_note(gpu_counters, seconds)
        return {
            "schema": SCHEMA,
            "name": self.name,
            "ok": self.ok,
            "summary": self.summary,
            "config": self.config,
            "metrics": self.metrics,
            "rows": self.rows,
            "checks": self.checks,
            "notes": self.notes + ([hot] if hot else []),
            "device": self.device if self.device is not None else probe(),
            "gpu_counters": gpu_counters,  # energy, time held down by the power limit or by temperature (NVML)
            "started_utc": _iso(self.started),
            "finished_utc": _iso(finished),
            "duration_s": round(seconds, 3),
            "argv": self.argv,
            "gpulab_version": __version__,
            "git": git_state(),
        }

    def save(self, out: Path | str | None = None) -> Path:
        """Write ``<out>/<name>-<UTC>.yaml`` atomically (out defaults to the global --out)."""
        self.finished = self.finished or utc_now()
        folder = Path(out) if out is not None else options.get().out
        stamp = self.finished.strftime("%Y%m%dT%H%M%S.%fZ")
        path = folder / f"{self.name}-{stamp}.yaml"
        k = 2
        while path.exists():  # another record of this name finished in the same microsecond: keep both
            path = folder / f"{self.name}-{stamp}-{k}.yaml"
            k += 1
        try:
            atomic_write_yaml(path, self.as_dict())
        except OSError as e:  # not a folder, no permission, no space left...
            raise InputError(f"--out {folder}: cannot write result files there ({type(e).__name__}: "
                             f"{e.strerror or e})") from None
        written.append(path)
        failed_checks[path] = [k for k, c in self.checks.items() if not c["passed"]]
        return path

    def print(self, title: str | None = None) -> None:
        from rich.console import Console
        from rich.markup import escape

        console = Console()
        if self.rows:
            console.print(rows_table(self.rows, title=title or self.name))
        if self.summary:
            console.print(summary_table(self.summary, title=f"{self.name}: summary", width=console.width))
        failed = [k for k, c in self.checks.items() if not c["passed"]]
        if self.checks:
            status = "[green]all checks passed[/]" if not failed else f"[red]FAILED: {escape(', '.join(failed))}[/]"
            console.print(f"{len(self.checks)} checks: {status}")
        for note in self.notes:
            console.print(f"note: {escape(note)}")


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def check_out_folder(folder: Path | str) -> None:
    """A one-line InputError unless ``folder`` is a folder this process can write in, or one it can create (the
    check creates nothing: a command that then fails on its input leaves no empty results folder behind)."""
    import os

    p = Path(folder)
    if p.exists():
        if not p.is_dir():
            raise InputError(f"--out {p}: not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"--out {p}: this process cannot write there")
        return
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--out {p}: cannot create the results folder ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {p}: cannot create the results folder (this process cannot write in {parent})")


def check_out() -> None:
    """Before a command's work: fail now when its --out folder cannot take the result files it will write."""
    check_out_folder(options.get().out)


def rows_table(rows: list[dict[str, Any]], title: str | None = None, columns: list[str] | None = None):
    from rich.markup import escape
    from rich.table import Table

    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    table = Table(title=escape(title) if title else title, show_lines=False)
    for c in cols:
        table.add_column(escape(c), overflow="fold")
    for r in rows:
        table.add_row(*(escape(fmt(r.get(c))) for c in cols))
    return table


def table_width(rows: list[dict[str, Any]], columns: list[str] | None = None) -> int:
    """Terminal columns that :func:`rows_table` needs to show every header and cell on one line."""
    from rich.cells import cell_len

    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    # rich's default box: a rule before each column and one after the last, one space of padding either side
    return 1 + sum(3 + max([cell_len(c), *(cell_len(fmt(r.get(c))) for r in rows)]) for c in cols)


def summary_table(summary: dict[str, Any], title: str | None = None, width: int | None = None):
    """A record's summary (one row): one column per field where that fits in ``width`` terminal columns, else one
    line per field, as a two-column ``field | value`` table, so that no column is folded to a few characters
    (``gpulab probe``'s 14 fields in an 80-column log were). ``width=None``: always one column per field."""
    if width is None or table_width([summary]) <= width:
        return rows_table([summary], title=title)
    return rows_table([{"field": k, "value": v} for k, v in summary.items()], title=title)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")
                                       for c in cols) + " |")
    return "\n".join(lines)


def load(path: Path | str) -> dict[str, Any]:
    """Read a result file; a missing or malformed file is a one-line InputError."""
    p = Path(path)
    not_result = f"{p}: not a gpulab result file (no 'schema: {SCHEMA}')"
    data = files.read_yaml_mapping(p, f"result file not found: {p}", not_result)
    if data.get("schema") != SCHEMA:
        raise InputError(not_result)
    return data
