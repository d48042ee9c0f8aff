"""Every CPU-runnable implementation against pandas.merge on every corner case (both key dtypes)."""
import numpy as np
import pytest

from gpulab.dbjoin import reference, tables

from .cases import CASE_IDS, CASES


def _check(result, lk, rk, count_only=False):
    ref = reference.pandas_join(lk, rk, count_only=count_only)
    ok, detail = reference.compare(result, ref, lk, rk)
    assert ok, detail
    if not count_only:
        li, ri = result.numpy_pairs()
        assert len(li) == len(ri) == ref.count


@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_hash_model(dt, name):
    from gpulab.dbjoin.hash_join_model import ModelHashJoin

    lk, rk = CASES[dt][name]
    _check(ModelHashJoin().join(lk, rk), lk, rk)
    _check(ModelHashJoin().join(lk, rk, count_only=True), lk, rk, count_only=True)


@pytest.mark.parametrize("dt,name", CASE_IDS)
def test_torch_sort_search(dt, name):
    import torch

    from gpulab.dbjoin.torch_join import sort_search_join

    lk, rk = CASES[dt][name]
    _check(sort_search_join(torch.from_numpy(lk), torch.from_numpy(rk)), lk, rk)
    assert sort_search_join(torch.from_numpy(lk), torch.from_numpy(rk), True).count == \
        reference.output_size(lk, rk)


def test_hash_model_retry_and_load_factors():
    """A short first output capacity is re-run with the exact size; the table fill does not change the answer."""
    from gpulab.dbjoin.hash_join_model import ModelHashJoin

    lk, rk = CASES["int64"]["zipf"]
    m = ModelHashJoin(initial_capacity=3)
    _check(m.join(lk, rk), lk, rk)
    assert m.retries == 1
    for lf in (0.1, 0.5, 0.95):  # 0.95: long probe chains that wrap around the table end
        _check(ModelHashJoin(lf).join(lk, rk), lk, rk)


def test_hash_model_medium_size():
    from gpulab.dbjoin.hash_join_model import ModelHashJoin

    left, right = tables.generate(20000, 15000, 0.5, "zipf:0.8", 11, "int64")
    _check(ModelHashJoin().join(left.key, right.key), left.key, right.key)


def test_hash_model_rejects_bad_load_factor():
    from gpulab.core.errors import InputError
    from gpulab.dbjoin.hash_join_model import ModelHashJoin

    with pytest.raises(InputError, match="load-factor"):
        ModelHashJoin(1.5).join(np.array([1]), np.array([1]))


@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_hash_model_duplicated_key_counter(dt):
    """counters[2] (build keys with more than one row) decides whether the grouping kernels do anything:
    0 for unique build keys (they return at once), else the number of duplicated keys, also for the
    empty-marker key's extra slot."""
    from gpulab.dbjoin.hash_join_model import ModelHashJoin

    def dup_keys(build):
        _, counts = np.unique(build, return_counts=True)
        return int((counts > 1).sum())

    for name in ("unique-half", "sentinel", "zipf", "all-match", "sentinel-only", "no-match"):
        lk, rk = CASES[dt][name]
        m = ModelHashJoin()
        _check(m.join(lk, rk), lk, rk)
        build = lk if len(rk) > len(lk) else rk
        assert m.last_dup_keys == dup_keys(build), name
        if name == "unique-half":
            assert m.last_dup_keys == 0
