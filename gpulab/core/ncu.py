"""Nsight Compute wrapper: run a command under ``ncu`` and parse ``--csv --page raw`` into records.

Typical use from a bench command with ``--ncu``::

    records = ncu.profile_gpulab(["sort", "bench", "--n", "1000000", "--reps", "1"],
                                 kernel_regex="bitonic")

which runs ``python -m gpulab ...`` in a child process under ncu (the child sees
``GPULAB_UNDER_NCU=1`` and can shrink its repetitions) and returns one :class:`KernelRecord`
per profiled kernel launch. :func:`summarize_by_kernel` folds launches of one kernel together (counters summed,
percentages and rates averaged, launch configuration kept, the GPU's attributes left out; see its docstring).
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable

from gpulab.core.child import kill_group, killed_with_parent
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
    "nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9, "ns": 1.0, "us": 1e3, "ms": 1e6,
    "cycle": 1.0, "Kcycle": 1e3, "Mcycle": 1e6,
    "inst": 1.0, "Kinst": 1e3, "Minst": 1e6, "Ginst": 1e9,
    "warp": 1.0, "thread": 1.0, "block": 1.0, "register/thread": 1.0, "sector": 1.0, "request": 1.0,
    "byte/second": 1.0, "Kbyte/second": 1e3, "Mbyte/second": 1e6, "Gbyte/second": 1e9, "Tbyte/second": 1e12,
    "hz": 1.0, "Khz": 1e3, "Mhz": 1e6, "Ghz": 1e9,
}
# What a scaled unit becomes: values are stored in base units (bytes, nanoseconds, ...).
_BASE_UNIT = {"Kbyte": "byte", "Mbyte": "byte", "Gbyte": "byte", "Tbyte": "byte", "KB": "byte", "MB": "byte",
              "GB": "byte", "KiB": "byte", "MiB": "byte", "GiB": "byte", "usecond": "nsecond", "ns": "nsecond",
              "us": "nsecond", "ms": "nsecond",
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
        # another process's (or an appended run's) header and units rows are not launches
        if len(row) != len(header) or row == header or (units_row is not None and row == units_row) or not row[0]:
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


# Columns of the raw page that describe the machine, not the kernel: ncu lists every one of them for every launch,
# whatever --metrics names. summarize_by_kernel leaves them out (the device probe of the record has the GPU).
_MACHINE_PREFIXES = ("device__attribute_", "nvlink__", "numa__", "c2clink__")
# Columns that describe how a kernel was launched (or profiled): a setting per launch, not a quantity.
_CONFIG_PREFIXES = ("launch__", "profiler__")
_DURATION = "gpu__time_duration.sum"


def metric_kind(name: str, unit: str = "") -> str:
    """How :func:`summarize_by_kernel` folds the launches of one kernel for metric ``name`` (with ``unit``).

    * ``"machine"``: ``device__attribute_*``, ``nvlink__*``, ``numa__*``, ``c2clink__*`` (the GPU and its links);
    * ``"config"``: ``launch__*`` (grid, block, registers, shared memory, occupancy limits) and ``profiler__*``;
    * ``"sum"``: an additive counter: the ``.sum`` rollup (``gpu__time_duration.sum``, ``dram__bytes_read.sum``,
      ``lts__t_sectors.sum``, ``smsp__inst_executed.sum``, ...) unless its unit is a percentage or a rate;
    * ``"mean"``: everything else: percentages, ratios, rates and the ``.avg``/``.max``/``.min``/``.pct``/
      ``.ratio``/``.per_second``/``.pct_of_peak_*`` rollups (``sm__warps_active.avg.pct_of_peak_sustained_active``,
      ``lts__t_sector_hit_rate.pct``, ``sm__warps_active.sum.pct_of_peak_sustained_active``), and any name without
      a rollup suffix (a sum of those would grow with the number of launches).
    """
    if name.startswith(_MACHINE_PREFIXES):
        return "machine"
    if name.startswith(_CONFIG_PREFIXES):
        return "config"
    if name.endswith(".sum") and unit != "%" and not unit.endswith("/second"):
        return "sum"
    return "mean"


def summarize_by_kernel(records: Iterable[KernelRecord], short_names: bool = True,
                        machine: bool = False) -> list[dict[str, Any]]:
    """One row per kernel name (in the order of first launch): ``kernel``, ``launches``, then each metric, folded over
    the kernel's launches by :func:`metric_kind`:

    * additive counters (``.sum``: durations, bytes, sectors, instructions, cycles) are summed: the kernel's total
      over all its launches;
    * percentages, ratios, rates, ``.avg``/``.max``/``.min`` rollups and names without a rollup are averaged,
      weighted by each launch's ``gpu__time_duration.sum`` when every launch that has the value also has a
      positive duration (achieved occupancy, hit rates: the kernel's mean over its time), else the plain mean of
      the launches that have it;
    * launch configuration (``launch__*``: grid and block size, registers per thread, occupancy limits, waves;
      ``profiler__*``) is not summed: the value all launches share, or where launches differ (a kernel launched
      with several grid sizes) the first launch's (in the order given), so that a row's configuration is that
      of one real launch;
    * the machine's columns (``device__attribute_*``, ``nvlink__*``, ``numa__*``, ``c2clink__*``), which ncu's raw
      page lists for every launch whatever ``--metrics`` names, are left out: they describe the GPU, not the
      kernel, and the record's device probe already has it. ``machine=True`` keeps them (as configuration).

    A metric none of the launches has a number for (n/a, or text such as ``launch__func_cache_config``) is None.
    """
    groups: dict[str, list[KernelRecord]] = {}
    for r in records:  # by the full name: kernels whose short names agree (templates of one function) stay apart
        groups.setdefault(r.kernel, []).append(r)
    labels = _labels(list(groups), short_names)
    out = []
    for full, rs in groups.items():
        row: dict[str, Any] = {"kernel": labels[full], "launches": len(rs)}
        keys = {k for r in rs for k in r.metrics}
        for k in sorted(keys):
            unit = next((r.units[k] for r in rs if r.units.get(k)), "")
            kind = metric_kind(k, unit)
            if kind == "machine" and not machine:
                continue
            have = [r for r in rs if r.metrics.get(k) is not None]
            vals = [r.metrics[k] for r in have]
            if not vals:
                row[k] = None
            elif kind == "sum":
                row[k] = sum(vals)
            elif kind in ("config", "machine"):
                row[k] = vals[0]
            else:
                weights = [r.metrics.get(_DURATION) for r in have]
                if all(w is not None and w > 0 for w in weights):
                    row[k] = sum(v * w for v, w in zip(vals, weights)) / sum(weights)
                else:
                    row[k] = sum(vals) / len(vals)
        out.append(row)
    return out


def _labels(names: list[str], short: bool) -> dict[str, str]:
    """Row labels: the short name, with ``#2``, ``#3``... where several full names share it."""
    if not short:
        return {n: n for n in names}
    out, seen = {}, {}
    for n in names:
        s = short_kernel_name(n)
        seen[s] = seen.get(s, 0) + 1
        out[n] = s if seen[s] == 1 else f"{s} #{seen[s]}"
    return out


def short_kernel_name(name: str) -> str:
    """'void ns::foo<int, 4>(int*, ...)' -> 'ns::foo'; '(anonymous namespace)' and '<unnamed>' are part of a
    qualified name, not where its template arguments or parameters begin."""
    n = re.sub(r"^void\s+", "", name.strip())
    masked = n.replace("(anonymous namespace)", "\0" * len("(anonymous namespace)")).replace(
        "<unnamed>", "\0" * len("<unnamed>"))
    cut = next((i for i, ch in enumerate(masked) if ch in "<("), len(n))
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
        # A session of its own, so that a timeout ends ncu and the profiled process together; a signal that
        # ends this process (the device scripts' `timeout`) ends them too (killed_with_parent).
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
                                start_new_session=True)
        with killed_with_parent(proc):
            try:
                stdout, stderr = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                proc.communicate()
                raise ToolError(f"ncu run timed out after {timeout_s:.0f} s") from None
        text = open(log).read() if os.path.exists(log) else ""
        records = parse_csv_raw(text or stdout)
        got = f" after {len(records)} profiled kernel(s)" if records else ""
        own = [ln for ln in (stderr or "").splitlines() if ln.startswith("error: ")]
        if proc.returncode != 0 and own:  # the profiled command's own one-line error, not ncu's "returned 1"
            raise ToolError(f"the profiled command failed under ncu (exit {proc.returncode}){got}: {own[-1][7:]}")
        check_output_for_errors(stdout + stderr + text)
        if proc.returncode != 0:  # also with rows: the profiled program may have failed after some kernels
            tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
            raise ToolError(f"ncu run failed (exit {proc.returncode}){got}: {tail[0]}")
        if not records:
            why = re.search(r"==WARNING==\s*(No kernels were profiled[^\n]*)", stdout + stderr + text)
            raise ToolError("ncu profiled no kernels" + (f" ({why.group(1).strip()})" if why else "")
                            + ": the kernel filter matched none of the command's launches")
        return records


def profile_gpulab(args: list[str], **kwargs: Any) -> list[KernelRecord]:
    """Profile a gpulab command (``python -m gpulab ARGS``) in a child process; its results go to a temp folder."""
    with tempfile.TemporaryDirectory() as out:
        return profile([sys.executable, "-m", "gpulab", "--out", out, *args], **kwargs)


def under_ncu() -> bool:
    """True inside a process started by :func:`profile` (bench commands shrink their repetitions)."""
    return os.environ.get(UNDER_NCU_ENV) == "1"
