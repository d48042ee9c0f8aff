"""Small join inputs covering the corner cases; every implementation is checked on all of them."""
from __future__ import annotations

import numpy as np

from gpulab.dbjoin import tables


def make_cases(dtype: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)

    def arr(values) -> np.ndarray:
        return np.asarray(values, dtype=dtype)

    def shuffled(a: np.ndarray) -> np.ndarray:
        return a[rng.permutation(len(a))]

    cases: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    cases["dup-both-negative"] = (rng.integers(-20, 20, 300).astype(dtype), rng.integers(-20, 20, 200).astype(dtype))
    l, r = tables.generate(300, 200, 0.5, "zipf:1.1", 3, dtype)
    cases["zipf"] = (l.key, r.key)
    l, r = tables.generate(400, 300, 0.5, "unique", 4, dtype)
    cases["unique-half"] = (l.key, r.key)
    cases["build-larger"] = (r.key[:150], l.key)  # the right table is the larger: the hash join swaps sides
    # the empty-slot marker (the dtype's minimum) as a key, several times on both sides, next to neighbours
    special = [lo, lo, lo + 1, -1, 0, 1, hi, hi - 1]
    cases["sentinel"] = (shuffled(arr(special * 3 + list(rng.integers(-50, 50, 60)))),
                         shuffled(arr(special * 2 + [lo] + list(rng.integers(-50, 50, 40)))))
    cases["sentinel-left-only"] = (arr([lo, lo, 5, 6]), arr([5, 7, lo + 1, hi]))
    cases["sentinel-right-only"] = (arr([5, 7, lo + 1, hi]), arr([lo, lo, 5, 6]))
    cases["sentinel-only"] = (arr([lo] * 5), arr([lo] * 3))
    cases["no-match"] = (arr(np.arange(0, 200, 2)), arr(np.arange(1, 200, 2)))
    cases["all-match"] = (arr([7] * 40), arr([7] * 30))
    cases["left-empty"] = (arr([]), arr([1, 2, 3]))
    cases["right-empty"] = (arr([1, 2, 3]), arr([]))
    cases["both-empty"] = (arr([]), arr([]))
    cases["single"] = (arr([lo]), arr([lo]))
    if dtype == "int64":  # equal low 32 bits, different high bits (and the reverse): hashing must use all 64
        base = rng.integers(-1000, 1000, 50)
        hi_l = rng.integers(-3, 3, 50)
        hi_r = rng.integers(-3, 3, 50)
        cases["int64-high-bits"] = (arr(base + (hi_l << 32)), arr(base + (hi_r << 32)))
        cases["int64-low-bits"] = (arr((base << 32) + hi_l), arr((base << 32) + hi_r))
    return cases


CASES = {dt: make_cases(dt) for dt in ("int32", "int64")}
CASE_IDS = [(dt, name) for dt in ("int32", "int64") for name in CASES[dt]]
