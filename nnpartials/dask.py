"""Partials on a Dask cluster: :func:`partials` maps the in-process :class:`~nnpartials.runtime.serve.Partials`
call over the chunks of a Dask array or the partitions of a Dask DataFrame.

::

    import dask.dataframe as dd
    import nnpartials.dask

    y, dy_dx = nnpartials.dask.partials("seed_bundle", x)          # x: dask array [N, n_in], chunked by rows
    y, dy_dx, d2y_dx2 = nnpartials.dask.partials("bundle", x, order=2)  # a bundle exported with order=2
    table = nnpartials.dask.partials("seed_bundle", dd.read_parquet("points/"))
    table.to_parquet("partials/")                                   # inputs, outputs, d<y>/d<x> columns

The task graph carries only the bundle's absolute path and a cache key (path, sha256 of ``manifest.json``,
backend, providers, threads), never a loaded model. Each worker process loads and verifies the bundle once, on its
first chunk, and reuses it for every later chunk (a per-process cache guarded by a lock); a bundle whose
``manifest.json`` changed after the graph was built is refused. Every worker must see the bundle at the same
absolute path (a shared file system, or the same path baked into the image). Needs ``pip install
'nnpartials[dask]'``.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading

import numpy as np

from nnpartials.errors import BundleError, InputError, InputTypeError, NNPartialsError, OrderNotAvailableError

__all__ = ["partials", "cache_info", "clear_cache", "OrderNotAvailableError"]

#: Orders of derivatives :func:`partials` computes: 1 (y, dy_dx) and 2 (also d2y_dx2, for a bundle exported with
#: order=2).
ORDERS = (1, 2)
#: The cached Partials evaluate one slice per call: the slicing by ``max_batch`` is done here, as Partials does it.
_UNSPLIT = 2 ** 62


# ---- per-process cache --------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
#: cache key -> Partials, one per (bundle path, manifest sha256, backend, providers, threads) in this process
_CACHE: dict = {}
#: cache key -> how many times this process loaded (and verified) the bundle; 1 per worker process in a healthy run
_LOADS: collections.Counter = collections.Counter()


def cache_info() -> dict:
    """This process's cache: ``{"pid": ..., "loads": [(key, count), ...], "cached": [key, ...]}``. On a cluster,
    ``client.run(nnpartials.dask.cache_info)`` collects it from every worker."""
    with _LOCK:
        return {"pid": os.getpid(), "loads": sorted(_LOADS.items()), "cached": sorted(_CACHE)}


def clear_cache() -> None:
    """Forget the bundles loaded by this process (the next chunk loads its bundle again)."""
    with _LOCK:
        _CACHE.clear()
        _LOADS.clear()


def _providers_key(providers):
    """``providers`` as a hashable, picklable value (names, or (name, sorted options) pairs)."""
    if providers is None or isinstance(providers, str):
        return providers
    out = []
    for p in providers:
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], dict):
            out.append((str(p[0]), tuple(sorted((str(k), str(v)) for k, v in p[1].items()))))
        elif isinstance(p, str):
            out.append(p)
        else:
            raise InputError(f"providers: expected provider names or (name, options) pairs, got {p!r}")
    return tuple(out)


def _providers_value(pkey):
    if pkey is None or isinstance(pkey, str):
        return pkey
    return [(p[0], dict(p[1])) if isinstance(p, tuple) else p for p in pkey]


def _get_partials(key):
    """The Partials for ``key`` in this process: loaded and verified on first use, then reused."""
    with _LOCK:
        p = _CACHE.get(key)
        if p is not None:
            return p
        from nnpartials.runtime.serve import Partials

        path, sha, backend, pkey, threads = key
        p = Partials(path, providers=_providers_value(pkey) if backend == "onnxruntime" else None,
                     backend=backend, max_batch=_UNSPLIT, threads=threads)
        _LOADS[key] += 1
        found = hashlib.sha256(p.bundle.manifest_bytes).hexdigest()
        if found != sha:
            raise BundleError(f"bundle {path!r} changed after the computation was set up: manifest.json has "
                              f"sha256 {found}, expected {sha} (on worker process {os.getpid()})")
        _CACHE[key] = p
        return p


def _evaluate(key, x, max_batch, nan_policy, order=1):
    """``(y, dy_dx)`` (order 2: ``(y, dy_dx, d2y_dx2)``) for one chunk, exactly as ``Partials(bundle,
    max_batch=max_batch).jacobian(x)`` (``.hessian(x)``) computes them: onnxruntime gets slices of at most
    ``max_batch`` points (None: Partials' own choice for the graph, ``Partials.auto_batch_limit``), the C core the
    whole chunk."""
    p = _get_partials(key)
    fn = p.hessian if order == 2 else p.jacobian
    mb = int(max_batch) if max_batch else (p.auto_batch_limit("hessian" if order == 2 else "jacobian")
                                           if p.backend != "c" else len(x))
    n = len(x)
    if p.backend == "c" or n <= mb:
        return fn(x, nan_policy=nan_policy)
    parts = [fn(x[s:s + mb], nan_policy=nan_policy) for s in range(0, n, mb)]
    return tuple(np.concatenate([r[k] for r in parts]) for k in range(len(parts[0])))


def _where(err, what):
    return type(err)(f"{what}: {err}") if isinstance(err, InputError) else err


# ---- chunk functions (run on the workers; module-level so that the graph refers to them by name) -------------------

def _array_block(block, key, n_out, n_in, dtype, max_batch, nan_policy, order=1, block_info=None):
    """One row block [n, n_in] -> packed [n, n_out, 1 + n_in (+ n_in * n_in)]: y in [:, :, 0], dy_dx in
    [:, :, 1:1 + n_in], for order 2 d2y_dx2 flattened after them."""
    try:
        res = _evaluate(key, block, max_batch, nan_policy, order)
    except InputError as err:
        loc = (block_info or {}).get(0, {}).get("array-location")
        raise _where(err, f"rows {loc[0][0]}..{loc[0][1] - 1}" if loc else "a chunk") from None
    n = block.shape[0]
    out = np.empty((n, n_out, 1 + n_in + (n_in * n_in if order == 2 else 0)), dtype)
    out[:, :, 0] = res[0]
    out[:, :, 1:1 + n_in] = res[1]
    if order == 2:
        out[:, :, 1 + n_in:] = res[2].reshape(n, n_out, n_in * n_in)
    return out


def _frame_partition(part, key, in_cols, by_position, out_names, dtype, max_batch, nan_policy, order=1,
                     partition_info=None):
    """One pandas partition -> the model's input columns, the outputs and one column per partial (order 2: and
    one per second partial, ``j <= k``)."""
    import pandas as pd

    from nnpartials.io import _second_columns

    x = part.iloc[:, list(range(len(in_cols)))] if by_position else part[list(in_cols)]
    try:
        res = _evaluate(key, x.to_numpy(), max_batch, nan_policy, order)
    except InputError as err:
        raise _where(err, f"partition {partition_info['number']}" if partition_info else "a partition") from None
    n = len(part)
    y, dy = res[0], res[1]
    cols = [y.reshape(n, y.shape[1]), dy.reshape(n, dy.shape[1] * dy.shape[2])]
    if order == 2:
        cols.append(_second_columns(res[2]))
    values = np.concatenate(cols, axis=1).astype(dtype, copy=False)
    if by_position:
        x = x.set_axis(list(in_cols), axis=1)
    return pd.concat([x, pd.DataFrame(values, columns=list(out_names), index=part.index)], axis=1)


def _write_part(frame, path, schema):
    """Write one partition of a partials table to ``path`` (a Parquet file); returns its number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    pq.write_table(table, path)
    return table.num_rows


# ---- the public call ----------------------------------------------------------------------------------------------

def _check_order(order, bundle=None):
    if order not in ORDERS or isinstance(order, bool):
        raise InputError(f"order must be 1 (y and dy_dx) or 2 (also d2y_dx2), got {order!r}")
    if order == 2 and bundle is not None and bundle.order < 2:
        raise OrderNotAvailableError(f"order=2: bundle {bundle.path!r} was exported without second derivatives; "
                                     f"export it again with `nnpartials export MODEL -o BUNDLE --order 2`")


def _prepare(bundle, backend, providers, max_batch, nan_policy, threads=None):
    """Load and verify the bundle here (fails early, gives columns and sizes) and make the cache key."""
    from nnpartials.bundle import Bundle, load_bundle
    from nnpartials.runtime.serve import BACKENDS
    from nnpartials.validate import NAN_POLICIES

    if backend not in BACKENDS:
        raise NNPartialsError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if nan_policy not in NAN_POLICIES:
        raise InputError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if max_batch is not None and (not isinstance(max_batch, (int, np.integer)) or isinstance(max_batch, bool)
                                  or max_batch < 1):
        raise InputError(f"max_batch must be a positive integer or None, got {max_batch!r}")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or isinstance(threads, bool)
                                or threads < 1):
        raise InputError(f"threads must be a positive integer or None, got {threads!r}")
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    key = (os.path.abspath(b.path), hashlib.sha256(b.manifest_bytes).hexdigest(), backend,
           _providers_key(providers) if backend == "onnxruntime" else None,
           None if threads is None else int(threads))
    if backend == "c" and not b.has_c_core:
        b.read("model.nnp")  # raises BundleError with the reason the C core cannot serve this model
    return b, key


def _is_dask_frame(x) -> bool:
    try:
        import dask.dataframe as dd
    except ImportError:  # pragma: no cover - the [dask] extra is missing
        return False
    return isinstance(x, dd.DataFrame)


def partials(bundle, x, *, backend: str = "onnxruntime", order: int = 1, nan_policy: str = "raise",
             max_batch: int | None = None, providers=None, threads: int | None = None):
    """Lazy ``y`` and ``dy_dx`` of a bundle over a Dask array or DataFrame (nothing is computed until you ask).

    * ``x`` a Dask array ``[N, n_in]`` chunked by rows (columns are rechunked into one chunk if needed): returns
      Dask arrays ``(y [N, n_out], dy_dx [N, n_out, n_in])`` with ``x``'s row chunks, in the model's precision.
      Computing both together (``dask.compute(y, dy_dx)``) evaluates every chunk once.
    * ``x`` a Dask DataFrame: its columns are matched to the manifest's input columns by name (any order, extra
      columns ignored; a missing column is an error), as :class:`Partials` does for pandas. Returns a Dask
      DataFrame with ``x``'s partitions and index: the model's input columns as given, the outputs, and one
      column ``d<y>/d<x>`` per partial (the command line's names, :func:`nnpartials.io.partial_column_names`),
      ready for ``to_parquet``.

    ``backend``, ``nan_policy``, ``providers``, ``threads`` (per worker process: onnxruntime's intra-op threads or
    the C core's; default theirs, which is every core of the machine, so with several worker processes per machine
    ``threads=1`` avoids oversubscription) and ``max_batch`` (largest slice handed to onnxruntime in one call;
    default None: chosen from the graph's size, ``Partials.auto_batch_limit``) mean what they mean for ``Partials``; each chunk's result equals, bit for bit, what
    ``Partials(bundle, backend=backend, max_batch=max_batch).jacobian(chunk)`` returns in-process.

    ``order=2`` (a bundle exported with ``order=2``; :class:`OrderNotAvailableError` otherwise) adds the second
    derivatives: a third Dask array ``d2y_dx2 [N, n_out, n_in, n_in]`` (``Partials.hessian`` per chunk), or for a
    DataFrame one column ``d2<y>/d<x_j>d<x_k>`` per output and ``j <= k``. The bundle is loaded and verified here (errors
    come at once) and once in each worker process (see the module's notes).
    """
    _check_order(order)
    b, key = _prepare(bundle, backend, providers, max_batch, nan_policy, threads)
    _check_order(order, b)
    m = b.manifest
    dtype = np.dtype(m["inputs"][0].get("dtype", "float32"))
    n_in, n_out = b.n_in, b.n_out
    if _is_dask_frame(x):
        return _frame(x, key, b, dtype, max_batch, nan_policy, order)
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover
        raise NNPartialsError("nnpartials.dask needs Dask: pip install 'nnpartials[dask]'") from None
    if not isinstance(x, da.Array):
        raise InputTypeError(f"x: expected a Dask array [N, {n_in}] or a Dask DataFrame, got {type(x).__name__} "
                             f"(for in-memory data use nnpartials.Partials, or wrap it: dask.array.from_array)")
    if x.dtype.kind not in "biuf":
        raise InputTypeError(f"x: expected a real numeric dtype (bool, int, float), got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != n_in:
        raise InputError(f"x: expected a Dask array of shape [N, {n_in}] (features flattened and concatenated in "
                         f"manifest order), got shape {x.shape}")
    if len(x.chunks[1]) != 1:
        x = x.rechunk({1: -1})
    width = 1 + n_in + (n_in * n_in if order == 2 else 0)
    packed = x.map_blocks(_array_block, key, n_out, n_in, dtype, max_batch, nan_policy, order,
                          chunks=(x.chunks[0], (n_out,), (width,)), new_axis=2, dtype=dtype,
                          meta=np.empty((0, 0, 0), dtype),
                          token="nnpartials-hessian" if order == 2 else "nnpartials-jacobian")
    if order == 2:
        d2 = packed[:, :, 1 + n_in:].reshape((x.shape[0], n_out, n_in, n_in), merge_chunks=False)
        return packed[:, :, 0], packed[:, :, 1:1 + n_in], d2
    return packed[:, :, 0], packed[:, :, 1:]


def _numeric_dtype(t) -> bool:
    try:
        return np.dtype(t).kind in "biuf"
    except TypeError:  # pandas' own dtypes (strings, categories, nullable integers) are not numpy dtypes
        return False


def _frame(x, key, b, dtype, max_batch, nan_policy, order=1):
    import pandas as pd

    from nnpartials.io import partial_column_names, second_partial_column_names
    from nnpartials.validate import frame_columns

    in_cols, out_cols = list(b.input_columns), list(b.output_columns)
    labels = list(x.columns)
    by_position = frame_columns(labels, in_cols, "x") is None and labels != in_cols  # the checks Partials makes
    if by_position and len(labels) != len(in_cols):
        raise InputError(f"x: a DataFrame without column names must have the model's {len(in_cols)} columns "
                         f"{in_cols}, got {len(labels)}")
    meta_in = x._meta.iloc[:, list(range(len(in_cols)))].set_axis(in_cols, axis=1) if by_position \
        else x._meta[in_cols]
    bad = [f"{c} ({t})" for c, t in meta_in.dtypes.items() if not _numeric_dtype(t)]
    if bad:
        raise InputTypeError(f"x: the model's input columns must be numeric (bool, int, float); got {bad}")
    out_names = out_cols + partial_column_names(in_cols, out_cols)
    if order == 2:
        out_names += second_partial_column_names(in_cols, out_cols)
    clash = sorted(set(in_cols) & set(out_names)) or sorted({c for c in out_names if out_names.count(c) > 1})
    if clash:
        raise InputError(f"the bundle's column names collide in the partials table: {clash}")
    meta = pd.concat([meta_in, pd.DataFrame(np.empty((0, len(out_names)), dtype), columns=out_names,
                                            index=meta_in.index)], axis=1)
    return x.map_partitions(_frame_partition, key, tuple(in_cols), by_position, tuple(out_names), dtype, max_batch,
                            nan_policy, order, meta=meta, align_dataframes=False)
