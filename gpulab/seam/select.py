"""Constrained selection over an evaluated family, the Pareto front and its plot.

For an accuracy constraint ``A`` (top-1 fraction), the selector returns the member with the
smallest cost (``flops``, ``params``, ``latency`` = batch-1 latency, ``latency64``) among all
members with ``top1 >= A``; the *baselines* are the anchors and any trained baseline (ResNet18 ...).
The selection is *lighter* when its cost is strictly below every baseline that meets ``A``.
Without explicit constraints, every distinct top-1 reached by a member is a constraint (a sweep).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gpulab.core.errors import InputError

METRICS = {"flops": "flops", "params": "params", "latency": "latency_b1_ms", "latency64": "latency_b64_ms"}
UNITS = {"flops": ("GFLOPs (flop_counter, 2 per MAC)", 1e9), "params": ("parameters (M)", 1e6),
         "latency": ("latency, batch 1 (ms)", 1.0), "latency64": ("latency, batch 64 (ms)", 1.0)}


def metric_key(metric: str, models: list[dict[str, Any]]) -> str:
    if metric not in METRICS:
        raise InputError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    key = METRICS[metric]
    missing = [m["name"] for m in models if not isinstance(m.get(key), (int, float)) or isinstance(m.get(key), bool)]
    if missing:
        how = ("seam eval with latency (not --no-latency), --latency-batches including "
               f"{1 if metric == 'latency' else 64}") if metric.startswith("latency") else "seam eval again"
        raise InputError(f"--metric {metric}: model {missing[0]} has no '{key}' ({how})")
    if metric.startswith("latency"):  # a graph replay (GPU time) and an eager call (host included) do not compare
        mode_key = key.replace("_ms", "_mode")
        modes: dict[str, str] = {}  # mode -> the first model timed that way
        for m in models:
            if m.get(mode_key) is not None:
                modes.setdefault(m[mode_key], m["name"])
        if len(modes) > 1:
            (a, name_a), (b, name_b) = sorted(modes.items())[:2]
            err_key = mode_key.replace("_mode", "_graph_error")
            raise InputError(f"--metric {metric}: the latencies were timed differently ({a} for {name_a}, {b} for "
                             f"{name_b}; see {err_key} in eval.yaml): compare by flops or params")
    return key


def _order(key: str):
    """Cheapest first; ties: higher top-1, then by name. The selection and the Pareto front share it, so the
    model chosen among equals is the one the front keeps."""
    return lambda m: (m[key], -m["top1"], m["name"])


def lightest(models: list[dict[str, Any]], accuracy: float, key: str) -> dict[str, Any] | None:
    ok = [m for m in models if m["top1"] >= accuracy - 1e-12]
    return min(ok, key=_order(key)) if ok else None


def pareto_front(models: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Members not dominated in (lower cost, higher top-1), in ascending cost."""
    front, best = [], -1.0
    for m in sorted(models, key=_order(key)):
        if m["top1"] > best:
            front.append(m)
            best = m["top1"]
    return front


def parse_accuracies(text: str) -> list[float]:
    """'93.5,94' (percent) -> [0.935, 0.94], each level once, in the order given; empty -> []."""
    out = []
    for part in [t.strip() for t in text.split(",") if t.strip()]:
        try:
            v = float(part)
        except ValueError:
            raise InputError(f"--accuracy: {part!r} is not a number (percent, e.g. 93.5)") from None
        if not 0 < v <= 100:
            raise InputError(f"--accuracy must be a percentage in (0, 100], got {part}")
        if v < 1:  # the tables print top-1 as a fraction: 0.935 there is 93.5 here
            raise InputError(f"--accuracy is in percent: {part} would be {v}% (for {100 * v:g}% give {100 * v:g})")
        if v / 100.0 not in out:  # a repeated level would count twice in lighter_fraction
            out.append(v / 100.0)
    return out


def select(models: list[dict[str, Any]], accuracies: list[float], metric: str) -> tuple[list[dict[str, Any]], str]:
    """One row per constraint: chosen member, lightest baseline meeting it, whether the choice is lighter."""
    key = metric_key(metric, models)
    baselines = [m for m in models if m["kind"] in ("anchor", "baseline")]
    levels = accuracies or sorted({m["top1"] for m in models})
    rows = []
    for a in levels:
        chosen = lightest(models, a, key)
        base = lightest(baselines, a, key)
        row: dict[str, Any] = {"accuracy": a, "chosen": chosen["name"] if chosen else None,
                               "kind": chosen["kind"] if chosen else None,
                               "chosen_top1": chosen["top1"] if chosen else None,
                               f"chosen_{metric}": chosen[key] if chosen else None,
                               "baseline": base["name"] if base else None,
                               f"baseline_{metric}": base[key] if base else None}
        if chosen and base:
            row["lighter"] = bool(chosen[key] < base[key])
            row["saving"] = 1.0 - chosen[key] / base[key] if base[key] else None
        else:
            row["lighter"] = None
            row["saving"] = None
            row["feasible"] = chosen is not None
        rows.append(row)
    return rows, key


def plot_png(models: list[dict[str, Any]], key: str, metric: str, rows: list[dict[str, Any]], title: str) -> bytes:
    """Pareto plot as PNG bytes (matplotlib Agg, no display): members, anchors, baselines, front, selections."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    label, scale = UNITS[metric]
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue", "tab:orange", "tab:purple", "tab:brown"]
    dirs = sorted({m.get("direction") for m in models if m["kind"] == "stitch"})
    for i, d in enumerate(dirs):
        pts = [m for m in models if m["kind"] == "stitch" and m.get("direction") == d]
        ax.scatter([m[key] / scale for m in pts], [100 * m["top1"] for m in pts], s=14, alpha=0.7,
                   color=colors[i % len(colors)], label=f"stitch {d} ({len(pts)})")
    for kind, marker, color in (("anchor", "*", "tab:red"), ("baseline", "s", "tab:green")):
        pts = [m for m in models if m["kind"] == kind]
        if pts:
            ax.scatter([m[key] / scale for m in pts], [100 * m["top1"] for m in pts], s=140 if marker == "*" else 60,
                       marker=marker, color=color, edgecolor="black", zorder=5, label=kind + "s")
            for m in pts:
                ax.annotate(m["name"], (m[key] / scale, 100 * m["top1"]), textcoords="offset points",
                            xytext=(5, -10), fontsize=8)
    front = pareto_front(models, key)
    ax.plot([m[key] / scale for m in front], [100 * m["top1"] for m in front], "k--", lw=1, label="Pareto front")
    chosen = {r["chosen"] for r in rows if r["chosen"]}
    pts = [m for m in models if m["name"] in chosen]
    ax.scatter([m[key] / scale for m in pts], [100 * m["top1"] for m in pts], s=110, facecolors="none",
               edgecolors="black", lw=1.5, zorder=6, label="selected")
    if len(rows) <= 5:
        for r in rows:
            ax.axhline(100 * r["accuracy"], color="gray", lw=0.8, ls=":")
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
