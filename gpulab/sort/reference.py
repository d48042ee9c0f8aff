"""The reference every implementation is compared with: numpy's sort semantics.

* ascending: ``np.sort(x)`` (NaN last);
* descending: ``np.sort(x)[::-1]`` (NaN first, as ``torch.sort(descending=True)``);
* key-value (argsort): the *stable* permutation, ties in input order, for both orders
  (``np.argsort(kind="stable")``; descending through the reversed array). The bitonic kernels
  compare (key, index) pairs, so their permutation is unique and must equal this exactly.

Comparisons are exact: integer keys bit for bit, float32 keys by value with NaN equal to NaN
(``-0.0 == 0.0`` as numpy compares them; NaN payloads are not preserved by the key transform).
"""
from __future__ import annotations

import numpy as np


def sort(x: np.ndarray, order: str = "asc") -> np.ndarray:
    s = np.sort(x, kind="stable")
    return s[::-1].copy() if order == "desc" else s


def argsort(x: np.ndarray, order: str = "asc") -> np.ndarray:
    """Stable argsort (int64); descending keeps ties in input order too."""
    n = x.shape[0]
    if order == "desc":
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        return (n - 1 - np.argsort(x[::-1], kind="stable")[::-1]).astype(np.int64, copy=False)
    return np.argsort(x, kind="stable").astype(np.int64, copy=False)  # no copy: the numpy baseline times this


def keys_equal(a, b) -> bool:
    """Exact equality of two sorted key arrays (NaN == NaN for floats)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def mismatch(a, b) -> str | None:
    """None when equal, else a short description of the first difference."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} != {b.dtype}"
    if keys_equal(a, b):
        return None
    if a.dtype.kind == "f":
        diff = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    else:
        diff = a != b
    i = int(np.flatnonzero(diff)[0])
    return f"{int(diff.sum())} of {a.size} differ; first at {i}: {a[i]!r} != {b[i]!r}"
