"""The launch schedule of each variant, executed by the numpy model, against numpy.

The model runs the exact steps and index arithmetic of bitonic.cu (group_index, network, the
tile loops). ``SMALL_TILE`` is the fused design with a 16-key tile, so that tile sorts, fused
global passes (flip and plain) and tile merges all run at small n.
"""
import numpy as np
import pytest

from gpulab.core.errors import InputError
from gpulab.sort import keys as K
from gpulab.sort import reference as ref
from gpulab.sort import schedule as S
from gpulab.sort.bench import DISTS, make_data

SMALL_TILE = S.Variant("small-tile", tile_log=4, tile_fuse=3, global_fuse=4)
SMALL_SHARED = S.Variant("small-shared", tile_log=3, tile_fuse=1, global_fuse=1)
VARIANTS = [*S.VARIANTS.values(), SMALL_TILE, SMALL_SHARED]
SIZES = [0, 1, 2, 3, 1023, 1024, 1025, 4097]


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
    rng = np.random.default_rng(hash((variant.name, dtype)) % 2**32)
    sizes = SIZES + [int(rng.integers(5, 600))]
    for n in sizes:
        x = data(n, dtype, rng)
        for order in K.ORDERS:
            check(x, variant, order, kv=(n % 2 == 1 or n == 1024))


@pytest.mark.parametrize("variant", [S.VARIANTS["bitonic-global"], SMALL_TILE, SMALL_SHARED], ids=lambda v: v.name)
@pytest.mark.parametrize("dist", DISTS)
def test_model_distributions(variant, dist):
    for dtype in ("int32", "float32"):
        x = make_data(777, dtype, dist, seed=3)
        check(x, variant, "asc", kv=True)
        check(x, variant, "desc", kv=False)


def test_real_fused_variant_beyond_one_tile():
    """bitonic-fused itself (8192-key tiles) at n > 2 tiles: global passes and tile merges run."""
    rng = np.random.default_rng(7)
    x = rng.integers(-1000, 1000, 20000).astype(np.int32)
    kinds = {l.kind for l in S.schedule(x.shape[0], "bitonic-fused")}
    assert kinds == {"tile_sort", "global", "tile_merge"}
    check(x, S.VARIANTS["bitonic-fused"], "asc", kv=True)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_schedule_covers_every_stride_once(variant):
    n = 3000
    L = S.next_pow2_log(n)
    steps = []  # (p_hi, fp, flip) of every step the schedule runs
    for launch in S.schedule(n, variant):
        if launch.kind == "global":
            items = [(launch.p_hi, launch.fp, launch.flip)]
        else:
            items = S.tile_steps(launch, variant)
        steps += items
    want = [(m, b) for m in range(1, L + 1) for b in range(m - 1, -1, -1)]
    got = []
    m = 0
    for p_hi, fp, flip in steps:
        if flip:
            m = p_hi + 1  # a flip step opens stage p_hi + 1
        got += [(m, b) for b in range(p_hi, p_hi - fp, -1)]
        assert fp <= max(variant.global_fuse, variant.tile_fuse)
    assert got == want


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
