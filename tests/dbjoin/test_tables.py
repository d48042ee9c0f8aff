import numpy as np
import pytest

from gpulab.core.errors import InputError
from gpulab.dbjoin import tables
from gpulab.dbjoin.tables import Table


@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_generate_unique_match_rate(dt):
    left, right = tables.generate(1000, 800, 0.3, "unique", 5, dt)
    assert len(left) == 1000 and len(right) == 800 and left.key.dtype == dt and left.payload.dtype == np.int32
    assert len(np.unique(left.key)) == 1000 and len(np.unique(right.key)) == 800
    assert int(np.isin(left.key, right.key).sum()) == 300
    assert left.key.min() < 0 < left.key.max()  # the whole range, negatives included
    again = tables.generate(1000, 800, 0.3, "unique", 5, dt)
    assert np.array_equal(again[0].key, left.key) and np.array_equal(again[1].payload, right.payload)


def test_generate_zipf_duplicates_on_both_sides():
    left, right = tables.generate(2000, 1500, 0.5, "zipf:1.2", 1, "int64")
    assert len(np.unique(right.key)) < 1500 and len(np.unique(left.key)) < 2000
    assert int(np.isin(left.key, right.key).sum()) == 1000


@pytest.mark.parametrize("kwargs,match", [
    ({"rows": -1}, "--rows"), ({"rows": 10, "right_rows": -2}, "--right-rows"),
    ({"rows": 10, "match_rate": 1.5}, "--match-rate"), ({"rows": 10, "dup": "zipf:0"}, "S > 0"),
    ({"rows": 10, "dup": "sometimes"}, "--dup"), ({"rows": 10, "dup": "zipf:x"}, "--dup"),
    ({"rows": 10, "right_rows": 2, "match_rate": 1.0}, "--right-rows"),
    ({"rows": 10, "right_rows": 0, "match_rate": 0.5, "dup": "zipf:1"}, "non-empty"),
    ({"rows": 10, "key_dtype": "float32"}, "--key-dtype"),
    ({"rows": 10, "seed": -1}, "--seed must be >= 0"),
])
def test_generate_rejects_bad_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        tables.generate(**kwargs)


def test_generate_empty_tables():
    left, right = tables.generate(0, 0, 0.5)
    assert len(left) == 0 and len(right) == 0
    left, right = tables.generate(5, 0, 0.0)
    assert len(left) == 5 and len(right) == 0


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_roundtrip(tmp_path, suffix, dt):
    t = Table(np.array([np.iinfo(dt).min, -1, 0, np.iinfo(dt).max], dt), np.array([1, -2, 3, 2**31 - 1], np.int32))
    p = tables.save_table(t, tmp_path / f"t{suffix}")
    back = tables.load_table(p)
    assert back.key.dtype == dt and np.array_equal(back.key, t.key) and np.array_equal(back.payload, t.payload)
    assert [f.name for f in tmp_path.iterdir()] == [p.name]  # no temporary files left


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_empty_table_roundtrip(tmp_path, suffix):
    """An empty table survives a file: a CSV of just the header is an empty table, not a column-type error."""
    p = tables.save_table(Table(np.empty(0, np.int32), np.empty(0, np.int32)), tmp_path / f"e{suffix}")
    back = tables.load_table(p)
    assert len(back) == 0 and back.key.dtype == np.int32 and back.payload.dtype == np.int32


def test_bad_files(tmp_path):
    np.savez(tmp_path / "nokey.npz", payload=np.arange(3))
    with pytest.raises(InputError, match="nokey.npz: missing column 'key'"):
        tables.load_table(tmp_path / "nokey.npz")
    np.savez(tmp_path / "float.npz", key=np.array([1.5, 2.0]), payload=np.arange(2))
    with pytest.raises(InputError, match="column 'key' must be integer"):
        tables.load_table(tmp_path / "float.npz")
    np.savez(tmp_path / "pay.npz", key=np.arange(2), payload=np.array([2**40, 1]))
    with pytest.raises(InputError, match="payload.*int32"):
        tables.load_table(tmp_path / "pay.npz")
    np.savez(tmp_path / "len.npz", key=np.arange(3), payload=np.arange(2))
    with pytest.raises(InputError, match="differ in length"):
        tables.load_table(tmp_path / "len.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.npz"):
        tables.load_table(tmp_path / "junk.npz")
    (tmp_path / "str.csv").write_text("key,payload\na,1\nb,2\n")
    with pytest.raises(InputError, match="str.csv: column 'key' must be integer"):
        tables.load_table(tmp_path / "str.csv")
    (tmp_path / "cols.csv").write_text("k,payload\n1,1\n")
    with pytest.raises(InputError, match="missing column 'key'"):
        tables.load_table(tmp_path / "cols.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty CSV"):
        tables.load_table(tmp_path / "empty.csv")
    (tmp_path / "nan.csv").write_text("key,payload\n1,1\n,2\n")
    with pytest.raises(InputError, match="missing values|must be integer"):
        tables.load_table(tmp_path / "nan.csv")
    (tmp_path / "long.csv").write_text("key,payload\n1,2,3,4\n")  # pandas would index by the extra fields
    with pytest.raises(InputError, match="long.csv: malformed CSV \\(rows have more fields than the header"):
        tables.load_table(tmp_path / "long.csv")
    (tmp_path / "dup.csv").write_text("key,payload,key\n1,2,3\n")
    with pytest.raises(InputError, match="column 'key' appears twice"):
        tables.load_table(tmp_path / "dup.csv")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(InputError, match="unknown table format"):
        tables.load_table(tmp_path / "t.json")
    with pytest.raises(InputError, match="not found"):
        tables.load_table(tmp_path / "absent.npz")


@pytest.mark.parametrize("dt", ["int32", "int64"])
def test_parquet_roundtrip(tmp_path, dt):
    """.parquet keeps key types and extremes, and an empty table (runs only where pyarrow is installed)."""
    pytest.importorskip("pyarrow")
    t = Table(np.array([np.iinfo(dt).min, -1, 0, np.iinfo(dt).max], dt), np.array([1, -2, 3, 2**31 - 1], np.int32))
    back = tables.load_table(tables.save_table(t, tmp_path / "t.parquet"))
    assert back.key.dtype == dt and np.array_equal(back.key, t.key) and np.array_equal(back.payload, t.payload)
    empty = tables.load_table(tables.save_table(Table(np.empty(0, dt), np.empty(0, np.int32)), tmp_path / "e.parquet"))
    assert len(empty) == 0 and empty.key.dtype == dt and empty.payload.dtype == np.int32
    assert sorted(f.name for f in tmp_path.iterdir()) == ["e.parquet", "t.parquet"]  # no temporary files left


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    try:
        import pyarrow  # noqa: F401

        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(InputError, match="needs pyarrow"):
        tables.load_table(tmp_path / "t.parquet")


def test_align_key_dtypes():
    a = Table(np.array([1], np.int32), np.array([0], np.int32))
    b = Table(np.array([2**40], np.int64), np.array([0], np.int32))
    x, y = tables.align_key_dtypes(a, b)
    assert x.key.dtype == y.key.dtype == np.int64


@pytest.mark.parametrize("text", ["key,payload\n1,2,3\n4,5,6\n", "key,payload\n0,10,20\n1,11,21\n",
                                  "key,payload\n5,10,20\n"])
def test_csv_rows_longer_than_the_header_never_shift_columns(tmp_path, text):
    """Every row one field too long: pandas made the first column the index (a RangeIndex when it counts 0, 1,
    ...) and loaded the others under the header's names."""
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(InputError, match="rows have more fields than the header's 2"):
        tables.load_table(tmp_path / "t.csv")


def test_headers_and_extra_columns(tmp_path):
    (tmp_path / "v.csv").write_text("key,payload,v,v.1\n1,2,3,4\n")  # 'v.1' is a name of its own, not a repeat
    t = tables.load_table(tmp_path / "v.csv")
    assert t.key.tolist() == [1] and t.payload.tolist() == [2]
    np.savez(tmp_path / "obj.npz", key=np.arange(2), payload=np.arange(2), notes=np.array(["a", None], dtype=object))
    assert tables.load_table(tmp_path / "obj.npz").key.tolist() == [0, 1]  # other arrays are not read


def test_check_key_shape_bounds_rows_and_dimensions():
    class Shaped:  # a key array's shape without allocating 2**31 rows
        def __init__(self, *shape):
            self.shape = shape

    tables.check_key_shape("left", Shaped(tables.MAX_ROWS))
    with pytest.raises(InputError, match=f"right join keys: at most {tables.MAX_ROWS} rows, got {tables.MAX_ROWS + 1}"):
        tables.check_key_shape("right", Shaped(tables.MAX_ROWS + 1))
    with pytest.raises(InputError, match="left join keys must be 1-D, got shape \\[2, 3\\]"):
        tables.check_key_shape("left", np.zeros((2, 3), np.int32))


def test_generate_zipf_skews_the_missing_left_keys_too():
    """DB1: under zipf the left rows without a match are skewed too (docstring), not distinct pool keys."""
    from gpulab.dbjoin import tables

    left, right = tables.generate(2000, 1500, 0.5, "zipf:1.2", 1, "int64")
    miss = left.key[~np.isin(left.key, right.key)]
    assert len(miss) == 1000
    assert len(np.unique(miss)) < 0.8 * len(miss)  # Zipf(1.2) over 1000 ranks repeats its hot keys


def test_npz_uint32_keys_above_int32_keep_their_values(tmp_path):
    """DB2: a uint32 key column is widened to int64 (values >= 2**31 must not wrap to negatives)."""
    from gpulab.dbjoin import tables

    key = np.array([0, 2**31, 2**32 - 1], np.uint32)
    np.savez(tmp_path / "t.npz", key=key, payload=np.array([1, 2, 3], np.int32))
    t = tables.load_table(tmp_path / "t.npz")
    assert t.key.dtype == np.int64 and t.key.tolist() == [0, 2**31, 2**32 - 1]


def test_csv_key_just_above_int32_stays_int64(tmp_path):
    """DB3: CSV keys are narrowed to int32 only when they all fit: 2**31 does not."""
    from gpulab.dbjoin import tables

    p = tmp_path / "t.csv"
    p.write_text("key,payload\n2147483648,1\n-2147483648,2\n")
    t = tables.load_table(p)
    assert t.key.dtype == np.int64 and t.key.tolist() == [2**31, -(2**31)]
    p.write_text("key,payload\n2147483647,1\n-2147483648,2\n")
    assert tables.load_table(p).key.dtype == np.int32


def test_an_empty_npz_table_of_float_columns_is_an_empty_table(tmp_path):
    """np.array([]) is float64: an empty .npz table was refused as 'must be integer', a header-only CSV accepted."""
    np.savez(tmp_path / "e.npz", key=np.array([]), payload=np.array([]))
    t = tables.load_table(tmp_path / "e.npz")
    assert len(t) == 0 and t.key.dtype == np.int32 and t.payload.dtype == np.int32
    np.savez(tmp_path / "f.npz", key=np.array([1.5]), payload=np.array([1]))
    with pytest.raises(InputError, match="column 'key' must be integer"):
        tables.load_table(tmp_path / "f.npz")
