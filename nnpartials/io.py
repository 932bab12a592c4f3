"""Reading points and writing partials for the command line (CSV, .npy, .npz)."""

from __future__ import annotations

import csv
import os

import numpy as np

from nnpartials.errors import InputError


def read_points(path, columns=None) -> np.ndarray:
    """Read a point table. ``.npy``: a 2-D array. ``.csv``: numbers, with an optional header row; when the header
    names the model's columns (in any order, extra columns allowed) they are picked in the model's order."""
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
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        return np.zeros((0, len(columns) if columns else 0), np.float64)
    header = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    try:
        data = np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"{path}: non-numeric value in the data rows ({exc})") from None
    if data.ndim != 2 and len(rows):
        raise InputError(f"{path}: rows have different lengths")
    if len(rows) == 0:
        data = np.zeros((0, len(header) if header else 0))
    if header is not None and columns is not None and header != list(columns):
        missing = [c for c in columns if c not in header]
        if missing:
            raise InputError(f"{path}: header {header} lacks the model's columns {missing} (expected {list(columns)})")
        data = data[:, [header.index(c) for c in columns]]
    return data


def partial_column_names(in_cols, out_cols):
    return [f"d{o}/d{i}" for o in out_cols for i in in_cols]


def write_partials(path, x, y, dy_dx, in_cols, out_cols):
    """Write partials. ``.csv``: inputs, outputs and every partial ``d<y>/d<x>`` per row. ``.npy``: ``dy_dx``
    ``[batch, n_out, n_in]``. ``.npz``: arrays ``x``, ``y`` and ``dy_dx``."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        np.save(path, dy_dx)
    elif ext == ".npz":
        np.savez(path, x=x, y=y, dy_dx=dy_dx)
    elif ext == ".csv":
        n = x.shape[0]
        table = np.concatenate([x.astype(np.float64), y.astype(np.float64),
                                dy_dx.reshape(n, -1).astype(np.float64)], axis=1)
        header = ",".join(list(in_cols) + list(out_cols) + partial_column_names(in_cols, out_cols))
        np.savetxt(path, table, delimiter=",", header=header, comments="", fmt="%.9g")
    else:
        raise InputError(f"{path}: expected an output ending in .csv, .npy or .npz, got {ext or 'no extension'!r}")
