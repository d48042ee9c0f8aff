"""Tables for the join: a key column (int32 or int64, any value) and an int32 payload column.

:func:`generate` builds a (left, right) pair with a given match rate and duplicate distribution;
:func:`load_table` reads ``.npz``, ``.csv`` or ``.parquet`` files with columns ``key`` and ``payload``;
:func:`save_table` writes them (atomically). Every malformed input is a one-line :class:`InputError`.

Vocabulary: the *left* table is the probe side of the benchmark (``--rows``), the *right* table the
build side (``--right-rows``); the hash join builds on whichever side is smaller.
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpulab.core import atomic
from gpulab.core.errors import InputError

KEY_DTYPES = ("int32", "int64")
FORMATS = (".npz", ".csv", ".parquet")
MAX_ROWS = 2**31 - 1  # row indices are int32 in every implementation


def check_key_shape(side: str, key: Any) -> None:
    """A join key array (numpy, cupy or torch) is 1-D with at most :data:`MAX_ROWS` rows (the kernels take row
    counts and indices as int32: more would wrap)."""
    if len(key.shape) != 1:
        raise InputError(f"{side} join keys must be 1-D, got shape {list(key.shape)}")
    if key.shape[0] > MAX_ROWS:
        raise InputError(f"{side} join keys: at most {MAX_ROWS} rows, got {key.shape[0]}")


@dataclass
class Table:
    key: np.ndarray  # int32 or int64, shape (n,)
    payload: np.ndarray  # int32, shape (n,)

    def __post_init__(self) -> None:
        if self.key.ndim != 1 or self.payload.ndim != 1 or len(self.key) != len(self.payload):
            raise InputError(f"a table needs 1-D key and payload columns of one length, got shapes "
                             f"{self.key.shape} and {self.payload.shape}")

    def __len__(self) -> int:
        return int(self.key.shape[0])

    @property
    def key_dtype(self) -> str:
        return str(self.key.dtype)


# ----------------------------------------------------------------------------------------------- generation
def parse_dup(dup: str) -> float | None:
    """'unique' -> None; 'zipf:S' -> S (> 0)."""
    text = dup.strip().lower()
    if text == "unique":
        return None
    if text.startswith("zipf:"):
        try:
            s = float(text[5:])
        except ValueError:
            raise InputError(f"--dup must be 'unique' or 'zipf:S' with a number S > 0, got {dup!r}") from None
        if not s > 0 or not np.isfinite(s):
            raise InputError(f"--dup zipf:S needs S > 0, got {dup!r}")
        return s
    raise InputError(f"--dup must be 'unique' or 'zipf:S' (e.g. zipf:1.1), got {dup!r}")


def distinct_keys(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """``n`` distinct keys drawn uniformly over the whole range of ``dtype`` (negatives included), shuffled."""
    info = np.iinfo(dtype)
    if n > (int(info.max) - int(info.min) + 1) // 2:
        raise InputError(f"cannot draw {n} distinct {dtype} keys")
    out = np.empty(0, dtype=dtype)
    while len(out) < n:
        need = n - len(out)
        draw = rng.integers(int(info.min), int(info.max), size=need + need // 8 + 16, dtype=dtype, endpoint=True)
        out = np.unique(np.concatenate([out, draw]))
    rng.shuffle(out)
    return out[:n].copy()


def _zipf_ranks(rng: np.random.Generator, n: int, support: int, s: float) -> np.ndarray:
    """``n`` draws of ranks 0..support-1 with P(rank k) proportional to 1/(k+1)^s."""
    w = 1.0 / np.arange(1, support + 1, dtype=np.float64) ** s
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), support - 1)


def generate(rows: int, right_rows: int | None = None, match_rate: float = 0.5, dup: str = "unique",
             seed: int = 0, key_dtype: str = "int64") -> tuple[Table, Table]:
    """A (left, right) pair of tables.

    * right (build side): ``unique`` -> ``right_rows`` distinct keys; ``zipf:S`` -> ``right_rows`` draws of
      Zipf(S)-ranked keys (so the hot keys repeat).
    * left (probe side): ``round(match_rate * rows)`` rows, at random positions, carry a key of the right
      table (``unique``: distinct right keys; ``zipf``: right rows picked uniformly, so the right side's skew
      repeats on the left); every other row carries a key absent from the right table (``zipf``: skewed too).
    Keys span the dtype's whole range, negative values included; payloads are random int32.
    """
    right_rows = rows if right_rows is None else right_rows
    if rows < 0:
        raise InputError(f"--rows must be >= 0, got {rows}")
    if right_rows < 0:
        raise InputError(f"--right-rows must be >= 0, got {right_rows}")
    if max(rows, right_rows) > MAX_ROWS:
        raise InputError(f"at most {MAX_ROWS} rows per table, got {max(rows, right_rows)}")
    if not 0.0 <= match_rate <= 1.0:
        raise InputError(f"--match-rate must be within [0, 1], got {match_rate}")
    if key_dtype not in KEY_DTYPES:
        raise InputError(f"--key-dtype must be one of {', '.join(KEY_DTYPES)}, got {key_dtype!r}")
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    s = parse_dup(dup)
    rng = np.random.default_rng(seed)
    n_match = int(round(match_rate * rows))
    if n_match > 0 and right_rows == 0:
        raise InputError(f"--match-rate {match_rate} needs a non-empty right table (--right-rows 0)")
    if s is None and n_match > right_rows:
        raise InputError(f"--dup unique with --match-rate {match_rate} needs --right-rows >= {n_match} "
                         f"(each matching left key is a distinct right key), got {right_rows}")
    pool = distinct_keys(rng, right_rows + (rows - n_match), key_dtype)
    build_pool, miss_pool = pool[:right_rows], pool[right_rows:]
    if s is None:
        rkey = build_pool.copy()
        hit = rng.choice(right_rows, size=n_match, replace=False) if n_match else np.empty(0, np.int64)
        lmatch, lmiss = rkey[hit], miss_pool
    else:
        rkey = build_pool[_zipf_ranks(rng, right_rows, right_rows, s)] if right_rows else build_pool
        lmatch = rkey[rng.integers(0, right_rows, size=n_match)] if n_match else rkey[:0]
        n_miss = rows - n_match
        lmiss = miss_pool[_zipf_ranks(rng, n_miss, n_miss, s)] if n_miss else miss_pool
    lkey = np.empty(rows, dtype=key_dtype)
    order = rng.permutation(rows)
    lkey[order[:n_match]] = lmatch
    lkey[order[n_match:]] = lmiss
    lpay = rng.integers(-(2**31), 2**31 - 1, size=rows, dtype=np.int32)
    rpay = rng.integers(-(2**31), 2**31 - 1, size=right_rows, dtype=np.int32)
    return Table(lkey, lpay), Table(rkey, rpay)


# ------------------------------------------------------------------------------------------------------ files
def _as_key(values: np.ndarray, where: str) -> np.ndarray:
    dt = values.dtype
    if len(values) == 0 and dt.kind in "fb":  # np.array([]) is float64: an empty column has no type to check
        return values.astype(np.int32)
    if dt.kind == "i":
        return values.astype(np.int32) if dt.itemsize <= 4 else values.astype(np.int64)
    if dt.kind == "u":
        if dt.itemsize <= 2:
            return values.astype(np.int32)
        if dt.itemsize <= 4 or len(values) == 0 or int(values.max()) <= np.iinfo(np.int64).max:
            return values.astype(np.int64)
        raise InputError(f"{where}: column 'key' has values above the int64 range")
    raise InputError(f"{where}: column 'key' must be integer (int32 or int64), got {dt}")


def _as_payload(values: np.ndarray, where: str) -> np.ndarray:
    if values.dtype.kind not in "iu" and not (len(values) == 0 and values.dtype.kind in "fb"):
        raise InputError(f"{where}: column 'payload' must be integer (int32), got {values.dtype}")
    if len(values) and (int(values.min()) < -(2**31) or int(values.max()) > 2**31 - 1):
        raise InputError(f"{where}: column 'payload' has values outside the int32 range")
    return values.astype(np.int32)


def _columns(cols: dict[str, np.ndarray], where: str) -> Table:
    for name in ("key", "payload"):
        if name not in cols:
            have = ", ".join(sorted(cols)) or "none"
            raise InputError(f"{where}: missing column '{name}' (columns: {have})")
    key, payload = np.asarray(cols["key"]), np.asarray(cols["payload"])
    if key.ndim != 1 or payload.ndim != 1:
        raise InputError(f"{where}: columns 'key' and 'payload' must be 1-D, got shapes {key.shape} and {payload.shape}")
    if len(key) != len(payload):
        raise InputError(f"{where}: columns 'key' ({len(key)} rows) and 'payload' ({len(payload)} rows) differ in length")
    if len(key) > MAX_ROWS:
        raise InputError(f"{where}: at most {MAX_ROWS} rows, got {len(key)}")
    return Table(_as_key(key, where), _as_payload(payload, where))


def _frame_columns(df, where: str) -> dict[str, np.ndarray]:
    out = {}
    for c in df.columns:
        col = df[c]
        if col.isna().any():
            if c in ("key", "payload"):
                raise InputError(f"{where}: column '{c}' has missing values")
            continue
        out[str(c)] = col.to_numpy()
    return out


def load_table(path: Path | str) -> Table:
    """Read a table from ``.npz`` (arrays), ``.csv`` (header row) or ``.parquet`` (needs pyarrow)."""
    p = Path(path)
    where = p.name
    if not p.exists():
        raise InputError(f"table file not found: {p}")
    if not p.is_file():
        raise InputError(f"not a file: {p}")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        if not zipfile.is_zipfile(p):  # np.load would call any other file "pickled data"
            raise InputError(f"{where}: not a valid .npz file (not a zip archive)")
        try:
            with np.load(p, allow_pickle=False) as z:
                cols = {k: z[k] for k in z.files if k in ("key", "payload")}  # other arrays are not read
                for k in z.files:
                    cols.setdefault(k, None)  # named in a "missing column" error
        except ValueError as e:
            raise InputError(f"{where}: unreadable .npz ({str(e).splitlines()[0]})") from None
        except Exception as e:  # zipfile.BadZipFile, OSError, EOFError
            raise InputError(f"{where}: not a valid .npz file ({type(e).__name__})") from None
        return _columns(cols, where)
    if suffix == ".csv":
        import pandas as pd

        import csv
        import warnings

        try:
            with open(p, newline="", encoding="utf-8-sig") as f:
                header = next(csv.reader(f), [])
        except (UnicodeDecodeError, csv.Error) as e:
            raise InputError(f"{where}: malformed CSV ({str(e).splitlines()[0]})") from None
        dup = next((c for i, c in enumerate(header) if c in header[:i]), None)
        if dup is not None:  # pandas would rename the second one 'key.1'
            raise InputError(f"{where}: column '{dup}' appears twice in the header")
        try:
            with warnings.catch_warnings():
                # index_col=False: rows longer than the header are an error (pandas would make the first column
                # the index and shift the others onto the header's names)
                warnings.simplefilter("error", pd.errors.ParserWarning)
                df = pd.read_csv(p, index_col=False)
        except pd.errors.EmptyDataError:
            raise InputError(f"{where}: empty CSV file (expected a header 'key,payload')") from None
        except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError, ValueError) as e:
            msg = str(e).splitlines()[0]
            if "Length of header" in msg or "Expected" in msg:
                msg = f"rows have more fields than the header's {len(header)}: {msg}"
            raise InputError(f"{where}: malformed CSV ({msg})") from None
        if df.empty:  # a header and no rows: an empty table (pandas types its columns as object)
            df = df.astype(np.int64)
        t = _columns(_frame_columns(df, where), where)
        # CSV carries no types: keys that all fit in int32 are read as int32 (as .npz/.parquet would store them)
        if t.key.dtype == np.int64 and (len(t) == 0 or (int(t.key.min()) >= -(2**31) and int(t.key.max()) < 2**31)):
            t = Table(t.key.astype(np.int32), t.payload)
        return t
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(f"{where}: reading .parquet needs pyarrow, which is not installed "
                             "(pip install pyarrow, or use .npz/.csv)") from None
        import pandas as pd

        try:
            df = pd.read_parquet(p)
        except Exception as e:
            raise InputError(f"{where}: unreadable parquet file ({str(e).splitlines()[0]})") from None
        if df.index.name in ("key", "payload") and df.index.name not in df.columns:
            df = df.reset_index()  # pandas wrote the column as the frame's index (to_parquet of df.set_index("key"))
        return _columns(_frame_columns(df, where), where)
    raise InputError(f"{where}: unknown table format '{p.suffix}' (use {', '.join(FORMATS)})")


def check_output_path(path: Path | str) -> Path:
    """A one-line InputError unless a table can be written to ``path`` (known format, pyarrow for .parquet,
    not a folder); call it for every output before writing any."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{p.name}: unknown table format '{p.suffix}' (use {', '.join(FORMATS)})")
    if p.is_dir():
        raise InputError(f"cannot write a table to {p}: it is a folder")
    base = next((a for a in p.absolute().parents if a.exists()), None)
    if base is not None and not base.is_dir():
        raise InputError(f"cannot write a table to {p}: {base} is not a folder")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(f"{p.name}: writing .parquet needs pyarrow, which is not installed") from None
    return p


def save_table(table: Table, path: Path | str) -> Path:
    """Write a table atomically as ``.npz`` or ``.csv`` (``.parquet`` with pyarrow)."""
    return atomic.write_with(*table_writer(table, path))


def table_writer(table: Table, path: Path | str) -> tuple[Path, Any, str]:
    """(checked path, writer of a temporary file, its suffix) for :mod:`gpulab.core.atomic`."""
    p = check_output_path(path)
    suffix = p.suffix.lower()

    def write(tmp: str) -> None:
        if suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, key=table.key, payload=table.payload)
        elif suffix == ".csv":
            buf = io.StringIO()
            buf.write("key,payload\n")
            np.savetxt(buf, np.stack([table.key.astype(np.int64), table.payload.astype(np.int64)], 1), fmt="%d",
                       delimiter=",")
            Path(tmp).write_text(buf.getvalue())
        else:
            import pandas as pd

            pd.DataFrame({"key": table.key, "payload": table.payload}).to_parquet(tmp)

    return p, write, suffix


def align_key_dtypes(left: Table, right: Table) -> tuple[Table, Table]:
    """Both sides with one key dtype (int64 when they differ)."""
    if left.key.dtype == right.key.dtype:
        return left, right
    return Table(left.key.astype(np.int64), left.payload), Table(right.key.astype(np.int64), right.payload)
