"""The launch schedule of each bitonic variant, and an exact numpy model of it.

All variants run the same comparator network on ``N = next_pow2(n)`` virtual keys: the
bitonic sort whose merge stages start with a *flip* step (partner ``i ^ (2^m - 1)``) followed
by half-cleaners (partner ``i ^ 2^b``), so that every comparator puts the smaller key at the
lower index. Keys at positions >= n are virtual padding with the maximal key; with all
comparators ascending they never move, so the kernels skip them instead of allocating them.

A *step* fuses ``fp`` consecutive strides (bits ``p_hi .. p_lo``) of one stage: every thread
loads the ``2^fp`` keys of one group (their indices differ only in those bits; in a flip step
the upper half's lower bits are complemented), runs the ``fp`` strides in registers and stores
them back. Launch kinds:

* ``global``: one step over global memory (``bitonic_pass_*`` kernels);
* ``tile_sort``: a block sorts a tile of ``2^tile_log`` keys, stages 1..m_end, in shared memory;
* ``tile_merge``: a block runs the strides ``< 2^tile_log`` of stage m in shared memory.

``bitonic.cu`` implements exactly these steps (``group_index``, ``network``, ``tile_chunk``); the
cupy driver (``cuda_sort.py``) walks the list that :func:`schedule` returns, and :func:`run_model`
executes the same list in numpy so that the schedule and index arithmetic are checked here.

Chunked (pipelined) execution: with aligned chunks of ``2^chunk_log`` keys, stages 1..chunk_log
never pair keys of different chunks, nor do the strides < 2^chunk_log of any stage. So each chunk
can be sorted (the *head*) as soon as it is on the GPU, the remaining stages run over the whole
array (the *middle*), and the last stage's strides below the chunk size (the *tail*) run per chunk
again, right before that chunk is copied back. :func:`split_schedule` returns the three phases
and :func:`run_chunked_model` executes them in numpy on the chunks' slices. In key-value mode
padding carries the value ``PAD_BIT | position`` (above every index, as n < 2^31), so that it
also sorts after the real maximal keys of a chunk whose values (global indices) start at an offset.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from gpulab.core.errors import InputError


@dataclass(frozen=True)
class Variant:
    name: str
    tile_log: int | None  # log2 keys per shared-memory tile (None: global memory only)
    tile_fuse: int        # strides fused per shared-memory step (2^tile_fuse keys per thread)
    global_fuse: int      # strides fused per global pass (2^global_fuse keys per thread)
    block: int = 256      # threads per block of the global passes
    const_steps: bool = False  # the tile kernels with compile-time steps (bitonic.cu's "_c" kernels)
    tile_threads_max: int = 1024  # at most this many threads a tile block (bitonic.cu's "_w<W>" kernels below 1024)

    def tile_threads(self, kv: bool, key_bytes: int = 4) -> int:
        """Threads of a tile block: one per 2^tile_fuse keys, at most 1024, or 512 where a slot holds 128 bytes
        of keys and values or more (bitonic.cu's TileShape: beyond that a thread runs several slots of
        2^tile_fuse keys in turn, so that e.g. 16 keys and 16 values fit 128 registers without spills)."""
        cap = 512 if ((key_bytes + (4 if kv else 0)) << self.tile_fuse) >= 128 else 1024
        return min((1 << self.tile_log) >> self.tile_fuse, cap, self.tile_threads_max) if self.tile_log else 0

    @property
    def config(self) -> str:
        """The variant's parameters as written after ``@`` in a name: t<tile_log>f<tile_fuse>g<global_fuse>, a
        ``c`` for constant tile steps, and w<W> for at most W threads a tile block (below 1024)."""
        return (f"t{self.tile_log or 0}f{self.tile_fuse}g{self.global_fuse}" + ("c" if self.const_steps else "")
                + (f"w{self.tile_threads_max}" if self.tile_threads_max < 1024 else ""))


VARIANTS = {
    "bitonic-global": Variant("bitonic-global", None, 1, 1),
    "bitonic-shared": Variant("bitonic-shared", 11, 1, 1),
    # 2^14-key tiles, 16 keys a thread in a shared-memory step, 5 strides per global pass: the fastest
    # configuration measured (H200, 2026-11-27: 1.376 ms at 10M int32 against 1.726 for the 8192-key t13f3g4, the
    # default until 2026-11-29); smaller GPUs fall back to the largest tile that fits (fit_variant)
    "bitonic-fused": Variant("bitonic-fused", 14, 4, 5),
}
# Instantiated in bitonic.cu (tile_log, tile_fuse): the fused variant falls back to a smaller
# tile where the device's opt-in shared memory is too small for its own.
TILE_CONFIGS = ((11, 1), (12, 3), (13, 3), (13, 4), (14, 4), (15, 4))
# ... of which these only for 32-bit keys without values (2^15 keys: 132 KB of shared memory; with values or
# 64-bit keys 264 KB, more than any GPU's 227 KB)
TILE_CONFIGS_K32_ONLY = ((15, 4),)


# ... and with constant steps in the tile sort too, for 32-bit keys without values: each shared-memory step of a
# sort's first launch a function of its own with its stride bits as compile-time constants (176 SASS instructions
# a t14f4 step against 216 where the stride alone is a runtime value; every kernel's merges run constant steps),
# the configurations ``c`` that `sort bench --tune` times next to the same tiles
CONST_STEP_TILES = ((13, 3), (13, 4), (14, 4), (15, 4))
# ... and with fewer threads a block (runtime strides, 32-bit keys without values): (tile_log, tile_fuse) -> the
# thread caps instantiated. t14f4 at 512 threads: two blocks an SM (60 registers on sm_90) where the 1024-thread block is
# alone on its SM, so one block's loads can overlap the other's shared-memory steps (`w512` in a configuration)
TILE_THREAD_CAPS = {(14, 4): (512,)}


def tile_instantiated(tile_log: int, tile_fuse: int, key_bytes: int, kv: bool, const_steps: bool = False,
                      threads_max: int = 1024) -> bool:
    """Whether bitonic.cu has the tile kernel (tile_log, tile_fuse) for these keys (and values), with constant
    steps or a thread cap below 1024 if asked."""
    if threads_max < 1024:
        return (not const_steps and threads_max in TILE_THREAD_CAPS.get((tile_log, tile_fuse), ())
                and key_bytes == 4 and not kv)
    if const_steps:
        return (tile_log, tile_fuse) in CONST_STEP_TILES and key_bytes == 4 and not kv
    if (tile_log, tile_fuse) not in TILE_CONFIGS:
        return False
    return (tile_log, tile_fuse) not in TILE_CONFIGS_K32_ONLY or (key_bytes == 4 and not kv)


GLOBAL_FUSES = (1, 2, 3, 4, 5)
# The configurations of bitonic-fused that ``sort bench --tune`` times next to the default (the one equal to it
# is bitonic-fused's own row): 8192- to 32768-key tiles, 4 or 5 strides per global pass (26 passes over memory
# at 10M keys for t14f4g5, 33 for t13f3g4), runtime or constant tile steps; which is fastest on a card is a
# measurement, not a model.
TUNE_CONFIGS = ("t13f3g4", "t13f3g5", "t13f4g4", "t13f4g5", "t14f4g4", "t14f4g5", "t15f4g4", "t15f4g5",
                "t13f3g4c", "t13f4g5c", "t14f4g5c", "t15f4g5c", "t14f4g5w512")
PAD_BIT = 1 << 31  # set in the value of a padding key (PAD_BIT in bitonic.cu)


@dataclass(frozen=True)
class Launch:
    kind: str        # global | tile_sort | tile_merge
    stage: int       # m: the stage merges sorted runs of 2^(m-1) into 2^m (tile_sort: last stage)
    p_hi: int = 0    # global: highest bit (stride 2^p_hi) of the fused strides
    fp: int = 0      # global: number of fused strides
    flip: bool = False


def next_pow2_log(n: int) -> int:
    """log2 of the smallest power of two >= n (0 for n <= 1)."""
    return (int(n) - 1).bit_length() if n > 1 else 0  # (-1).bit_length() is 1: n = 0 needs its own case


def chunks(p_hi: int, p_stop: int, fuse: int, flip_first: bool) -> list[tuple[int, int, bool]]:
    """Split the strides 2^p_hi .. 2^p_stop into fused steps (p_hi, fp, flip), greedily from the top."""
    out = []
    first = True
    while p_hi >= p_stop:
        fp = min(fuse, p_hi - p_stop + 1)
        out.append((p_hi, fp, flip_first and first))
        p_hi -= fp
        first = False
    return out


def stage_launches(m: int, v: Variant, top: int, stop: int) -> list[Launch]:
    """The launches that run the strides 2^top .. 2^stop of merge stage m (m > tile_log).

    Global passes cover the strides >= the tile; a tile merge all those below it (so ``stop`` is
    0 or >= tile_log). The flip opens the stage: it belongs to the step of stride 2^(m-1).
    """
    T = v.tile_log or 0
    out = [Launch("global", m, p, f, fl) for p, f, fl in chunks(top, max(stop, T), v.global_fuse, top == m - 1)]
    if v.tile_log is not None and stop < T:
        out.append(Launch("tile_merge", m))
    return out


def schedule(n: int, variant: Variant | str) -> list[Launch]:
    """Every kernel launch (besides the key transforms) of ``variant`` for n keys, in order."""
    v = get_variant(variant) if isinstance(variant, str) else variant
    L = next_pow2_log(n)
    out: list[Launch] = []
    if n <= 1:
        return out
    first = 1
    if v.tile_log is not None:
        out.append(Launch("tile_sort", min(v.tile_log, L)))
        first = v.tile_log + 1
    for m in range(first, L + 1):
        out += stage_launches(m, v, m - 1, 0)
    return out


@dataclass(frozen=True)
class ChunkedSchedule:
    """A schedule split for aligned chunks of 2^chunk_log keys (see the module docstring)."""
    chunk_log: int
    bounds: list[tuple[int, int]]  # [start, stop) of each chunk (the last one may be partial)
    head: list[list[Launch]]       # per chunk: its own schedule (stages 1..chunk_log), local n
    middle: list[Launch]           # over the whole array: the stages above chunk_log
    tail: list[Launch]             # per chunk, local n: the last stage's strides < 2^chunk_log


def chunk_log_for(n: int, chunks: int) -> int:
    """log2 of the aligned chunk that splits next_pow2(n) virtual keys into ``chunks`` (a power of two);
    at least 0: fewer keys than chunks get one key per chunk (so n <= 1 is a single chunk)."""
    return max(next_pow2_log(n) - (chunks.bit_length() - 1), 0)


def check_chunk_log(v: Variant, n: int, chunk_log: int) -> None:
    """A one-line InputError unless n keys fit one chunk or chunks of 2^chunk_log keys hold whole tiles of ``v``."""
    need = v.tile_log or 0
    if chunk_log < need and next_pow2_log(n) > chunk_log:
        size = 1 << chunk_log if chunk_log >= 0 else 0
        raise InputError(f"chunks of {size} keys (n={n}) are smaller than the {1 << need}-key tile of {v.name}; "
                         f"use fewer chunks")


def split_schedule(n: int, variant: Variant | str, chunk_log: int) -> ChunkedSchedule:
    """The launches of ``variant`` for n keys, split into per-chunk head, global middle and per-chunk tail."""
    v = get_variant(variant) if isinstance(variant, str) else variant
    check_chunk_log(v, n, chunk_log)
    L = next_pow2_log(n)
    c = 1 << chunk_log
    bounds = [(a, min(a + c, n)) for a in range(0, n, c)]
    head = [schedule(b - a, v) for a, b in bounds]
    if L <= chunk_log:
        return ChunkedSchedule(chunk_log, bounds, head, [], [])
    middle = [x for m in range(chunk_log + 1, L) for x in stage_launches(m, v, m - 1, 0)]
    middle += stage_launches(L, v, L - 1, chunk_log)
    return ChunkedSchedule(chunk_log, bounds, head, middle, stage_launches(L, v, chunk_log - 1, 0))


def tile_steps(launch: Launch, v: Variant) -> list[tuple[int, int, bool]]:
    """The shared-memory steps inside one tile launch (mirrors the loops of ``tile_kernel``)."""
    T, F = v.tile_log, v.tile_fuse
    if launch.kind == "tile_sort":
        return [c for m in range(1, launch.stage + 1) for c in chunks(m - 1, 0, F, True)]
    if launch.kind == "tile_merge":
        return chunks(T - 1, 0, F, False)
    raise ValueError(launch.kind)


def global_groups(n: int, p_hi: int, fp: int) -> int:
    """Threads a global pass needs: groups whose lowest index is < n (the kernel's grid)."""
    if n <= 0:
        return 0
    p_lo = p_hi - fp + 1
    hi, r = (n - 1) >> (p_lo + fp), (n - 1) & ((1 << (p_lo + fp)) - 1)
    return (hi << p_lo) + min(r, (1 << p_lo) - 1) + 1


def group_index(rest: np.ndarray, h: int, p_lo: int, fp: int, flip: bool) -> np.ndarray:
    """Index of key h of group ``rest`` (as ``group_index`` in bitonic.cu)."""
    low = (1 << p_lo) - 1
    i = ((rest >> p_lo) << (p_lo + fp)) | (h << p_lo) | (rest & low)
    if flip and (h >> (fp - 1)) & 1:
        i = i ^ low
    return i


def get_variant(name: str) -> Variant:
    """A named variant, or ``NAME@t<T>f<F>g<G>``: its tile (2^T keys, F strides fused per shared-memory
    step; t0: none) and G strides fused per global pass, among the instantiated kernels."""
    base, _, config = name.partition("@")
    if base not in VARIANTS:
        raise InputError(f"unknown bitonic variant {base!r}; known: {', '.join(VARIANTS)}")
    v = VARIANTS[base]
    if not config:
        return v
    # ASCII digits without leading zeros, and w only below 1024 (the default): one spelling for each configuration
    m = re.fullmatch(r"t(0|[1-9][0-9]*)f([1-9][0-9]*)g([1-9][0-9]*)(c?)(?:w([1-9][0-9]*))?", config)
    if m is not None and m.group(5) == "1024":
        m = None
    if m is None:
        raise InputError(f"bad configuration {config!r} in {name!r}: expected t<tile_log>f<tile_fuse>g<global_fuse>"
                         f"[c][w<threads>], e.g. {base}@{v.config}")
    t, f, g = (int(x) for x in m.groups()[:3])
    const = m.group(4) == "c"
    w = int(m.group(5)) if m.group(5) else 1024
    if w != 1024 and (const or w not in TILE_THREAD_CAPS.get((t, f), ())):
        caps = ", ".join(f"t{a}f{b}w{c}" for (a, b), cs in TILE_THREAD_CAPS.items() for c in cs)
        raise InputError(f"{name}: no tile kernel of at most {w} threads for t{t}f{f}{'c' if const else ''}; "
                         f"instantiated: {caps}")
    if const and (t, f) not in CONST_STEP_TILES:
        raise InputError(f"{name}: no constant-step kernel for tile t{t}f{f}; with constant steps: "
                         f"{', '.join(f't{a}f{b}' for a, b in CONST_STEP_TILES)}")
    tiles = ", ".join(f"t{a}f{b}" for a, b in TILE_CONFIGS)
    if t == 0 and f != 1:
        raise InputError(f"{name}: without a tile (t0) the tile fuse must be f1")
    if base == "bitonic-global" and t:
        raise InputError(f"{name}: bitonic-global runs in global memory only (t0); a tile is bitonic-shared or "
                         "bitonic-fused")
    if t and (t, f) not in TILE_CONFIGS:
        raise InputError(f"{name}: no kernel for tile t{t}f{f}; instantiated: {tiles} (or t0f1: none)")
    if g not in GLOBAL_FUSES:
        raise InputError(f"{name}: no kernel fusing g{g} global strides; instantiated: "
                         f"{', '.join(f'g{x}' for x in GLOBAL_FUSES)}")
    return Variant(name, t or None, f, g, v.block, const, w)


def _step(keys: np.ndarray, vals: np.ndarray | None, n: int, p_hi: int, fp: int, flip: bool,
          groups: int | None = None) -> None:
    p_lo = p_hi - fp + 1
    R = 1 << fp
    # a tile step spans the whole tile, which can exceed next_pow2(n) (a chunk's tail)
    G = (1 << max(next_pow2_log(n), p_hi + 1)) >> fp if groups is None else groups
    rest = np.arange(G, dtype=np.int64)
    idx = np.stack([group_index(rest, h, p_lo, fp, flip) for h in range(R)], axis=1)  # [G, R]
    inside = idx < n
    kmax = np.iinfo(keys.dtype).max
    k = np.where(inside, keys[np.minimum(idx, n - 1)], keys.dtype.type(kmax))
    v = None
    if vals is not None:
        v = np.where(inside, vals[np.minimum(idx, n - 1)].astype(np.int64), idx | PAD_BIT)
    for b in range(fp - 1, -1, -1):  # the register network (``network`` in bitonic.cu)
        fl = flip and b == fp - 1
        for e in range(R):
            if e & (1 << b):
                continue
            p = e ^ ((2 << b) - 1) if fl else e | (1 << b)
            if v is None:
                lo, hi = np.minimum(k[:, e], k[:, p]), np.maximum(k[:, e], k[:, p])
                k[:, e], k[:, p] = lo, hi
            else:
                sw = (k[:, p] < k[:, e]) | ((k[:, p] == k[:, e]) & (v[:, p] < v[:, e]))
                ke, kp, ve, vp = k[:, e].copy(), k[:, p].copy(), v[:, e].copy(), v[:, p].copy()
                k[:, e], k[:, p] = np.where(sw, kp, ke), np.where(sw, ke, kp)
                v[:, e], v[:, p] = np.where(sw, vp, ve), np.where(sw, ve, vp)
    keys[idx[inside]] = k[inside]
    if vals is not None:
        vals[idx[inside]] = v[inside].astype(vals.dtype)


def _run(keys: np.ndarray, vals: np.ndarray | None, launches: list[Launch], v: Variant) -> None:
    """Execute launches in place on keys (and values): a whole array or one chunk's slices."""
    n = keys.shape[0]
    for launch in launches:
        if launch.kind == "global":
            _step(keys, vals, n, launch.p_hi, launch.fp, launch.flip,
                  groups=global_groups(n, launch.p_hi, launch.fp))
        else:
            for p_hi, fp, flip in tile_steps(launch, v):
                _step(keys, vals, n, p_hi, fp, flip)


def run_model(ukeys: np.ndarray, variant: Variant | str, kv: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Execute the variant's schedule on unsigned keys in numpy; returns (keys, permutation or None)."""
    v = get_variant(variant) if isinstance(variant, str) else variant
    keys = np.array(ukeys, copy=True)
    vals = np.arange(keys.shape[0], dtype=np.uint32) if kv else None
    _run(keys, vals, schedule(keys.shape[0], v), v)
    return keys, vals


def run_chunked_model(ukeys: np.ndarray, variant: Variant | str, chunk_log: int,
                      kv: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Execute :func:`split_schedule` in numpy as the pipelined driver does: each chunk's head on its
    slices (values = global indices), the middle on the whole array, each chunk's tail on its slices."""
    v = get_variant(variant) if isinstance(variant, str) else variant
    keys = np.array(ukeys, copy=True)
    vals = np.arange(keys.shape[0], dtype=np.uint32) if kv else None
    sp = split_schedule(keys.shape[0], v, chunk_log)

    def part(a: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        return keys[a:b], (vals[a:b] if kv else None)

    for (a, b), head in zip(sp.bounds, sp.head):
        _run(*part(a, b), head, v)
    _run(keys, vals, sp.middle, v)
    for a, b in sp.bounds:
        _run(*part(a, b), sp.tail, v)
    return keys, vals


def transforms_fused(launches: list[Launch]) -> tuple[bool, bool]:
    """Whether the input transform rides on the first launch and the output transform on the last.

    A tile kernel does them on its way in (a tile sort) or out (any tile launch); otherwise they are
    launches of their own (the key transform kernels).
    """
    return (bool(launches) and launches[0].kind == "tile_sort",
            bool(launches) and launches[-1].kind != "global")


def passes_over_memory(n: int, variant: Variant | str) -> int:
    """Kernel launches that read and write all n keys: the schedule, plus a key transform each way
    where no tile launch carries it (see transforms_fused)."""
    if n <= 0:
        return 0
    launches = schedule(n, variant)
    return len(launches) + sum(not fused for fused in transforms_fused(launches))
