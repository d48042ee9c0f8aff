"""L2 policy planning: pure functions, no CUDA (tested on the CPU).

* :func:`parse_policies` validates ``--policy`` (``default``, ``persist``, ``prefetch``,
  ``persist+prefetch``, ``auto``; ``all`` expands to every one).
* :func:`plan_persist` chooses the L2 set-aside and the access-policy window over the hottest
  weights of a packed weight arena (laid out hottest first): by default the window is the hottest
  prefix of the set-aside's size, all of it persisting (``hitRatio = 1``); a larger window (``--window-mib``,
  e.g. the whole arena) gets ``hitRatio = set_aside / window``, so that a random share of its lines
  persists without thrashing the set-aside. The window is capped by ``accessPolicyMaxWindowSize``,
  the set-aside by ``persistingL2CacheMaxSize``.
* :func:`prefetch_schedule` says, for each layer i, which byte ranges of the next layers a side
  stream prefetches into L2 while layer i computes (lookahead, capped by an L2 budget).
* :func:`choose_auto` picks the fastest measured policy only when it beats ``default`` by more
  than the measured noise; otherwise it keeps ``default``.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from gpulab.core.errors import InputError

BASE_POLICIES = ("default", "persist", "prefetch", "persist+prefetch")
ALL_POLICIES = BASE_POLICIES + ("auto",)
_ALIASES = {"prefetch+persist": "persist+prefetch", "none": "default"}


def parse_policies(text: str) -> list[str]:
    """``"default,persist,auto"`` -> validated, de-duplicated list (``all`` = every policy)."""
    if text is None or not str(text).strip():
        raise InputError("--policy is empty; name one or more of " + ", ".join(ALL_POLICIES) + " (or 'all')")
    out: list[str] = []
    for raw in str(text).split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            out.extend(ALL_POLICIES)
            continue
        name = _ALIASES.get(name, name)
        if name not in ALL_POLICIES:
            raise InputError(f"unknown policy '{raw.strip()}' (known: {', '.join(ALL_POLICIES)}, all)")
        out.append(name)
    if not out:
        raise InputError("--policy names no policy; use one or more of " + ", ".join(ALL_POLICIES))
    return list(dict.fromkeys(out))


def uses_persist(policy: str) -> bool:
    return "persist" in policy.split("+")


def uses_prefetch(policy: str) -> bool:
    return "prefetch" in policy.split("+")


@dataclass(frozen=True)
class Region:
    """A byte range of a weight arena: one layer's parameters (offset relative to the arena)."""

    name: str
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class PersistPlan:
    set_aside_bytes: int  # cudaLimitPersistingL2CacheSize
    window_offset: int  # window start, relative to the arena base
    window_bytes: int  # accessPolicyWindow.num_bytes
    hit_ratio: float  # accessPolicyWindow.hitRatio
    covered_bytes: int  # arena bytes inside the window
    total_bytes: int  # arena bytes

    @property
    def coverage(self) -> float:
        return self.covered_bytes / self.total_bytes if self.total_bytes else 0.0

    def as_dict(self) -> dict:
        return {"set_aside_bytes": self.set_aside_bytes, "window_offset": self.window_offset,
                "window_bytes": self.window_bytes, "hit_ratio": round(self.hit_ratio, 6),
                "covered_bytes": self.covered_bytes, "total_bytes": self.total_bytes,
                "coverage": round(self.coverage, 6)}


def hit_ratio(set_aside_bytes: int, window_bytes: int) -> float:
    """``min(1, set_aside / window)``; 0 for an empty window."""
    if window_bytes <= 0:
        return 0.0
    if set_aside_bytes < 0:
        raise InputError(f"set-aside must be >= 0 bytes, got {set_aside_bytes}")
    return min(1.0, set_aside_bytes / window_bytes)


def plan_persist(
    total_bytes: int,
    *,
    persisting_max_bytes: int,
    max_window_bytes: int,
    set_aside_bytes: int | None = None,
    window_bytes: int | None = None,
    granularity: int = 1 << 20,
) -> PersistPlan:
    """Plan the persisting set-aside and window over ``[0, total_bytes)`` of an arena laid out hottest first.

    ``set_aside_bytes`` defaults to the device maximum, rounded down to ``granularity`` (the driver
    sets it aside in such units; asking for more than the maximum is an error). The window covers
    the hottest prefix of ``window_bytes`` (default: the set-aside, so the hottest weights that fit
    persist, hitRatio 1), at most the arena and the device's maximum window.
    """
    if total_bytes <= 0:
        raise InputError(f"nothing to persist: the weight arena is {total_bytes} bytes")
    if persisting_max_bytes <= 0:
        raise InputError("this GPU has no persisting L2 (persistingL2CacheMaxSize is 0); policy 'persist' needs one")
    if max_window_bytes <= 0:
        raise InputError("this GPU reports accessPolicyMaxWindowSize 0; policy 'persist' needs an access-policy window")
    if set_aside_bytes is None:
        set_aside = (persisting_max_bytes // granularity) * granularity or persisting_max_bytes
    else:
        if set_aside_bytes <= 0:
            raise InputError(f"--set-aside-mib must be > 0, got {set_aside_bytes} bytes")
        if set_aside_bytes > persisting_max_bytes:
            raise InputError(f"--set-aside-mib {set_aside_bytes / 2**20:g} exceeds this GPU's persisting L2 "
                             f"maximum of {persisting_max_bytes / 2**20:g} MiB")
        set_aside = int(set_aside_bytes)
    if window_bytes is not None and window_bytes <= 0:
        raise InputError(f"--window-mib must be > 0, got {window_bytes} bytes")
    win = min(total_bytes, max_window_bytes, set_aside if window_bytes is None else int(window_bytes))
    return PersistPlan(set_aside_bytes=set_aside, window_offset=0, window_bytes=win,
                       hit_ratio=hit_ratio(set_aside, win), covered_bytes=win, total_bytes=total_bytes)


def hotness_order(use_counts: dict[str, int], position: dict[str, int]) -> list[str]:
    """Arena order for parameters: most used first; among equally used ones, in ``position`` order
    (the layer order), so that one layer's parameters stay contiguous (one prefetch range)."""
    missing = set(use_counts) ^ set(position)
    if missing:
        raise InputError(f"hotness_order: counts and positions name different parameters ({sorted(missing)[0]!r})")
    return sorted(use_counts, key=lambda k: (-use_counts[k], position[k], k))


@dataclass(frozen=True)
class PrefetchOp:
    at_layer: int  # issued when this layer starts on the compute stream
    target_layer: int  # whose weights are prefetched
    offset: int  # relative to the start of the target layer's range
    nbytes: int


def prefetch_schedule(
    layer_bytes: Sequence[int],
    *,
    l2_budget_bytes: int,
    lookahead: int = 1,
    resident_bytes: Sequence[int] | None = None,
) -> list[PrefetchOp]:
    """Which ranges to prefetch while each layer runs.

    While layer i computes, prefetch layers i+1 .. i+lookahead. The bytes in flight (the current
    layer's weights plus everything prefetched for later layers and not yet consumed) stay within
    ``l2_budget_bytes`` so that prefetching does not evict the weights being used; a layer larger
    than what is left is prefetched in part (its first bytes). Layer 0 is never prefetched (nothing
    runs before it to hide the transfer). No byte is prefetched twice; with ``lookahead > 1`` a layer
    may be prefetched in pieces, while different earlier layers run.

    ``resident_bytes``: per layer, how many of its first bytes a persisting window already holds in L2
    (:func:`resident_prefix`): those are neither prefetched nor counted in flight (they sit in the
    set-aside, outside the budget of normal lines).
    """
    if lookahead < 1:
        raise InputError(f"--lookahead must be >= 1, got {lookahead}")
    if l2_budget_bytes <= 0:
        raise InputError(f"prefetch L2 budget must be > 0 bytes, got {l2_budget_bytes}")
    sizes = [int(b) for b in layer_bytes]
    if any(b < 0 for b in sizes):
        raise InputError("layer sizes must be >= 0 bytes")
    n = len(sizes)
    if resident_bytes is not None and len(resident_bytes) != n:
        raise InputError(f"resident_bytes has {len(resident_bytes)} entries for {n} layers")
    resident = [0] * n if resident_bytes is None else [min(max(int(r), 0), b) for r, b in zip(resident_bytes, sizes)]
    ops: list[PrefetchOp] = []
    done = list(resident)  # bytes of each layer in L2 before it runs: resident, then scheduled for prefetch
    for i in range(n - 1):
        # In normal L2 lines while layer i runs: layer i itself, plus prefetched bytes of layers after i.
        in_flight = sizes[i] - resident[i] + sum(done[j] - resident[j] for j in range(i + 1, n))
        for j in range(i + 1, min(n, i + 1 + lookahead)):
            want = sizes[j] - done[j]
            room = l2_budget_bytes - in_flight
            if want <= 0:
                continue
            if room <= 0:
                break
            take = min(want, room)
            ops.append(PrefetchOp(at_layer=i, target_layer=j, offset=done[j], nbytes=take))
            done[j] += take
            in_flight += take
    return ops


def resident_prefix(region: Region, window_offset: int, window_bytes: int, align: int = 256) -> int:
    """How many of ``region``'s first bytes lie in the persisting window [window_offset, window_offset +
    window_bytes) of the same arena, rounded down to ``align`` bytes (so that what is left to prefetch starts
    aligned); 0 unless the window begins at or before the region (only a prefix is ever skipped)."""
    if window_bytes <= 0 or window_offset > region.offset:
        return 0
    covered = min(window_offset + window_bytes - region.offset, region.nbytes)
    if covered >= region.nbytes:
        return region.nbytes
    return max(covered, 0) // align * align


def prefetch_budget_bytes(fraction: float, l2_bytes: int, align: int = 256, set_aside_bytes: int = 0) -> int:
    """``fraction`` of the L2 as a prefetch budget, rounded down to ``align`` bytes (at least ``align``):
    then every piece that :func:`prefetch_schedule` cuts from 256-byte aligned layer ranges starts and ends
    256-byte aligned (the read prefetch views it as int32 words, the bulk prefetch needs 16 bytes). With a
    persisting set-aside (persist+prefetch) the fraction is of the L2 left to normal lines: prefetching more than
    that evicts the layer that is running."""
    return max(align, int(fraction * max(l2_bytes - set_aside_bytes, 0)) // align * align)


def group_by_layer(ops: Iterable[PrefetchOp], n_layers: int) -> list[list[PrefetchOp]]:
    out: list[list[PrefetchOp]] = [[] for _ in range(n_layers)]
    for op in ops:
        out[op.at_layer].append(op)
    return out


def ncu_policies(policies: Sequence[str], auto_choice: str | None) -> list[str]:
    """What ``--ncu`` profiles: ``default`` (the reference the others are read against), every policy asked for
    by name, and the one ``auto`` chose (``auto`` itself is no policy a child run can install)."""
    named = [p for p in policies if p != "auto"]
    return list(dict.fromkeys(["default", *named, *([auto_choice] if auto_choice else [])]))


@dataclass(frozen=True)
class AutoChoice:
    policy: str
    noise: float  # relative noise of default's round medians
    gain: float  # relative latency gain of the chosen policy over default (0 for default)
    reason: str

    def as_dict(self) -> dict:
        return {"policy": self.policy, "noise": round(self.noise, 6), "gain": round(self.gain, 6),
                "reason": self.reason}


def relative_noise(round_medians: Sequence[float], floor: float = 0.01) -> float:
    """Spread of repeated measurements of one policy: (max - min) / median, at least ``floor``."""
    vals = [float(v) for v in round_medians]
    if not vals:
        raise InputError("no measurements to estimate noise from")
    med = statistics.median(vals)
    if med <= 0:
        return floor
    return max(floor, (max(vals) - min(vals)) / med)


def choose_auto(round_medians: dict[str, Sequence[float]], floor: float = 0.01) -> AutoChoice:
    """Pick the policy for ``auto`` from per-round median latencies (ms) of each candidate.

    A candidate qualifies when it beats ``default`` by more than the noise (the spread of default's rounds,
    and of the candidate's own rounds); the qualifying candidate with the lowest median of round medians
    wins, and without one ``default`` is kept. So auto is never chosen slower than default beyond measured
    noise, and a noisy fastest candidate does not hide a steady one that also wins.
    """
    if "default" not in round_medians or not round_medians["default"]:
        raise InputError("auto needs measurements of 'default'")
    med = {p: statistics.median(v) for p, v in round_medians.items() if len(v)}
    base = med["default"]
    noise = relative_noise(round_medians["default"], floor)
    faster = sorted((p for p in med if p != "default" and med[p] < base), key=lambda p: (med[p], p))
    if not faster:
        return AutoChoice("default", noise, 0.0, "no policy was faster than default")
    scored = [(p, (base - med[p]) / base if base > 0 else 0.0, max(noise, relative_noise(round_medians[p], floor)))
              for p in faster]  # (policy, gain over default, noise threshold)
    for p, gain, threshold in scored:
        if gain > threshold + 1e-9:  # a gain that only rounding puts above the threshold does not count
            return AutoChoice(p, noise, gain, f"{p} is {gain:.1%} faster than default (noise {threshold:.1%})")
    best, gain, threshold = scored[0]
    return AutoChoice("default", noise, 0.0, f"no candidate beats default beyond the noise (the fastest, {best}, "
                                             f"gains {gain:.1%} within noise {threshold:.1%}): kept default")
