"""Order-preserving unsigned keys: every supported dtype and order maps onto one uint32/uint64 core.

``to_ukey(x, desc)`` maps int32/uint32/float32 to uint32 and int64 to uint64 such that sorting
the keys ascending (as unsigned integers) gives numpy's order of ``x``:

* uint32: identity; int32/int64: flip the sign bit;
* float32: positive -> set the sign bit, negative -> invert all bits; every NaN -> 0xFFFFFFFF
  (numpy puts NaN last); -0.0 -> the key of +0.0 (numpy treats them as equal, so a stable
  argsort keeps their input order);
* descending: invert the key (so NaN comes first, as ``np.sort(x)[::-1]`` and ``torch.sort``).

``from_ukey`` inverts it (NaN comes back as a quiet NaN, -0.0 as +0.0: equal values, as numpy
compares them). The CUDA kernels apply the same bit operations (``bitonic.cu``: to_key/from_key).
"""
from __future__ import annotations

import numpy as np

from gpulab.core.errors import InputError

DTYPES = ("int32", "uint32", "float32", "int64")
# dtype name -> (code used by the CUDA kernels, unsigned key dtype)
DTYPE_CODE = {"uint32": 0, "int32": 1, "float32": 2, "int64": 3}
KEY_DTYPE = {"uint32": np.uint32, "int32": np.uint32, "float32": np.uint32, "int64": np.uint64}
ORDERS = ("asc", "desc")


def dtype_name(x: np.ndarray) -> str:
    """The supported dtype name of ``x`` or a one-line InputError."""
    name = np.dtype(x.dtype).name
    if name not in DTYPE_CODE:
        raise InputError(f"unsupported dtype {name}; supported: {', '.join(DTYPES)}")
    return name


def check_array(x) -> np.ndarray:
    """A 1-D array of a supported dtype, or a one-line InputError."""
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise InputError(f"expected an array, got {type(x).__name__}")
    if x.ndim != 1:
        raise InputError(f"expected a 1-D array, got {x.ndim}-D with shape {tuple(x.shape)}")
    dtype_name(x)
    if not np.dtype(x.dtype).isnative:  # the key transforms read the raw bits: swapped bytes sort as other numbers
        raise InputError(f"a byte-swapped ({np.dtype(x.dtype).str}) array; convert it first: "
                         "x.astype(x.dtype.newbyteorder('='))")
    if x.shape[0] >= 2**31:
        raise InputError(f"n must be < 2**31, got {x.shape[0]}")
    return x


def check_order(order: str) -> bool:
    if order not in ORDERS:
        raise InputError(f"order must be asc or desc, got {order!r}")
    return order == "desc"


def key_max(key_dtype) -> int:
    return int(np.iinfo(key_dtype).max)


def to_ukey(x: np.ndarray, desc: bool = False) -> np.ndarray:
    """Unsigned keys whose ascending unsigned order is the requested order of ``x``."""
    name = dtype_name(x)
    if name == "uint32":
        k = x.astype(np.uint32, copy=True)
    elif name == "int32":
        k = x.view(np.uint32) ^ np.uint32(0x80000000)
    elif name == "int64":
        k = x.view(np.uint64) ^ np.uint64(1 << 63)
    else:  # float32
        b = np.ascontiguousarray(x).view(np.uint32)
        neg = (b >> np.uint32(31)).astype(bool)
        k = np.where(neg, ~b, b | np.uint32(0x80000000)).astype(np.uint32)
        k[b == np.uint32(0x80000000)] = np.uint32(0x80000000)  # -0.0 sorts as +0.0
        k[(b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)] = np.uint32(0xFFFFFFFF)  # NaN last
    if desc:
        k = ~k
    return k


def from_ukey(k: np.ndarray, name: str, desc: bool = False) -> np.ndarray:
    """Inverse of :func:`to_ukey` (up to NaN payloads and the sign of zero)."""
    if name not in DTYPE_CODE:
        raise InputError(f"unsupported dtype {name}; supported: {', '.join(DTYPES)}")
    if desc:
        k = ~k
    if name == "uint32":
        return k.astype(np.uint32, copy=True)
    if name == "int32":
        return (k ^ np.uint32(0x80000000)).view(np.int32)
    if name == "int64":
        return (k ^ np.uint64(1 << 63)).view(np.int64)
    top = (k >> np.uint32(31)).astype(bool)
    b = np.where(top, k ^ np.uint32(0x80000000), ~k).astype(np.uint32)
    return b.view(np.float32)
