"""The CPU reference of the join (pandas.merge) and the comparison of join outputs.

A join output is the set of matching (left row, right row) index pairs of an inner equi-join,
many-to-many. Every implementation returns a :class:`JoinResult`; two outputs are equal when they
hold the same multiset of pairs, in any order (:func:`compare`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class JoinResult:
    count: int
    left: Any = None  # row indices into the left table (numpy or torch, int32/int64), None when count-only
    right: Any = None

    def numpy_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        return _to_numpy(self.left), _to_numpy(self.right)


def _to_numpy(a: Any) -> np.ndarray:
    if a is None:
        return np.empty(0, np.int64)
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    elif hasattr(a, "get"):  # cupy
        a = a.get()
    return np.asarray(a).astype(np.int64, copy=False)


def pandas_join(left_key: np.ndarray, right_key: np.ndarray, count_only: bool = False) -> JoinResult:
    """pandas.merge(inner) on the key columns, returning row indices."""
    import pandas as pd

    lf = pd.DataFrame({"key": left_key, "l": np.arange(len(left_key), dtype=np.int64)})
    rf = pd.DataFrame({"key": right_key, "r": np.arange(len(right_key), dtype=np.int64)})
    m = lf.merge(rf, on="key", how="inner", sort=False)
    li, ri = m["l"].to_numpy(), m["r"].to_numpy()
    if count_only:
        return JoinResult(count=len(li))
    return JoinResult(count=len(li), left=li, right=ri)


def output_size(left_key: np.ndarray, right_key: np.ndarray) -> int:
    """Number of output pairs (sum over keys of left count x right count), without materializing them."""
    if len(left_key) == 0 or len(right_key) == 0:
        return 0
    uk, rc = np.unique(right_key, return_counts=True)
    pos = np.searchsorted(uk, left_key)
    pos = np.minimum(pos, len(uk) - 1)
    hit = uk[pos] == left_key
    return int(rc[pos[hit]].sum())


def canonical(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The pairs as an (n, 2) int64 array sorted by (left, right)."""
    pairs = np.stack([np.asarray(left, np.int64), np.asarray(right, np.int64)], axis=1) if len(left) else \
        np.empty((0, 2), np.int64)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return pairs[order]


def compare(result: JoinResult, reference: JoinResult, left_key: np.ndarray | None = None,
            right_key: np.ndarray | None = None) -> tuple[bool, str]:
    """(passed, detail): same count and, when both carry pairs, the same multiset of pairs."""
    if result.count != reference.count:
        return False, f"count {result.count} != reference {reference.count}"
    if reference.left is None:
        return True, f"count {result.count} matches"
    if result.left is None or result.right is None:  # pairs were asked for: a count alone does not pass
        return False, f"only a count ({result.count}) was returned, not the pairs"
    if len(result.left) != result.count or len(result.right) != result.count:
        return False, f"{len(result.left)} left and {len(result.right)} right rows returned, but count says {result.count}"
    a = canonical(*result.numpy_pairs())
    b = canonical(*reference.numpy_pairs())
    if len(a) != result.count:
        return False, f"{len(a)} pairs returned but count says {result.count}"
    if a.shape != b.shape or not np.array_equal(a, b):
        bad = int(np.argmax(np.any(a != b, axis=1))) if a.shape == b.shape else -1
        where = f" (first difference at sorted pair {bad}: {a[bad].tolist()} vs {b[bad].tolist()})" if bad >= 0 else ""
        return False, f"pairs differ from the reference{where}"
    if left_key is not None and right_key is not None and len(a):
        if not np.array_equal(left_key[a[:, 0]], right_key[a[:, 1]]):
            return False, "a returned pair joins rows with different keys"
    return True, f"{result.count} pairs match"
