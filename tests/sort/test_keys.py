"""The order-preserving key transform and the reference semantics."""
import numpy as np
import pytest

from gpulab.core.errors import InputError
from gpulab.sort import keys as K
from gpulab.sort import reference as ref


def special_floats():
    return np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, 1.5, -1.5, np.float32(1e-45), -np.float32(1e-45),
                     np.finfo(np.float32).max, np.finfo(np.float32).min, -np.nan, 3.0, 0.0, -0.0], dtype=np.float32)


@pytest.mark.parametrize("dtype", K.DTYPES)
@pytest.mark.parametrize("order", K.ORDERS)
def test_key_order_matches_numpy(dtype, order):
    rng = np.random.default_rng(1)
    if dtype == "float32":
        x = np.concatenate([special_floats(), rng.standard_normal(200).astype(np.float32)])
    else:
        info = np.iinfo(dtype)
        x = np.concatenate([np.array([info.min, info.max, 0, 1], dtype=dtype),
                            rng.integers(info.min, info.max, 200, endpoint=True, dtype=dtype)])
    k = K.to_ukey(x, order == "desc")
    assert k.dtype == K.KEY_DTYPE[dtype]
    perm = np.argsort(k, kind="stable")
    assert ref.keys_equal(x[perm], ref.sort(x, order))
    assert np.array_equal(perm, ref.argsort(x, order))  # -0.0/+0.0 and NaNs tie like numpy's
    back = K.from_ukey(k, dtype, order == "desc")
    assert ref.keys_equal(back, x)


def test_nan_last_ascending_first_descending():
    x = special_floats()
    asc = K.from_ukey(np.sort(K.to_ukey(x)), "float32")
    desc = K.from_ukey(np.sort(K.to_ukey(x, True)), "float32", True)
    assert np.isnan(asc[-2:]).all() and not np.isnan(asc[:-2]).any()
    assert np.isnan(desc[:2]).all() and desc[2] == np.inf


def test_reference_desc_argsort_is_stable():
    x = np.array([2, 1, 2, 3, 1], dtype=np.int32)
    assert ref.argsort(x, "desc").tolist() == [3, 0, 2, 1, 4]
    assert ref.sort(x, "desc").tolist() == [3, 2, 2, 1, 1]
    assert ref.argsort(x[:0], "desc").shape == (0,)


def test_mismatch_reports_first_difference():
    a = np.array([1, 2, 3], dtype=np.int32)
    assert ref.mismatch(a, a.copy()) is None
    assert "first at 1" in ref.mismatch(a, np.array([1, 5, 3], dtype=np.int32))
    assert ref.mismatch(np.array([np.nan], np.float32), np.array([np.nan], np.float32)) is None
    assert "dtype" in ref.mismatch(a, a.astype(np.int64))


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((2, 3), np.int32), "1-D"),
    (np.zeros(3, np.float16), "unsupported dtype float16"),
    (np.zeros(3, np.int8), "unsupported dtype int8"),
    ([1, 2], "expected an array"),
])
def test_bad_arrays(bad, msg):
    with pytest.raises(InputError, match=msg):
        K.check_array(bad)


def test_bad_order():
    with pytest.raises(InputError, match="order"):
        K.check_order("up")
