"""Join-aggregate: per join key, COUNT(*), SUM(left.payload) and SUM(right.payload) over an inner join.

Definition (SQL)::

    SELECT l.key, COUNT(*) AS count, SUM(l.payload) AS sum_left, SUM(r.payload) AS sum_right
    FROM left l JOIN right r ON l.key = r.key GROUP BY l.key

i.e. for every key k present on both sides, with cL(k), cR(k) its row counts and SL(k), SR(k) its payload
sums on each side: ``count = cL*cR``, ``sum_left = SL*cR`` (each left payload once per matching right row,
"SUM(left.payload * matches)"), ``sum_right = SR*cL``. Keys on one side only are absent from the output.
Values are int64 with two's-complement wrap-around (modulo 2^64): every implementation here is then exact
and equal bit for bit, and equal to the true integer whenever it lies within int64 (always when the join
has fewer than 2^32 output pairs, since payloads are int32). ``--aggregate count`` computes ``count`` only.

Implementations (all return an :class:`AggResult`; :func:`compare_agg` sorts by key and checks exact equality):
``pandas_aggregate`` (``how="merge"``: the literal merge + groupby, materializing every pair; ``how="pre"``:
groupby each side, then merge the groups), ``torch_aggregate`` (unique + index_add + searchsorted) and
``tensorcore_aggregate.TensorCoreAggregate`` (Triton, tl.dot).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpulab.dbjoin.reference import _to_numpy

AGGREGATES = ("count", "sum")


@dataclass
class AggResult:
    key: Any  # distinct join keys (numpy or torch), any order
    count: Any  # int64
    sum_left: Any = None  # int64, None for --aggregate count
    sum_right: Any = None

    def __len__(self) -> int:
        return int(len(self.key))

    def numpy_sorted(self) -> dict[str, np.ndarray | None]:
        """Columns as int64 numpy arrays, rows sorted by key."""
        cols = {n: _np(getattr(self, n)) for n in ("key", "count", "sum_left", "sum_right")}
        order = np.argsort(cols["key"], kind="stable")
        return {n: (None if v is None else v[order]) for n, v in cols.items()}


def _np(a: Any) -> np.ndarray | None:
    """int64 numpy of a numpy, torch or cupy column (cupy refuses np.asarray: it is read with .get())."""
    return None if a is None else _to_numpy(a)


def check_int32_payload(p: Any, side: str) -> None:
    """A one-line InputError unless every value of the payload column ``p`` (numpy, cupy or torch) fits the
    kernels' int32: integer payloads only, wider ones when their values fit (never a silent wrap)."""
    from gpulab.core.errors import InputError

    name = str(p.dtype).removeprefix("torch.")
    if not re.fullmatch(r"u?int\d+", name):
        raise InputError(f"{side} payloads must be integers, got {name}")
    if name != "int32" and len(p) and (int(p.min()) < -(2**31) or int(p.max()) >= 2**31):
        raise InputError(f"{side} payloads have values outside the int32 range")


def _check_mode(mode: str) -> None:
    from gpulab.core.errors import InputError

    if mode not in AGGREGATES:
        raise InputError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {mode!r}")


def pandas_aggregate(lk: np.ndarray, lp: np.ndarray, rk: np.ndarray, rp: np.ndarray, mode: str = "sum",
                     how: str = "merge") -> AggResult:
    """The pandas reference. ``how="merge"``: merge (every pair) then groupby; ``how="pre"``: groupby then merge."""
    import pandas as pd

    _check_mode(mode)
    lf = pd.DataFrame({"key": lk, "pl": np.asarray(lp, np.int64)})
    rf = pd.DataFrame({"key": rk, "pr": np.asarray(rp, np.int64)})
    if how == "merge":
        m = lf.merge(rf, on="key", how="inner", sort=False)
        g = m.groupby("key", sort=True)
        count = g.size().astype(np.int64)
        keys = count.index.to_numpy()
        if mode == "count":
            return AggResult(keys, count.to_numpy())
        return AggResult(keys, count.to_numpy(), g["pl"].sum().to_numpy(), g["pr"].sum().to_numpy())
    if how != "pre":
        raise ValueError(f"how must be 'merge' or 'pre', got {how!r}")
    gl = lf.groupby("key", sort=False)["pl"].agg(["size", "sum"]).set_axis(["size_l", "sum_l"], axis=1)
    gr = rf.groupby("key", sort=False)["pr"].agg(["size", "sum"]).set_axis(["size_r", "sum_r"], axis=1)
    j = gl.join(gr, how="inner")
    cl, cr = j["size_l"].to_numpy(np.int64), j["size_r"].to_numpy(np.int64)
    keys = j.index.to_numpy()
    if mode == "count":
        return AggResult(keys, cl * cr)
    with np.errstate(over="ignore"):
        return AggResult(keys, cl * cr, j["sum_l"].to_numpy(np.int64) * cr, j["sum_r"].to_numpy(np.int64) * cl)


def torch_aggregate(lk, lp, rk, rp, mode: str = "sum") -> AggResult:
    """torch.unique per side (counts, payload sums by index_add), then match the distinct keys by searchsorted."""
    import torch

    _check_mode(mode)
    dev = lk.device
    if lk.numel() == 0 or rk.numel() == 0:
        e = torch.empty(0, dtype=torch.int64, device=dev)
        return AggResult(e, e) if mode == "count" else AggResult(e, e, e, e)
    if lk.dtype != rk.dtype:
        lk, rk = lk.to(torch.int64), rk.to(torch.int64)
    ul, invl, cl = torch.unique(lk, return_inverse=True, return_counts=True)
    ur, invr, cr = torch.unique(rk, return_inverse=True, return_counts=True)
    pos = torch.searchsorted(ur, ul).clamp_(max=ur.numel() - 1)
    hit = ur[pos] == ul
    pr = pos[hit]
    cl_h, cr_h = cl[hit], cr[pr]
    count = cl_h * cr_h
    if mode == "count":
        return AggResult(ul[hit], count)
    sl = torch.zeros(ul.numel(), dtype=torch.int64, device=dev).index_add_(0, invl, lp.to(torch.int64))
    sr = torch.zeros(ur.numel(), dtype=torch.int64, device=dev).index_add_(0, invr, rp.to(torch.int64))
    return AggResult(ul[hit], count, sl[hit] * cr_h, sr[pr] * cl_h)


def compare_agg(result: AggResult, reference: AggResult, mode: str = "sum") -> tuple[bool, str]:
    """(passed, detail): the same keys, each with exactly the same count (and sums for ``sum``)."""
    a, b = result.numpy_sorted(), reference.numpy_sorted()
    if len(a["key"]) != len(b["key"]):
        return False, f"{len(a['key'])} groups != reference {len(b['key'])}"
    if len(np.unique(a["key"])) != len(a["key"]):
        return False, "a key appears in more than one output row"
    cols = ("key", "count") if mode == "count" else ("key", "count", "sum_left", "sum_right")
    for c in cols:
        if a[c] is None:
            return False, f"column {c} is missing"
        if not np.array_equal(a[c], b[c]):
            i = int(np.argmax(a[c] != b[c]))
            return False, f"{c} differs at key {b['key'][i]}: {a[c][i]} vs reference {b[c][i]}"
    return True, f"{len(a['key'])} groups equal ({', '.join(cols[1:])})"
