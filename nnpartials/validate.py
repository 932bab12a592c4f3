"""Input validation shared by every backend (onnxruntime and the C core).

Rules (documented in README):

* accepted containers: numpy arrays, nested lists/tuples, pandas DataFrames; a DataFrame's columns are matched
  to the model's column names (any order, extra columns ignored) when the caller knows the names, and are
  taken by position only when they carry pandas' default labels 0, 1, 2, ...;
* a 2-D input is ``[batch, n_features]``; a 1-D input of length ``n_features`` is one point (batch 1);
* booleans, integers, float16/float32/float64 are converted to the backend dtype (float32 by default, float64
  for the C core's float64 path); float64 values that overflow float32 become an error, not ``inf``;
* complex, string and object data raise :class:`~nnpartials.errors.InputTypeError`;
* NaN or Inf raise :class:`~nnpartials.errors.InputError` unless ``nan_policy="propagate"``;
* an empty batch (``[0, n_features]``) is valid and yields empty outputs.
"""

from __future__ import annotations

import numpy as np

from nnpartials.errors import InputError, InputTypeError

NAN_POLICIES = ("raise", "propagate")


def _is_frame(x) -> bool:
    return hasattr(x, "to_numpy") and hasattr(x, "columns") and hasattr(x, "loc")


def frame_columns(labels, columns, name: str):
    """How to take a DataFrame whose column labels are ``labels`` as the model's ``columns``: ``None`` to take them
    by position (no names to match, pandas' default labels 0, 1, ..., or exactly the model's names), else the
    model's column names to select. Duplicate or missing names are an InputError."""
    labels = list(labels)
    if columns is None or labels == list(columns) or labels == list(range(len(labels))):
        return None
    dup = sorted({str(c) for c in labels if labels.count(c) > 1})
    if dup:
        raise InputError(f"{name}: DataFrame has duplicate column names {dup}; expected the model's columns "
                         f"{list(columns)} once each")
    missing = [c for c in columns if c not in labels]
    if missing:
        raise InputError(f"{name}: DataFrame columns {[str(c) for c in labels]} lack the model's columns {missing} "
                         f"(columns are matched by name; expected {list(columns)}, in any order)")
    return list(columns)


def _frame_to_array(x, columns, name: str) -> np.ndarray:
    """A DataFrame's values with its columns matched to ``columns`` by name."""
    cols = frame_columns(x.columns, columns, name)
    return x.to_numpy() if cols is None else x[cols].to_numpy()


def _to_array(x, name: str, columns=None) -> np.ndarray:
    if _is_frame(x):  # pandas DataFrame
        x = _frame_to_array(x, columns, name)
    elif hasattr(x, "to_numpy") and hasattr(x, "dtype") and not isinstance(x, np.ndarray):  # pandas Series
        x = x.to_numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged lists and the like
        raise InputTypeError(f"{name}: expected a numeric array-like of shape [batch, n_features], "
                             f"could not convert {type(x).__name__}: {exc}") from None
    return arr


def as_batch(x, n_features: int, *, name: str = "x", nan_policy: str = "raise",
             dtype=np.float32, columns=None) -> np.ndarray:
    """Return ``x`` as a C-contiguous ``[batch, n_features]`` array of ``dtype``, or raise a clear error.

    ``columns``: the model's column names; a pandas DataFrame is then matched to them by name."""
    if nan_policy not in NAN_POLICIES:
        raise InputError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    arr = _to_array(x, name, columns)
    kind = arr.dtype.kind
    if kind not in "biuf":
        raise InputTypeError(f"{name}: expected a real numeric dtype (bool, int, float), got dtype {arr.dtype}")
    if arr.ndim == 1:
        if arr.shape[0] == n_features:
            arr = arr.reshape(1, n_features)
        else:
            raise InputError(f"{name}: expected shape [batch, {n_features}] (or one point of length {n_features}), "
                             f"got a 1-D array of length {arr.shape[0]}"
                             + ("; use x.reshape(-1, 1) for a batch of scalars" if n_features == 1 else ""))
    if arr.ndim != 2:
        raise InputError(f"{name}: expected a 2-D array [batch, {n_features}], got rank {arr.ndim} "
                         f"with shape {tuple(arr.shape)}")
    if arr.shape[1] != n_features:
        raise InputError(f"{name}: expected {n_features} features per point (shape [batch, {n_features}]), "
                         f"got shape {tuple(arr.shape)}")
    if kind == "f" and nan_policy == "raise":
        finite = np.isfinite(arr)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise InputError(f"{name}: expected finite values, found {arr[tuple(bad)]} at row {bad[0]}, "
                             f"column {bad[1]} ({int((~finite).sum())} non-finite in total); "
                             f"pass nan_policy='propagate' to let NaN/Inf through")
    # with nan_policy="raise" an overflowing value becomes inf and is reported just below, not warned about
    with np.errstate(over="ignore" if nan_policy == "raise" else "warn"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    if nan_policy == "raise" and kind == "f" and out.dtype.itemsize < arr.dtype.itemsize:
        if not np.isfinite(out).all():
            bad = np.argwhere(~np.isfinite(out))[0]
            raise InputError(f"{name}: value {arr[tuple(bad)]} at row {bad[0]}, column {bad[1]} overflows "
                             f"{np.dtype(dtype).name}")
    return out
