"""The launch schedule of each variant, executed by the numpy model, against numpy.

The model runs the exact steps and index arithmetic of bitonic.cu (group_index, network, the
tile loops). ``SMALL_TILE`` is the fused design with a 16-key tile, so that tile sorts, fused
global passes (flip and plain) and tile merges all run at small n.
"""
import zlib

import numpy as np
import pytest

from gpulab.core.errors import InputError
from gpulab.sort import keys as K
from gpulab.sort import reference as ref
from gpulab.sort import schedule as S
from gpulab.sort.bench import DISTS, make_data

SMALL_TILE = S.Variant("small-tile", tile_log=4, tile_fuse=3, global_fuse=4)
SMALL_SHARED = S.Variant("small-shared", tile_log=3, tile_fuse=1, global_fuse=1)
SMALL_WIDE = S.Variant("small-wide", tile_log=5, tile_fuse=4, global_fuse=5)  # the shape of t14f4g5 at small n
VARIANTS = [*S.VARIANTS.values(), SMALL_TILE, SMALL_SHARED, SMALL_WIDE]
SIZES = [0, 1, 2, 3, 1023, 1024, 1025, 4097]


def seed(*parts):
    """A seed stable across runs (Python's str hash changes with PYTHONHASHSEED)."""
    return zlib.crc32(repr(parts).encode())


def data(n, dtype, rng):
    if dtype == "float32":
        x = rng.standard_normal(n).astype(np.float32)
        if n >= 8:
            x[rng.integers(0, n, n // 8 + 1)] = np.nan
            x[rng.integers(0, n, 3)] = [np.inf, -np.inf, -0.0]
        return x
    info = np.iinfo(dtype)
    if n % 2:  # odd sizes: many duplicates (ties exercise the (key, index) order)
        return rng.integers(-5 if info.min < 0 else 0, 5, n).astype(dtype)
    return rng.integers(info.min, info.max, n, endpoint=True, dtype=dtype)


def check(x, variant, order, kv):
    k, p = S.run_model(K.to_ukey(x, order == "desc"), variant, kv=kv)
    got = K.from_ukey(k, K.dtype_name(x), order == "desc")
    assert ref.mismatch(got, ref.sort(x, order)) is None, (variant, x.shape, order)
    if kv:
        assert np.array_equal(p.astype(np.int64), ref.argsort(x, order)), (variant, x.shape, order)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("dtype", K.DTYPES)
def test_model_sizes_dtypes_orders(variant, dtype):
    rng = np.random.default_rng(seed(variant.name, dtype))
    sizes = SIZES + [int(rng.integers(5, 600))]
    for n in sizes:
        x = data(n, dtype, rng)
        for order in K.ORDERS:
            check(x, variant, order, kv=(n % 2 == 1 or n == 1024))


@pytest.mark.parametrize("variant", [*S.VARIANTS.values(), SMALL_TILE, SMALL_SHARED], ids=lambda v: v.name)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", K.DTYPES)
def test_model_distributions(variant, dist, dtype):
    """Every bench distribution, dtype, order and kv mode through each schedule (the real variants at n < one
    tile: their tile sort; the small ones: global passes and tile merges too)."""
    x = make_data(777, dtype, dist, seed=3)
    for order in K.ORDERS:
        for kv in (False, True):
            check(x, variant, order, kv)


def test_real_fused_variant_beyond_one_tile():
    """bitonic-fused itself (8192-key tiles) at n > 2 tiles: global passes and tile merges run."""
    rng = np.random.default_rng(7)
    x = rng.integers(-1000, 1000, 20000).astype(np.int32)
    kinds = {l.kind for l in S.schedule(x.shape[0], "bitonic-fused")}
    assert kinds == {"tile_sort", "global", "tile_merge"}
    check(x, S.VARIANTS["bitonic-fused"], "asc", kv=True)


def steps(launches, variant):
    """(p_hi, fp, flip) of every step that the launches run."""
    out = []
    for launch in launches:
        out += [(launch.p_hi, launch.fp, launch.flip)] if launch.kind == "global" else S.tile_steps(launch, variant)
    return out


def strides(step_list, variant, m=0):
    """(stage, bit) of every stride the steps run, in order (a flip step opens stage p_hi + 1)."""
    got = []
    for p_hi, fp, flip in step_list:
        if flip:
            m = p_hi + 1
        got += [(m, b) for b in range(p_hi, p_hi - fp, -1)]
        assert fp <= max(variant.global_fuse, variant.tile_fuse)
    return got


def all_strides(L):
    return [(m, b) for m in range(1, L + 1) for b in range(m - 1, -1, -1)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_schedule_covers_every_stride_once(variant):
    n = 3000
    assert strides(steps(S.schedule(n, variant), variant), variant) == all_strides(S.next_pow2_log(n))


# -- the chunked (pipelined) split: head per chunk, global middle, tail per chunk

def chunk_logs(n, variant, most=64):
    """Valid chunk sizes for n keys (whole tiles, or one chunk): at most ``most`` chunks .. one chunk beyond N."""
    L = S.next_pow2_log(n)
    lo = max(L - most.bit_length() + 1, 0)
    return [j for j in range(lo, L + 2) if j >= (variant.tile_log or 0) or j >= L]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_split_covers_every_stride_once_chunk_locally(variant):
    n = 3000
    L = S.next_pow2_log(n)
    for j in chunk_logs(n, variant):
        sp = S.split_schedule(n, variant, j)
        assert len(sp.bounds) == -(-n // (1 << j)) and sp.bounds[-1][1] == n
        head = steps(S.schedule(min(n, 1 << j), variant), variant)  # a full chunk: stages 1..j
        tail = steps(sp.tail, variant)
        assert all(p_hi < j for p_hi, _, _ in head + tail)  # chunk-local
        got = strides(head, variant) + strides(steps(sp.middle, variant), variant)
        got += strides(tail, variant, m=L)
        assert got == all_strides(L), (variant.name, j)
        if j >= L:
            assert sp.head == [S.schedule(n, variant)] and sp.middle == [] and sp.tail == []


def check_chunked(x, variant, j, order, kv):
    """The chunked model == the whole-array model == numpy, keys and (kv) the stable permutation."""
    u = K.to_ukey(x, order == "desc")
    k, p = S.run_chunked_model(u, variant, j, kv=kv)
    k0, p0 = S.run_model(u, variant, kv=kv)
    assert np.array_equal(k, k0), (variant.name, x.shape, j, order)
    assert ref.mismatch(K.from_ukey(k, K.dtype_name(x), order == "desc"), ref.sort(x, order)) is None
    if kv:
        assert np.array_equal(p, p0) and np.array_equal(p.astype(np.int64), ref.argsort(x, order)), (variant.name, j)


@pytest.mark.parametrize("variant", [S.VARIANTS["bitonic-global"], SMALL_TILE, SMALL_SHARED], ids=lambda v: v.name)
@pytest.mark.parametrize("dtype", ["float32", "uint32", "int64"])
def test_chunked_model_sizes(variant, dtype):
    rng = np.random.default_rng(seed("chunked", variant.name, dtype))
    for n in SIZES + [int(rng.integers(5, 600)), int(rng.integers(600, 3000))]:
        x = data(n, dtype, rng)
        js = chunk_logs(n, variant, most=16)
        for j in js:
            check_chunked(x, variant, j, "asc" if j % 2 else "desc", kv=True)
        check_chunked(x, variant, js[0], "asc", kv=False)


@pytest.mark.parametrize("name, n, js", [("bitonic-shared", 5000, (11, 12)), ("bitonic-fused", 40000, (14, 15))])
def test_chunked_model_real_variants(name, n, js):
    """The real tiles with several chunks: heads, fused passes across chunks, tile merges and tails."""
    rng = np.random.default_rng(n)
    x = data(n, "float32", rng)
    for j in js:
        check_chunked(x, S.VARIANTS[name], j, "asc", kv=True)


def test_chunked_padding_after_equal_max_keys():
    """The last, partial chunk full of maximal keys (NaN): padding (value PAD_BIT | position) stays behind them."""
    x = np.full(37, np.nan, dtype=np.float32)
    for variant in (SMALL_TILE, SMALL_SHARED, S.VARIANTS["bitonic-global"]):
        for j in (3, 4, 5):
            if j >= (variant.tile_log or 0):
                check_chunked(x, variant, j, "asc", kv=True)


def test_chunk_log_for():
    assert S.chunk_log_for(10_000_000, 8) == 21 and len(S.split_schedule(10_000_000, "bitonic-fused", 21).bounds) == 5
    assert S.chunk_log_for(1025, 2) == 10 and S.chunk_log_for(1024, 1) == 10
    assert S.chunk_log_for(3, 8) == 0  # more chunks than keys: one key per chunk


def test_next_pow2_log():
    assert [S.next_pow2_log(n) for n in (0, 1, 2, 3, 4, 5, 1024, 1025)] == [0, 0, 1, 2, 2, 3, 10, 11]


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("name", ["bitonic-shared", "bitonic-fused"])
def test_chunked_at_most_one_key(name, n):
    """n <= 1 with chunks: one chunk (or none), no tile constraint, nothing to sort."""
    j = S.chunk_log_for(n, 2)
    S.check_chunk_log(S.get_variant(name), n, j)
    sp = S.split_schedule(n, name, j)
    assert len(sp.bounds) == n and sp.middle == [] and sp.tail == []
    x = np.array([2.5] * n, dtype=np.float32)
    check_chunked(x, S.VARIANTS[name], j, "desc", kv=True)


def test_chunk_smaller_than_a_tile():
    with pytest.raises(InputError, match=r"chunks of 4096 keys \(n=10000\) are smaller than the 16384-key tile of "
                                         r"bitonic-fused"):
        S.split_schedule(10_000, "bitonic-fused", 12)
    with pytest.raises(InputError, match="chunks of 0 keys"):
        S.split_schedule(3, "bitonic-global", -1)
    assert S.split_schedule(5000, "bitonic-fused", 13).middle == []  # one chunk: no tile constraint


def test_global_groups_is_exact():
    for n in (1, 2, 5, 17, 100, 257):
        N = 1 << S.next_pow2_log(n)
        for p_hi in range(S.next_pow2_log(n)):
            for fp in range(1, min(4, p_hi + 1) + 1):
                rest = np.arange(N >> fp)
                lowest = S.group_index(rest, 0, p_hi - fp + 1, fp, False)
                assert S.global_groups(n, p_hi, fp) == int((lowest < n).sum())
                assert (lowest[: S.global_groups(n, p_hi, fp)] < n).all()


def test_launch_counts():
    n = 10_000_000
    assert len(S.schedule(n, "bitonic-global")) == 24 * 25 // 2
    assert len(S.schedule(n, "bitonic-fused")) < len(S.schedule(n, "bitonic-shared")) < len(S.schedule(n, "bitonic-global"))
    assert S.schedule(0, "bitonic-fused") == [] and S.schedule(1, "bitonic-global") == []


def test_unknown_variant():
    with pytest.raises(InputError, match="unknown bitonic variant"):
        S.get_variant("bitonic-magic")


def test_configured_variants():
    v = S.get_variant("bitonic-fused@t14f4g5")
    assert (v.tile_log, v.tile_fuse, v.global_fuse, v.name, v.config) == (14, 4, 5, "bitonic-fused@t14f4g5", "t14f4g5")
    assert S.get_variant("bitonic-global@t0f1g3").tile_log is None
    assert S.get_variant("bitonic-fused").config == "t14f4g5"  # the fastest measured (H200, 2026-11-27)
    for name in S.VARIANTS:
        assert S.get_variant(f"{name}@{S.VARIANTS[name].config}") == S.Variant(
            f"{name}@{S.VARIANTS[name].config}", *[getattr(S.VARIANTS[name], f) for f in ("tile_log", "tile_fuse",
                                                                                          "global_fuse", "block")])
    for c in S.TUNE_CONFIGS:
        S.get_variant(f"bitonic-fused@{c}")  # every tuning configuration has its kernels
    bad = [("bitonic-fused@14,4,5", "bad configuration '14,4,5'"), ("bitonic-fused@t16f4g5", "no kernel for tile t16f4"),
           ("bitonic-fused@t14f4g6", "no kernel fusing g6"), ("bitonic-global@t0f2g1", "tile fuse must be f1"),
           ("bitonic-magic@t13f3g4", "unknown bitonic variant 'bitonic-magic'"),
           ("bitonic-fused@t12f3g4c", "no constant-step kernel for tile t12f3"),
           ("bitonic-fused@t14f4g5cc", "bad configuration")]
    for name, msg in bad:
        with pytest.raises(InputError, match=msg):
            S.get_variant(name)
    c = S.get_variant("bitonic-fused@t14f4g5c")  # constant tile steps: the same schedule, other kernels
    assert c.const_steps and c.config == "t14f4g5c" and not S.get_variant("bitonic-fused@t14f4g5").const_steps
    assert S.schedule(10_000_000, c) == S.schedule(10_000_000, "bitonic-fused@t14f4g5")
    assert S.tile_instantiated(14, 4, 4, False, const_steps=True)
    assert not S.tile_instantiated(14, 4, 4, True, const_steps=True) and not S.tile_instantiated(14, 4, 8, False, True)


def test_passes_over_memory_and_fused_transforms():
    n = 10_000_000  # 2^24 virtual keys
    assert S.passes_over_memory(n, "bitonic-global") == 24 * 25 // 2 + 2  # transforms of their own
    # tile sort + stages 14..24: ceil((m - 13) / 4) global passes and a tile merge each; transforms inside
    assert S.passes_over_memory(n, "bitonic-fused@t13f3g4") == 1 + 21 + 11
    assert S.passes_over_memory(n, "bitonic-fused") == S.passes_over_memory(n, "bitonic-fused@t14f4g5") == 1 + 15 + 10
    assert S.passes_over_memory(4000, "bitonic-fused") == 1  # one tile sort, both transforms in it
    assert S.passes_over_memory(1, "bitonic-fused") == 2 and S.passes_over_memory(0, "bitonic-fused") == 0
    assert S.transforms_fused(S.schedule(n, "bitonic-fused")) == (True, True)
    assert S.transforms_fused(S.schedule(n, "bitonic-global")) == (False, False)
    assert S.transforms_fused([]) == (False, False)


def test_tile_threads_give_slots_over_64_bytes_128_registers():
    """bitonic.cu's TileShape: one thread per slot of 2^tile_fuse keys, at most 1024, and at most 512 where a
    slot holds 128 bytes or more (16 keys with values, or 16 64-bit keys: they spilled at 1024 threads' 64
    registers)."""
    v = S.get_variant
    assert v("bitonic-fused@t14f4g5").tile_threads(False) == 1024
    assert v("bitonic-fused@t14f4g5").tile_threads(True) == 512
    assert v("bitonic-fused@t14f4g5").tile_threads(False, 8) == 512
    assert v("bitonic-fused@t13f3g4").tile_threads(True, 8) == 1024  # 8 64-bit keys and values: 96 bytes
    assert v("bitonic-fused@t15f4g5").tile_threads(False) == 1024
    assert v("bitonic-fused@t13f4g5").tile_threads(True) == 512  # 512 slots
    assert v("bitonic-fused@t13f3g4").tile_threads(True) == 1024
    assert v("bitonic-shared").tile_threads(True) == 1024
    assert v("bitonic-global").tile_threads(True) == 0
    assert v("bitonic-fused@t14f4g5w512").tile_threads(False) == 512


def test_thread_capped_tile_configurations():
    """w<W>: at most W threads a tile block, where bitonic.cu instantiates it (t14f4 at 512, 32-bit keys without
    values); the same schedule as the plain tile."""
    w = S.get_variant("bitonic-fused@t14f4g5w512")
    assert (w.tile_log, w.tile_fuse, w.global_fuse, w.tile_threads_max, w.const_steps) == (14, 4, 5, 512, False)
    assert w.config == "t14f4g5w512" and S.get_variant("bitonic-fused@t14f4g5").config == "t14f4g5"
    assert S.schedule(10_000_000, w) == S.schedule(10_000_000, "bitonic-fused@t14f4g5")
    assert S.tile_instantiated(14, 4, 4, False, threads_max=512)
    assert not S.tile_instantiated(14, 4, 4, True, threads_max=512)
    assert not S.tile_instantiated(14, 4, 8, False, threads_max=512)
    assert not S.tile_instantiated(13, 3, 4, False, threads_max=512)
    for bad in ("t13f3g4w512", "t14f4g5w256", "t14f4g5cw512"):
        with pytest.raises(InputError, match=f"no tile kernel of at most .* threads for .*instantiated: t14f4w512"):
            S.get_variant(f"bitonic-fused@{bad}")
    with pytest.raises(InputError, match="bad configuration"):
        S.get_variant("bitonic-fused@t14f4g5w")
