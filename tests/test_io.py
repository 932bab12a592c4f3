"""Reading point tables and writing partials (nnpartials/io.py): CSV parsing errors, atomic outputs."""

import os
import stat

import numpy as np
import pytest

from nnpartials.errors import InputError, InputTypeError
from nnpartials.io import read_points, write_partials

COLS = ["x1", "x2"]


def _leftovers(folder):
    return [p for p in os.listdir(folder) if ".partial-" in p]


# ---- reading CSV ------------------------------------------------------------------------------------------------

def test_utf8_bom_before_header_is_accepted(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbfx2,x1\r\n1,2\r\n3,4\r\n")
    np.testing.assert_array_equal(read_points(p, COLS), [[2, 1], [4, 3]])


def test_bad_value_in_a_data_row_names_row_line_and_column(tmp_path):
    lines = ["x1,x2"] + [f"{k},{k + 1}" for k in range(60)]
    lines[57] = "56,abc"  # data row 57 on line 58
    p = tmp_path / "bad.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        read_points(p, COLS)
    msg = str(e.value)
    assert "row 57" in msg and "line 58" in msg and "'abc'" in msg and "'x2'" in msg, msg
    assert "header" not in msg, msg


def test_missing_value_in_a_data_row(tmp_path):
    p = tmp_path / "gap.csv"
    p.write_text("x1,x2\n1,2\n,4\n")
    with pytest.raises(InputError, match=r"row 2 \(line 3\): missing value in column 'x1'"):
        read_points(p, COLS)


def test_bad_row_without_header_is_not_taken_for_a_header(tmp_path):
    p = tmp_path / "nohdr.csv"
    p.write_text("1,2\n3,4\n5,oops\n")
    with pytest.raises(InputError, match=r"row 3 \(line 3\): non-numeric value 'oops' in column 2"):
        read_points(p, COLS)
    # a first row mixing numbers and words is a bad data row, not a header
    p.write_text("1,oops\n3,4\n")
    with pytest.raises(InputError, match=r"row 1 \(line 1\): non-numeric value 'oops' in column 2"):
        read_points(p, COLS)


def test_rows_of_different_lengths_name_the_first_offending_line(tmp_path):
    p = tmp_path / "ragged.csv"
    p.write_text("x1,x2\n1,2\n\n3,4\n5\n6,7,8\n")
    with pytest.raises(InputError, match=r"row 3 \(line 5\): expected 2 values .*found 1"):
        read_points(p, COLS)


def test_empty_file_is_a_clear_error(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(InputError, match="no points"):
        read_points(p, COLS)
    p.write_text("\n  \n")
    with pytest.raises(InputError, match="no points"):
        read_points(p, COLS)


def test_header_only_is_zero_points_in_model_order(tmp_path):
    p = tmp_path / "hdr.csv"
    p.write_text("x2,x1,extra\n")
    x = read_points(p, COLS)
    assert x.shape == (0, 2)
    p.write_text("a,b\n")
    with pytest.raises(InputError, match="lacks the model's columns"):
        read_points(p, COLS)


def test_pandas_index_column_header(tmp_path):
    p = tmp_path / "pd.csv"
    p.write_text(",x1,x2\n0,1.5,2.5\n1,3.5,4.5\n")
    np.testing.assert_array_equal(read_points(p, COLS), [[1.5, 2.5], [3.5, 4.5]])


# ---- writing ----------------------------------------------------------------------------------------------------

def _arrays(n=10):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 2)).astype(np.float32), rng.normal(size=(n, 1)).astype(np.float32),
            rng.normal(size=(n, 1, 2)).astype(np.float32))


@pytest.mark.parametrize("ext", [".csv", ".npy", ".npz"])
def test_write_partials_round_trip_and_no_temp_left(tmp_path, ext):
    x, y, dy = _arrays()
    out = tmp_path / f"p{ext}"
    write_partials(out, x, y, dy, COLS, ["y"])
    assert sorted(os.listdir(tmp_path)) == [out.name]
    if ext == ".csv":
        assert out.read_text().splitlines()[0] == "x1,x2,y,dy/dx1,dy/dx2"
        np.testing.assert_allclose(np.loadtxt(out, delimiter=",", skiprows=1)[:, 3:], dy.reshape(10, 2), rtol=1e-7)
    elif ext == ".npy":
        np.testing.assert_array_equal(np.load(out), dy)
    else:
        with np.load(out) as z:
            np.testing.assert_array_equal(z["dy_dx"], dy)
            np.testing.assert_array_equal(z["x"], x)


@pytest.mark.parametrize("ext, writer", [(".csv", "savetxt"), (".npy", "save"), (".npz", "savez")])
def test_write_partials_interrupted_while_writing_leaves_nothing(tmp_path, monkeypatch, ext, writer):
    real = getattr(np, writer)

    def write_some_then_interrupt(file, *args, **kw):
        real(file, *[a[:3] if isinstance(a, np.ndarray) else a for a in args],
             **{k: v[:3] if isinstance(v, np.ndarray) else v for k, v in kw.items()})
        raise KeyboardInterrupt

    monkeypatch.setattr(np, writer, write_some_then_interrupt)
    x, y, dy = _arrays(100)
    with pytest.raises(KeyboardInterrupt):
        write_partials(tmp_path / f"p{ext}", x, y, dy, COLS, ["y"])
    assert os.listdir(tmp_path) == []


def test_write_partials_zero_points_csv_is_header_only(tmp_path):
    x, y, dy = _arrays(0)
    write_partials(tmp_path / "p.csv", x, y, dy, COLS, ["y"])
    assert (tmp_path / "p.csv").read_text() == "x1,x2,y,dy/dx1,dy/dx2\n"


def test_write_partials_can_refuse_to_overwrite(tmp_path):
    x, y, dy = _arrays()
    (tmp_path / "p.npy").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        write_partials(tmp_path / "p.npy", x, y, dy, COLS, ["y"], overwrite=False)
    assert (tmp_path / "p.npy").read_text() == "mine" and _leftovers(tmp_path) == []


# ---- atomic_output / check_output_path --------------------------------------------------------------------------

def test_atomic_output_renames_at_the_end(tmp_path):
    from nnpartials.io import atomic_output

    out = tmp_path / "r.txt"
    with atomic_output(out, "w") as f:
        f.write("hello")
        f.flush()
        assert not out.exists()
        name = os.path.basename(f.name)
        assert name.startswith(".r.txt.partial-") and os.path.dirname(f.name) == str(tmp_path)
    assert out.read_text() == "hello" and _leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_atomic_output_removes_the_temporary_file_on_any_exception(tmp_path, exc):
    from nnpartials.io import atomic_output

    (tmp_path / "r.bin").write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_output(tmp_path / "r.bin") as f:
            f.write(b"new, half written")
            raise exc()
    assert (tmp_path / "r.bin").read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_atomic_output_path_mode_and_no_clobber(tmp_path):
    from nnpartials.io import atomic_output

    with atomic_output(tmp_path / "a.txt", None) as tmp:
        with open(tmp, "w") as f:
            f.write("one")
    assert (tmp_path / "a.txt").read_text() == "one"
    with pytest.raises(InputError, match="already exists"):
        with atomic_output(tmp_path / "a.txt", "w", overwrite=False) as f:
            f.write("two")
    assert (tmp_path / "a.txt").read_text() == "one" and _leftovers(tmp_path) == []
    with atomic_output(tmp_path / "a.txt", "w") as f:
        f.write("three")
    assert (tmp_path / "a.txt").read_text() == "three"


def test_check_output_path(tmp_path):
    from nnpartials.io import check_output_path

    exts = (".csv", ".npy", ".npz")
    check_output_path(tmp_path / "ok.csv", exts)
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "o.csv", exts)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        check_output_path(tmp_path / "file" / "o.csv", exts)
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_output_path(tmp_path / "d.csv", exts)
    with pytest.raises(InputError, match=r"\.csv, \.npy or \.npz"):
        check_output_path(tmp_path / "o.txt", exts)
    (tmp_path / "e.npy").write_text("")
    with pytest.raises(InputError, match="already exists"):
        check_output_path(tmp_path / "e.npy", exts)
    check_output_path(tmp_path / "e.npy", exts, overwrite=True)


# ---- Parquet ----------------------------------------------------------------------------------------------------

def _parquet(path, **cols):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), path)
    return path


def test_parquet_inputs_in_natural_order_without_hidden_files(tmp_path):
    from nnpartials.io import is_parquet_input, parquet_input_files

    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "_tmp").mkdir()
    for name in ("part.10.parquet", "part.2.parquet", "part.1.parquet", "sub/part.0.pq", ".part.9.parquet",
                 "_metadata", "_tmp/part.5.parquet", "notes.txt"):
        (d / name).write_bytes(b"")
    got = [os.path.relpath(f, d) for f in parquet_input_files(d)]
    assert got == ["part.1.parquet", "part.2.parquet", "part.10.parquet", os.path.join("sub", "part.0.pq")]
    assert [os.path.basename(f) for f in parquet_input_files(str(d / "part.*.parquet"))] == \
        ["part.1.parquet", "part.2.parquet", "part.10.parquet"]
    assert parquet_input_files(d / "part.2.parquet") == [str(d / "part.2.parquet")]
    assert is_parquet_input(d) and is_parquet_input(str(d / "*.parquet")) and is_parquet_input("x.parquet")
    assert not is_parquet_input(tmp_path / "x.csv")
    with pytest.raises(InputError, match="matches no files"):
        parquet_input_files(str(tmp_path / "none*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no Parquet files"):
        parquet_input_files(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        parquet_input_files(tmp_path / "missing.parquet")


def test_open_parquet_checks_columns_and_types_before_reading(tmp_path):
    from nnpartials.io import open_parquet

    _parquet(tmp_path / "a.parquet", x2=np.array([1, 2], np.int64), x1=np.array([0.5, 1.5]))
    _parquet(tmp_path / "b.parquet", x1=np.array([2.5]), x2=np.array([3.5]), extra=["keep"])
    src = open_parquet(tmp_path / "*.parquet", COLS)
    assert src.num_rows == 3 and src.rows_per_file == [2, 1]
    assert str(src.types["x1"]) == "double" and str(src.types["x2"]) == "double"  # int64 here, double there
    batches = list(src.batches(2))
    assert [first for _, first in batches] == [0, 2]
    assert [a.to_pylist() for a in batches[0][0]] == [[0.5, 1.5], [1.0, 2.0]]  # model order, unified type
    _parquet(tmp_path / "c.parquet", x1=[1.0], y=[2.0])
    with pytest.raises(InputError, match=r"lack the model's columns \['x2'\]"):
        open_parquet(tmp_path / "c.parquet", COLS)
    _parquet(tmp_path / "d.parquet", x1=[1.0], x2=["a"])
    with pytest.raises(InputTypeError, match="column 'x2' has Arrow type string"):
        open_parquet(tmp_path / "d.parquet", COLS)
    (tmp_path / "e.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        open_parquet(tmp_path / "e.parquet", COLS)


def test_parquet_batches_hold_a_row_group_not_the_whole_file(tmp_path):
    """Streaming (`partials` in-process) reads a Parquet input row group by row group: the Arrow memory held while
    the batches are iterated stays near a row group's size. pyarrow's ParquetFile pre-buffers by default: it reads
    the column chunks of every row group of the file up front and keeps them until the last batch, so the memory of
    the streaming path grew with the size of the input (about 350 MiB for 10^7 points of two float64 columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nnpartials.io import open_parquet

    x = np.random.default_rng(0).normal(size=(200_000, 2))  # incompressible: the file is about 3.2 MB of doubles
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"x1": x[:, 0], "x2": x[:, 1]}), path, row_group_size=5_000)  # 40 row groups
    src = open_parquet(path, COLS)
    pool = pa.default_memory_pool()
    base, peak, rows = pool.bytes_allocated(), 0, 0
    for arrays, first in src.batches(1000):
        assert first == rows
        rows += len(arrays[0])
        peak = max(peak, pool.bytes_allocated() - base)
    assert rows == 200_000
    assert peak < os.path.getsize(path) / 4, f"{peak} bytes of Arrow memory held for a {os.path.getsize(path)}-byte file"


def test_arrow_to_points_nulls(tmp_path):
    import pyarrow as pa

    from nnpartials.io import arrow_to_points

    arrays = [pa.array([1.0, 2.0, 3.0]), pa.array([4, None, 6], pa.int32())]
    with pytest.raises(InputError, match="missing \\(null\\) value in column 'x2' at row 101"):
        arrow_to_points(arrays, COLS, first_row=100)
    got = arrow_to_points(arrays, COLS, nan_policy="propagate")
    assert got.dtype == np.float64 and np.isnan(got[1, 1]) and got[2].tolist() == [3.0, 6.0]
    assert arrow_to_points([pa.array([1, 2], pa.int64())] * 2, COLS).dtype == np.int64


def test_partials_record_batches_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nnpartials.io import partials_record_batch, partials_schema

    x, y, dy = _arrays(6)
    schema = partials_schema(COLS, {"x1": pa.float32(), "x2": pa.int64()}, ["y"])
    assert schema.names == ["x1", "x2", "y", "dy/dx1", "dy/dx2"]
    batch = partials_record_batch(schema, [pa.array(x[:, 0]), pa.array(np.arange(6))], y, dy)
    pq.write_table(pa.Table.from_batches([batch]), tmp_path / "p.parquet")
    t = pq.read_table(tmp_path / "p.parquet")
    assert t.schema == schema
    np.testing.assert_array_equal(t.column("dy/dx2").to_numpy(), dy[:, 0, 1])
    np.testing.assert_array_equal(t.column("y").to_numpy(), y[:, 0])


def test_atomic_output_folder(tmp_path):
    from nnpartials.io import atomic_output_folder, check_output_folder

    out = tmp_path / "o.parquet"
    with atomic_output_folder(out, overwrite=False) as tmp:
        assert os.path.basename(tmp).startswith(".o.parquet.partial-") and not out.exists()
        (open(os.path.join(tmp, "part.0.parquet"), "wb")).close()
    assert os.listdir(out) == ["part.0.parquet"] and _leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    with pytest.raises(InputError, match="already exists"):
        check_output_folder(out)
    with pytest.raises(InputError, match="already exists"):
        with atomic_output_folder(out, overwrite=False):
            pass
    for exc in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(exc):
            with atomic_output_folder(out) as tmp:
                (open(os.path.join(tmp, "part.1.parquet"), "wb")).close()
                raise exc()
        assert os.listdir(out) == ["part.0.parquet"] and _leftovers(tmp_path) == []
    with atomic_output_folder(out) as tmp:  # replaces a Parquet dataset folder
        (open(os.path.join(tmp, "part.7.parquet"), "wb")).close()
    assert os.listdir(out) == ["part.7.parquet"] and [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="other files than Parquet"):
        check_output_folder(out, overwrite=True)
    with pytest.raises(InputError, match="expected an output ending in .parquet"):
        check_output_folder(tmp_path / "o.csv")
    with pytest.raises(InputError, match="does not exist"):
        check_output_folder(tmp_path / "no" / "o.parquet")
