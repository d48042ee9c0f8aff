"""Nsight Compute wrapper: run a command under ``ncu`` and parse ``--csv --page raw`` into records.

Typical use from a bench command with ``--ncu``::

    records = ncu.profile_gpulab(["sort", "bench", "--n", "1000000", "--reps", "1"],
                                 kernel_regex="bitonic")

which runs ``python -m gpulab ...`` in a child process under ncu (the child sees
``GPULAB_UNDER_NCU=1`` and can shrink its repetitions) and returns one :class:`KernelRecord`
per profiled kernel launch. :func:`summarize_by_kernel` folds launches of one kernel together.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable

from gpulab.core.errors import ToolError

DEFAULT_METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "lts__t_sector_hit_rate.pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
)
UNDER_NCU_ENV = "GPULAB_UNDER_NCU"

# Columns that describe the launch rather than a metric.
_ID_COLUMNS = {"ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Kernel Time", "Context", "Stream",
               "Block Size", "Grid Size", "Device", "CC", "Section Name", "Metric Name"}

_UNIT_SCALE = {
    "": 1.0, "%": 1.0, "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
    "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024.0, "MiB": 1024.0**2, "GiB": 1024.0**3,
    "nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
    "cycle": 1.0, "Kcycle": 1e3, "Mcycle": 1e6,
    "inst": 1.0, "Kinst": 1e3, "Minst": 1e6, "Ginst": 1e9,
    "warp": 1.0, "thread": 1.0, "block": 1.0, "register/thread": 1.0, "sector": 1.0, "request": 1.0,
    "byte/second": 1.0, "Kbyte/second": 1e3, "Mbyte/second": 1e6, "Gbyte/second": 1e9, "Tbyte/second": 1e12,
    "hz": 1.0, "Khz": 1e3, "Mhz": 1e6, "Ghz": 1e9,
}
# What a scaled unit becomes: values are stored in base units (bytes, nanoseconds, ...).
_BASE_UNIT = {"Kbyte": "byte", "Mbyte": "byte", "Gbyte": "byte", "Tbyte": "byte", "KB": "byte", "MB": "byte",
              "GB": "byte", "KiB": "byte", "MiB": "byte", "GiB": "byte", "usecond": "nsecond",
              "msecond": "nsecond", "second": "nsecond", "Kcycle": "cycle", "Mcycle": "cycle", "Kinst": "inst",
              "Minst": "inst", "Ginst": "inst", "Kbyte/second": "byte/second", "Mbyte/second": "byte/second",
              "Gbyte/second": "byte/second", "Tbyte/second": "byte/second", "Khz": "hz", "Mhz": "hz", "Ghz": "hz"}


@dataclass
class KernelRecord:
    id: int
    kernel: str
    metrics: dict[str, float | None]
    units: dict[str, str] = field(default_factory=dict)
    launch: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kernel": self.kernel, "metrics": dict(self.metrics), "units": dict(self.units),
                "launch": dict(self.launch)}


def parse_number(text: str) -> float | None:
    """Parse an ncu value: thousands separators, 'n/a' and empty cells (None)."""
    t = text.strip().replace(",", "").replace("\u202f", "").replace(" ", "")
    if t in ("", "n/a", "N/A", "-", "nan"):
        return None
    try:
        return float(t)
    except ValueError:
        return None


def parse_csv_raw(text: str) -> list[KernelRecord]:
    """Parse the output of ``ncu --csv --page raw`` (header row, units row, one row per launch).

    Lines that ncu or the profiled program print around the table (``==PROF==`` lines, program
    output) are skipped. Values are converted to base units (bytes, nanoseconds, ...).
    """
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    table = [ln for ln in lines[start:] if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(table))))
    if len(rows) < 2:
        return []
    header = rows[0]
    units_row = rows[1] if rows[1] and rows[1][0] == "" else None
    data = rows[2:] if units_row is not None else rows[1:]
    records: list[KernelRecord] = []
    for row in data:
        if len(row) != len(header):
            continue
        cells = dict(zip(header, row))
        metrics: dict[str, float | None] = {}
        units: dict[str, str] = {}
        for j, name in enumerate(header):
            if name in _ID_COLUMNS:
                continue
            unit = units_row[j] if units_row is not None else ""
            value = parse_number(row[j])
            scale = _UNIT_SCALE.get(unit)
            if value is not None and scale is not None:
                value *= scale
            metrics[name] = value
            units[name] = _BASE_UNIT.get(unit, unit) if scale is not None else unit
        launch = {k: cells[k] for k in ("Block Size", "Grid Size", "Stream", "Device", "CC") if k in cells}
        rid = parse_number(cells.get("ID", "")) or 0
        records.append(KernelRecord(id=int(rid), kernel=cells.get("Kernel Name", ""), metrics=metrics,
                                    units=units, launch=launch))
    return records


def summarize_by_kernel(records: Iterable[KernelRecord], short_names: bool = True) -> list[dict[str, Any]]:
    """One row per kernel name: launches, summed durations/bytes, averaged percentages."""
    groups: dict[str, list[KernelRecord]] = {}
    for r in records:
        groups.setdefault(short_kernel_name(r.kernel) if short_names else r.kernel, []).append(r)
    out = []
    for name, rs in groups.items():
        row: dict[str, Any] = {"kernel": name, "launches": len(rs)}
        keys = {k for r in rs for k in r.metrics}
        for k in sorted(keys):
            vals = [r.metrics[k] for r in rs if r.metrics.get(k) is not None]
            if not vals:
                row[k] = None
            elif k.endswith(".pct") or "pct_of" in k or k.endswith(".ratio") or ".avg" in k:
                row[k] = sum(vals) / len(vals)
            else:
                row[k] = sum(vals)
        out.append(row)
    return out


def short_kernel_name(name: str) -> str:
    """'void ns::foo<int, 4>(int*, ...)' -> 'ns::foo'."""
    n = re.sub(r"^void\s+", "", name.strip())
    depth, cut = 0, len(n)
    for i, ch in enumerate(n):
        if ch in "<(" and depth == 0:
            cut = i
            break
    return n[:cut] or name


def find_ncu() -> str:
    path = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu")
                                        if os.path.exists(p)), None)
    if not path:
        raise ToolError("ncu (Nsight Compute) is not installed or not on PATH; install it or drop --ncu")
    return path


def build_command(
    target: list[str],
    *,
    metrics: Iterable[str] = DEFAULT_METRICS,
    kernel_regex: str | None = None,
    nvtx_include: str | None = None,
    cache_control: str = "all",
    clock_control: str = "none",
    replay_mode: str = "kernel",
    launch_skip: int = 0,
    launch_count: int | None = None,
    log_file: str | None = None,
    ncu: str = "ncu",
) -> list[str]:
    if cache_control not in ("all", "none"):
        raise ValueError("cache_control must be 'all' or 'none'")
    if clock_control not in ("base", "none"):
        raise ValueError("clock_control must be 'base' or 'none'")
    if replay_mode not in ("kernel", "application"):
        raise ValueError("replay_mode must be 'kernel' or 'application'")
    # --clock-control none: ncu's default ("base") locks the GPU clocks while it profiles; gpulab leaves the
    # card's clocks as it finds them (durations under ncu are then at the clocks the card runs at).
    # kernel replay with --cache-control none: a metric collected in a second pass sees the caches the first
    # pass left behind; application replay reruns the whole program per pass (each pass sees a real L2 state)
    cmd = [ncu, "--csv", "--page", "raw", "--print-units", "base", "--metrics", ",".join(metrics),
           "--cache-control", cache_control, "--clock-control", clock_control, "--replay-mode", replay_mode,
           "--target-processes", "all"]
    if kernel_regex:
        cmd += ["--kernel-name", f"regex:{kernel_regex}"]
    if nvtx_include:
        cmd += ["--nvtx", "--nvtx-include", nvtx_include]
    if launch_skip:
        cmd += ["--launch-skip", str(launch_skip)]
    if launch_count:
        cmd += ["--launch-count", str(launch_count)]
    if log_file:
        cmd += ["--log-file", log_file]
    return cmd + list(target)


def check_output_for_errors(text: str) -> None:
    if "ERR_NVGPUCTRPERM" in text:
        raise ToolError("ncu: no permission to read GPU performance counters (ERR_NVGPUCTRPERM); "
                        "run as root or allow profiling (NVreg_RestrictProfilingToAdminUsers=0)")
    m = re.search(r"==ERROR==\s*(.+)", text)
    if m:
        raise ToolError(f"ncu: {m.group(1).strip()}")


def profile(target: list[str], *, timeout_s: float = 900, env: dict[str, str] | None = None,
            **kwargs: Any) -> list[KernelRecord]:
    """Run ``target`` (argv) under ncu and return the per-launch records."""
    ncu = find_ncu()
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "ncu.csv")
        cmd = build_command(target, log_file=log, ncu=ncu, **kwargs)
        child_env = dict(os.environ, **(env or {}))
        child_env[UNDER_NCU_ENV] = "1"
        # A session of its own, so that a timeout ends ncu and the profiled process together.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ToolError(f"ncu run timed out after {timeout_s:.0f} s") from None
        text = open(log).read() if os.path.exists(log) else ""
        check_output_for_errors(stdout + stderr + text)
        records = parse_csv_raw(text or stdout)
        if proc.returncode != 0:  # also with rows: the profiled program may have failed after some kernels
            tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
            got = f" after {len(records)} profiled kernel(s)" if records else ""
            raise ToolError(f"ncu run failed (exit {proc.returncode}){got}: {tail[0]}")
        return records


def profile_gpulab(args: list[str], **kwargs: Any) -> list[KernelRecord]:
    """Profile a gpulab command (``python -m gpulab ARGS``) in a child process; its results go to a temp folder."""
    with tempfile.TemporaryDirectory() as out:
        return profile([sys.executable, "-m", "gpulab", "--out", out, *args], **kwargs)


def under_ncu() -> bool:
    """True inside a process started by :func:`profile` (bench commands shrink their repetitions)."""
    return os.environ.get(UNDER_NCU_ENV) == "1"
