"""Reading points and writing partials for the command line (CSV, .npy, .npz, Parquet).

Outputs are written all at once or not at all: :func:`atomic_output` writes to a hidden temporary file next
to the destination (``.NAME.partial-XXXX``) and renames it over the destination only when writing finished;
any exception, KeyboardInterrupt included, removes the temporary file. (A process killed outright, e.g. by
SIGKILL, can leave a ``.NAME.partial-XXXX`` file behind, never a truncated file under the real name.)
:func:`atomic_output_folder` does the same for a folder (a Parquet dataset written by several workers).

Parquet (needs pyarrow, ``pip install 'nnpartials[dask]'``) is read and written in batches, so memory stays bounded
whatever the size of the table: :func:`open_parquet` checks an input (a file, a folder of files or a glob) and
streams its point batches, :func:`partials_schema` and :func:`partials_record_batch` make the output table.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from nnpartials.errors import InputError, InputTypeError, NNPartialsError

PARTIALS_EXTENSIONS = (".csv", ".npy", ".npz")
#: extensions of Parquet files: inputs may use any of them, outputs end in .parquet
PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
PARQUET_OUTPUT_EXTENSIONS = (".parquet",)
CSV_BLOCK_ROWS = 65536  # rows formatted per np.savetxt call when writing CSV (bounds the float64 table in memory)


# ---- reading ----------------------------------------------------------------------------------------------------

def read_points(path, columns=None) -> np.ndarray:
    """Read a point table. ``.npy``: a 2-D array. ``.csv``: numbers, with an optional header row; when the header
    names the model's columns (in any order, extra columns allowed) they are picked in the model's order.

    CSV rules: a UTF-8 byte-order mark is accepted; blank lines are skipped; the first row is a header when
    every non-empty cell in it is non-numeric (a first row mixing numbers and words is a bad data row); a file
    with only a header gives zero points, an empty file is an error; a non-numeric or missing value, or a row
    of the wrong length, is an error naming the data row, the line of the file and the column."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"input file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from None
        return arr
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise InputError(f"{path}: expected an array named 'x' in the .npz, found {list(z.keys())}")
            return z["x"]
    if ext not in (".csv", ".txt"):
        raise InputError(f"{path}: expected a .csv or .npy file, got {ext or 'no extension'!r}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows, lines = [], []
            for r in reader:
                if r and any(c.strip() for c in r):
                    rows.append(r)
                    lines.append(reader.line_num)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file ({exc})") from None
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise InputError(f"{path}: no points (the file is empty)")
    header = None
    if all(not _is_number(c) for c in rows[0] if c.strip()):
        header, rows, lines = [c.strip() for c in rows[0]], rows[1:], lines[1:]
    width = len(header) if header is not None else len(rows[0])
    for k, (r, line) in enumerate(zip(rows, lines)):
        if len(r) != width:
            raise InputError(f"{path}: row {k + 1} (line {line}): expected {width} values "
                             f"({'as in the header' if header is not None else 'as in the first row'}), "
                             f"found {len(r)}")
    data = _to_float(path, rows, lines, header, width)
    if header is not None and columns is not None and header != list(columns):
        missing = [c for c in columns if c not in header]
        if missing:
            raise InputError(f"{path}: header {header} lacks the model's columns {missing} (expected {list(columns)})")
        data = data[:, [header.index(c) for c in columns]]
    return data


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _to_float(path, rows, lines, header, width) -> np.ndarray:
    if not rows:
        return np.zeros((0, width), np.float64)
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError:
        pass
    out = np.empty((len(rows), width), np.float64)  # slow path: find the first bad cell, or parse what numpy won't
    for k, (r, line) in enumerate(zip(rows, lines)):
        for j, c in enumerate(r):
            try:
                out[k, j] = float(c)
            except ValueError:
                col = repr(header[j]) if header is not None and header[j] else str(j + 1)
                what = "missing value" if not c.strip() else f"non-numeric value {c.strip()!r}"
                raise InputError(f"{path}: row {k + 1} (line {line}): {what} in column {col}") from None
    return out


# ---- writing ----------------------------------------------------------------------------------------------------

def check_output_path(path, extensions=PARTIALS_EXTENSIONS, *, overwrite: bool = False) -> str:
    """Check, before any work, that ``path`` can be written: its extension is one of ``extensions``, its folder
    exists and is writable, it is not a folder, and it does not exist unless ``overwrite``. Returns the path."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if extensions and ext not in extensions:
        names = list(extensions)
        listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise InputError(f"{path}: expected an output ending in {listed}, got {ext or 'no extension'!r}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder; expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise InputError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: the folder {folder} is not writable")
    if not overwrite and os.path.lexists(path):
        raise InputError(_exists_message(path))
    return path


def _exists_message(path):
    return f"{path} already exists; not overwriting it (pass -f/--force to replace it)"


@contextlib.contextmanager
def atomic_output(path, mode: str | None = "wb", *, overwrite: bool = True):
    """Write ``path`` all at once or not at all.

    Yields an open file (``mode`` ``"wb"`` or ``"w"``; text is UTF-8) or, with ``mode=None``, the path of the
    temporary file (to hand to a writer that opens it itself, which must not change the name). The temporary
    file lives in the destination's folder as ``.NAME.partial-XXXX``; when the block ends normally it is
    flushed to disk and renamed over ``path`` (atomically, ``os.replace``), with the permissions a newly
    created file would get. When the block raises (KeyboardInterrupt included) it is removed and ``path`` is
    left as it was. With ``overwrite=False`` an existing ``path`` is never replaced (InputError)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    if mode not in ("w", "wb", None):
        raise ValueError(f"atomic_output: mode must be 'w', 'wb' or None, got {mode!r}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.partial-", dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc} ({folder})") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        if mode is None:
            yield tmp
        else:
            kw = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
            with open(tmp, mode, **kw) as f:  # f.name is the temporary path
                yield f
                f.flush()
                os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp, path, overwrite):
    if overwrite:
        os.replace(tmp, path)
        return
    try:  # a hard link fails if the destination exists: no window in which another writer's file is replaced
        os.link(tmp, path)
    except FileExistsError:
        raise InputError(_exists_message(path)) from None
    except OSError:  # file systems without hard links
        if os.path.lexists(path):
            raise InputError(_exists_message(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def partial_column_names(in_cols, out_cols):
    return [f"d{o}/d{i}" for o in out_cols for i in in_cols]


def second_pairs(n_in: int):
    """Index arrays ``(j, k)`` of the distinct second partials of one output, ``j <= k`` in row-major order (the
    Hessian is symmetric, so a table holds each mixed partial once)."""
    j, k = np.triu_indices(n_in)
    return j, k


def second_partial_column_names(in_cols, out_cols):
    """``d2<y>/d<x_j>d<x_k>`` for every output and every ``j <= k`` (``d2y/dx1dx1`` is the pure second partial)."""
    j, k = second_pairs(len(in_cols))
    return [f"d2{o}/d{in_cols[a]}d{in_cols[b]}" for o in out_cols for a, b in zip(j, k)]


def _second_columns(d2y_dx2):
    """``[n, n_out, n_in, n_in]`` -> ``[n, n_out * n_pairs]`` in :func:`second_partial_column_names` order."""
    n, n_out, n_in = d2y_dx2.shape[:3]
    j, k = second_pairs(n_in)
    return d2y_dx2[:, :, j, k].reshape(n, n_out * len(j))


def write_partials(path, x, y, dy_dx, in_cols, out_cols, *, overwrite: bool = True, d2y_dx2=None):
    """Write partials. ``.csv``: inputs, outputs and every partial ``d<y>/d<x>`` per row. ``.npy``: ``dy_dx``
    ``[batch, n_out, n_in]``. ``.npz``: arrays ``x``, ``y`` and ``dy_dx``. With ``d2y_dx2``
    ``[batch, n_out, n_in, n_in]`` (second order): ``.npy`` holds it instead of ``dy_dx``, ``.npz`` adds it, and the
    CSV adds one column ``d2<y>/d<x_j>d<x_k>`` per output and ``j <= k``. The file appears complete or not at
    all (:func:`atomic_output`); with ``overwrite=False`` an existing file is an error."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in PARTIALS_EXTENSIONS:
        raise InputError(f"{path}: expected an output ending in .csv, .npy or .npz, got {ext or 'no extension'!r}")
    with atomic_output(path, "wb", overwrite=overwrite) as f:
        if ext == ".npy":
            np.save(f, dy_dx if d2y_dx2 is None else d2y_dx2)
        elif ext == ".npz":
            np.savez(f, x=x, y=y, dy_dx=dy_dx, **({} if d2y_dx2 is None else {"d2y_dx2": d2y_dx2}))
        else:
            n = x.shape[0]
            names = list(in_cols) + list(out_cols) + partial_column_names(in_cols, out_cols)
            if d2y_dx2 is not None:
                names += second_partial_column_names(in_cols, out_cols)
            f.write((",".join(names) + "\n").encode("utf-8"))
            for s in range(0, n, CSV_BLOCK_ROWS):
                e = min(n, s + CSV_BLOCK_ROWS)
                cols = [x[s:e].astype(np.float64), y[s:e].astype(np.float64),
                        dy_dx[s:e].reshape(e - s, -1).astype(np.float64)]
                if d2y_dx2 is not None:
                    cols.append(_second_columns(d2y_dx2[s:e]).astype(np.float64))
                np.savetxt(f, np.concatenate(cols, axis=1), delimiter=",", fmt="%.9g")


# ---- Parquet ----------------------------------------------------------------------------------------------------

def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise NNPartialsError("Parquet input and output need pyarrow: pip install 'nnpartials[dask]'") from None
    return pyarrow


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def is_parquet_input(path) -> bool:
    """True for a Parquet input: a file ending in .parquet (.parq, .pq), a folder, or a glob pattern."""
    path = os.fspath(path)
    return (os.path.splitext(path)[1].lower() in PARQUET_EXTENSIONS or os.path.isdir(path)
            or (_has_glob(path) and not os.path.exists(path)))


def _natural_key(path: str):
    """part.2 before part.10 (the order Dask writes and reads part files in)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def parquet_input_files(path) -> list:
    """The Parquet files of an input, in reading order: the file itself; every ``*.parquet`` (``.parq``, ``.pq``)
    file in a folder and its subfolders, skipping names that start with ``.`` or ``_`` (hidden and temporary
    files, ``_metadata``); or the files a glob pattern matches (``**`` spans folders). Folders and globs are read
    in natural order (``part.2`` before ``part.10``). No file is an error."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
            files += [os.path.join(root, n) for n in names
                      if not n.startswith((".", "_")) and os.path.splitext(n)[1].lower() in PARQUET_EXTENSIONS]
        if not files:
            raise InputError(f"input folder {path!r} holds no Parquet files (*.parquet, *.parq, *.pq)")
        return sorted(files, key=lambda f: _natural_key(os.path.relpath(f, path)))
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise InputError(f"input {path!r} is not a file or folder")
        return [path]
    if _has_glob(path):
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
        if not files:
            raise InputError(f"input pattern {path!r} matches no files")
        return sorted(files, key=_natural_key)
    raise InputError(f"input file {path!r} does not exist")


def _numeric(t) -> bool:
    import pyarrow.types as pt

    return pt.is_integer(t) or pt.is_floating(t) or pt.is_boolean(t)


@dataclass
class ParquetInput:
    """A checked Parquet input (see :func:`open_parquet`): its files, its number of rows (from the files'
    metadata), and the Arrow type of each of the model's columns (a column whose type differs between files is
    read as float64)."""

    label: str
    files: list
    columns: list
    types: dict
    num_rows: int
    rows_per_file: list = field(default_factory=list)

    def batches(self, batch_size: int):
        """Yield ``(arrays, first_row)``: the model's columns (pyarrow arrays, in the model's order, cast to
        :attr:`types`) of at most ``batch_size`` rows, read one record batch at a time, and the batch's first row
        in the whole input."""
        pa = _pyarrow()
        import pyarrow.parquet as pq

        row = 0
        for f in self.files:
            try:
                # pre_buffer=False: pyarrow's default reads every row group's column chunks up front and keeps them
                # until the last batch, so memory would grow with the file; this reads one row group at a time
                with pq.ParquetFile(f, pre_buffer=False) as pf:
                    for b in pf.iter_batches(batch_size=batch_size, columns=self.columns):
                        arrays = [b.column(b.schema.get_field_index(c)) for c in self.columns]
                        arrays = [a if a.type == self.types[c] else a.cast(self.types[c])
                                  for a, c in zip(arrays, self.columns)]
                        yield arrays, row
                        row += b.num_rows
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"{f}: cannot read the Parquet file ({exc})") from None


def open_parquet(path, columns) -> ParquetInput:
    """Check a Parquet input before any work: every file is readable Parquet and holds the model's ``columns``
    (matched by name; any order, extra columns ignored) with numeric Arrow types (integer, floating point,
    boolean). Reads only the files' metadata."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    files = parquet_input_files(path)
    columns = list(columns)
    types, rows = {}, []
    for f in files:
        try:
            with pq.ParquetFile(f) as pf:
                schema, n = pf.schema_arrow, pf.metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{f}: not a readable Parquet file ({exc})") from None
        names = list(schema.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(f"{f}: columns {names} lack the model's columns {missing} (columns are matched by name; "
                             f"expected {columns}, in any order)")
        dup = sorted({c for c in columns if names.count(c) > 1})
        if dup:
            raise InputError(f"{f}: duplicate columns {dup}")
        for c in columns:
            t = schema.field(c).type
            if not _numeric(t):
                raise InputTypeError(f"{f}: column {c!r} has Arrow type {t}; expected a number type "
                                     f"(integer, floating point or boolean)")
            types.setdefault(c, set()).add(t)
        rows.append(n)
    unified = {c: next(iter(ts)) if len(ts) == 1 else pa.float64() for c, ts in types.items()}
    return ParquetInput(os.fspath(path), files, columns, unified, int(sum(rows)), rows)


def arrow_to_points(arrays, columns, *, first_row: int = 0, label: str = "input", nan_policy: str = "raise"):
    """The model's columns of one batch (pyarrow arrays) as a numpy array ``[n, n_in]`` (the columns' common numpy
    type, as pandas' ``to_numpy`` gives it). A missing (null) value is NaN: with ``nan_policy="raise"`` it is an
    error naming the column and the row (counted from 0 over the whole input)."""
    out = []
    for a, c in zip(arrays, columns):
        if a.null_count and nan_policy == "raise":
            k = first_row + int(np.flatnonzero(~a.is_valid().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{label}: missing (null) value in column {c!r} at row {k} ({a.null_count} in this "
                             f"batch); pass --nan-policy propagate to treat missing values as NaN")
        v = a.to_numpy(zero_copy_only=False)
        if a.null_count and v.dtype.kind in "biu":
            v = v.astype(np.float64)
        out.append(v)
    if not out:
        return np.zeros((0, 0))
    return np.column_stack(out) if len(out) > 1 else out[0].reshape(-1, 1)


def partials_schema(in_cols, in_types, out_cols, dtype="float32", order: int = 1):
    """Arrow schema of a partials table: the model's input columns (``in_types``: name -> Arrow type, or one numpy
    dtype for all), the outputs and one column ``d<y>/d<x>`` per partial, in the model's precision (``order=2``:
    and one ``d2<y>/d<x_j>d<x_k>`` per second partial, ``j <= k``)."""
    pa = _pyarrow()
    ft = pa.from_numpy_dtype(np.dtype(dtype))
    if not isinstance(in_types, dict):
        in_types = {c: pa.from_numpy_dtype(np.dtype(in_types)) for c in in_cols}
    fields = [pa.field(c, in_types[c]) for c in in_cols]
    fields += [pa.field(c, ft) for c in list(out_cols) + partial_column_names(in_cols, out_cols)]
    if order == 2:
        fields += [pa.field(c, ft) for c in second_partial_column_names(in_cols, out_cols)]
    return pa.schema(fields)


def partials_record_batch(schema, inputs, y, dy_dx, d2y_dx2=None):
    """One record batch of a partials table (``schema`` from :func:`partials_schema`): ``inputs`` the input
    columns (pyarrow or numpy arrays, one per input column), ``y`` ``[n, n_out]``, ``dy_dx`` ``[n, n_out, n_in]``
    (and ``d2y_dx2`` ``[n, n_out, n_in, n_in]`` for an order-2 schema)."""
    pa = _pyarrow()
    n = y.shape[0]
    k = len(inputs)
    arrays = [a if isinstance(a, pa.Array) and a.type == f.type else pa.array(a, type=f.type)
              for a, f in zip(inputs, schema)]
    flat = np.concatenate([y.reshape(n, y.shape[1]), dy_dx.reshape(n, dy_dx.shape[1] * dy_dx.shape[2])]
                          + ([] if d2y_dx2 is None else [_second_columns(d2y_dx2)]), axis=1)
    arrays += [pa.array(np.ascontiguousarray(flat[:, j]), type=schema.field(k + j).type) for j in range(flat.shape[1])]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# ---- a folder written all at once --------------------------------------------------------------------------------

_DATASET_EXTRAS = ("_metadata", "_common_metadata", "_SUCCESS")


def _is_dataset_folder(path) -> bool:
    """A folder that holds only Parquet files (and Dask/Spark's metadata files): one a run may replace."""
    for root, dirs, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            if os.path.islink(p) or not (os.path.splitext(n)[1].lower() in PARQUET_EXTENSIONS
                                         or n in _DATASET_EXTRAS or n.startswith(".")):
                return False
        if any(os.path.islink(os.path.join(root, d)) for d in dirs):
            return False
    return True


def check_output_folder(path, extensions=PARQUET_OUTPUT_EXTENSIONS, *, overwrite: bool = False) -> str:
    """Check, before any work, that a dataset folder ``path`` can be written: its extension, an existing writable
    parent folder, and no existing ``path`` unless ``overwrite``; even then only a file or a folder of Parquet
    files is replaced, never a folder holding anything else."""
    path = os.fspath(path).rstrip(os.sep) or os.sep
    ext = os.path.splitext(path)[1].lower()
    if extensions and ext not in extensions:
        raise InputError(f"{path}: expected an output ending in {' or '.join(extensions)}, got "
                         f"{ext or 'no extension'!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: the folder {folder} is not writable")
    if os.path.lexists(path):
        if not overwrite:
            raise InputError(_exists_message(path))
        if os.path.isdir(path) and not os.path.islink(path) and not _is_dataset_folder(path):
            raise InputError(f"{path} is a folder holding other files than Parquet files; not replacing it")
    return path


@contextlib.contextmanager
def atomic_output_folder(path, *, overwrite: bool = True):
    """Write the folder ``path`` all at once or not at all: yields the path of a hidden temporary folder next to
    it (``.NAME.partial-XXXX``, permissions as a new folder would get) and renames it to ``path`` when the block
    ends normally; on any exception (KeyboardInterrupt included) the temporary folder is removed and ``path`` left
    as it was. With ``overwrite`` an existing ``path`` (a file, or a folder :func:`check_output_folder` accepts) is
    moved aside, the new folder renamed in, then the old one removed; without it an existing ``path`` is an
    InputError."""
    path = os.fspath(path).rstrip(os.sep) or os.sep
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc} ({folder})") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _publish_folder(tmp, path, folder, name, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_folder(tmp, path, folder, name, overwrite):
    if not os.path.lexists(path):
        try:
            os.rename(tmp, path)  # fails if a non-empty folder appeared meanwhile
            return
        except OSError:
            if not os.path.lexists(path):
                raise
    if not overwrite:
        raise InputError(_exists_message(path))
    if os.path.isdir(path) and not os.path.islink(path) and not _is_dataset_folder(path):
        raise InputError(f"{path} is a folder holding other files than Parquet files; not replacing it")
    aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=folder)
    os.rename(path, os.path.join(aside, name))
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(os.path.join(aside, name), path)
        os.rmdir(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)
