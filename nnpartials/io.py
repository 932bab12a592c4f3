"""Reading points and writing partials for the command line (CSV, .npy, .npz).

Outputs are written all at once or not at all: :func:`atomic_output` writes to a hidden temporary file next
to the destination (``.NAME.partial-XXXX``) and renames it over the destination only when writing finished;
any exception, KeyboardInterrupt included, removes the temporary file. (A process killed outright, e.g. by
SIGKILL, can leave a ``.NAME.partial-XXXX`` file behind, never a truncated file under the real name.)
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile

import numpy as np

from nnpartials.errors import InputError

PARTIALS_EXTENSIONS = (".csv", ".npy", ".npz")
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


def write_partials(path, x, y, dy_dx, in_cols, out_cols, *, overwrite: bool = True):
    """Write partials. ``.csv``: inputs, outputs and every partial ``d<y>/d<x>`` per row. ``.npy``: ``dy_dx``
    ``[batch, n_out, n_in]``. ``.npz``: arrays ``x``, ``y`` and ``dy_dx``. The file appears complete or not at
    all (:func:`atomic_output`); with ``overwrite=False`` an existing file is an error."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in PARTIALS_EXTENSIONS:
        raise InputError(f"{path}: expected an output ending in .csv, .npy or .npz, got {ext or 'no extension'!r}")
    with atomic_output(path, "wb", overwrite=overwrite) as f:
        if ext == ".npy":
            np.save(f, dy_dx)
        elif ext == ".npz":
            np.savez(f, x=x, y=y, dy_dx=dy_dx)
        else:
            n = x.shape[0]
            header = ",".join(list(in_cols) + list(out_cols) + partial_column_names(in_cols, out_cols))
            f.write((header + "\n").encode("utf-8"))
            for s in range(0, n, CSV_BLOCK_ROWS):
                e = min(n, s + CSV_BLOCK_ROWS)
                block = np.concatenate([x[s:e].astype(np.float64), y[s:e].astype(np.float64),
                                        dy_dx[s:e].reshape(e - s, -1).astype(np.float64)], axis=1)
                np.savetxt(f, block, delimiter=",", fmt="%.9g")
