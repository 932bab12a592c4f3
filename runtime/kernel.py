"""The C core from Python: ``Kernel`` evaluates a ``model.nnp`` weight file (forward pass, analytic Jacobian,
float64 finite-difference Jacobian) through the ``nnpartials._core`` cffi module.

::

    k = Kernel("bundle_dir")            # or a path to a .nnp file, its bytes, or a loaded Bundle
    y = k.forward(x)                    # [batch, n_out] float32
    y, dy_dx = k.jacobian(x)            # dy_dx[b, i, j] = d y[b, i] / d x[b, j], float32
    fd, err = k.fd_jacobian(x)          # float64 central differences + Richardson, with error estimates
    y, dy_dx, d2y_dx2 = k.hessian(x)    # d2y_dx2[b, i, j, k] = d2 y[b, i] / dx[b, j] dx[b, k], float32
    y, dy_dx, lap = k.laplacian(x)      # lap[b, i] = sum_j d2y_dx2[b, i, j, j] (forward Laplacian, no Hessian)
    y, hvp = k.hvp(x, v)                # hvp[b, i, j] = sum_k d2y_dx2[b, i, j, k] v[b, k]
    y, fd2, err = k.fd_hessian(x)       # float64 central differences of the analytic Jacobian, with error estimates

Inputs are validated (dtype, rank, width, finiteness) as by :func:`nnpartials.validate.as_batch` before
anything is computed: a small C-contiguous float32 batch has its finiteness checked inside the one C call that
then computes (``nnp_jacobian_checked``), any other input goes through ``as_batch`` first; the errors are the
same. Large batches are split across a thread pool (the C calls release the GIL); the results do not depend on
the split. A Kernel may be shared between threads.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nnpartials.errors import BundleError, InputError, InternalError, NNPartialsError, WeightFileError
from nnpartials.validate import NAN_POLICIES, as_batch

try:
    from nnpartials._core import ffi, lib
except ImportError as _exc:  # pragma: no cover - exercised only when the extension was not built
    ffi = lib = None
    _IMPORT_ERROR = _exc
else:
    _IMPORT_ERROR = None
    # bound once: attribute lookups are a noticeable part of a single-point call
    _from_buffer = ffi.from_buffer
    _jacobian_checked = lib.nnp_jacobian_checked
    _forward_checked = lib.nnp_forward_checked
    _E_INPUT = lib.NNP_E_INPUT
_empty = np.empty
_ndarray = np.ndarray

WEIGHTS = "model.nnp"
if lib is not None:  # every C constant comes from the cffi module (nnpartials.ccore reads lib.NNP_*)
    from nnpartials.ccore import ACTIVATIONS as _ACTIVATIONS
    from nnpartials.ccore import FILE_ERRORS as _FILE_ERRORS
    from nnpartials.ccore import MODES
    from nnpartials.ccore import WORKSPACES as _WS
else:  # pragma: no cover
    MODES, _WS, _ACTIVATIONS, _FILE_ERRORS = {}, {}, {}, frozenset()
_F32_OPS = ("forward", "jacobian", "jacobian_forward", "jacobian_reverse")
_F64_OPS = ("forward_f64", "fd_jacobian_f64")
# The second derivatives ("hessian", "laplacian", "hvp", "fd_hessian_f64") have workspaces of their own, sized and
# allocated at a thread's first call of each (one point's worth grows with n_in^2 for the Hessian: models with many
# inputs that never ask for one should not pay for it).
_F32 = np.dtype(np.float32)
#: Batches of at least this many points are split across threads (per thread at least half of it), at most: a call
#: is split from PARALLEL_MIN_FLOPS counted multiply-add FLOPs on (2 per weight per row a point carries through
#: the matrix products), about 0.1 ms of one core's work, against some 0.02-0.05 ms to hand a part to another
#: thread (the seed network's Jacobian reaches it at 512 points, a network of 256-wide layers at a few dozen);
#: never below PARALLEL_FLOOR points.
PARALLEL_MIN_BATCH = 4096
PARALLEL_MIN_FLOPS = 512 * 2 * 16400
PARALLEL_FLOOR = 64
# Scratch memory: one workspace per thread, sized once (the C side processes any batch in blocks within it), so
# no call allocates scratch memory after the first one in a thread.
ACTIVATION_NAMES = tuple(sorted(_ACTIVATIONS, key=_ACTIVATIONS.get))  # code -> name


def _require_core():
    if lib is None:
        raise NNPartialsError(
            f"the C core extension nnpartials._core is not built ({_IMPORT_ERROR}); reinstall the package "
            f"(pip install -e .) with a C compiler available")


def strerror(code: int) -> str:
    """Text of a C status code."""
    _require_core()
    return ffi.string(lib.nnp_strerror(int(code))).decode()


def _propagate_nonfinite(x, y, dy=None, *more):
    """``nan_policy="propagate"``: make NaN and overflow visible in the results, as onnxruntime does.

    The C core's piecewise-linear derivatives are selected by comparisons, which turn a NaN pre-activation into a
    finite slope; without this a NaN input would get finite partials. Rule: a point with a NaN coordinate gets NaN
    for all its outputs and partials; a point whose outputs are not all finite (an infinite coordinate, or an
    overflow inside the network) gets NaN partials. Points that are finite throughout are untouched. ``more``:
    further derivative arrays (second derivatives), treated as ``dy``."""
    if x.size == 0:
        return
    nan_rows = np.isnan(x).any(axis=1)
    if nan_rows.any():
        y[nan_rows] = np.nan
    if dy is not None or more:
        bad = ~np.isfinite(y).all(axis=1)
        if bad.any():
            for d in (dy, *more):
                if d is not None:
                    d[bad] = np.nan


def _read_source(source):
    """Return (bytes, description, bundle or None) of the weight file named by source."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "weight file bytes", None
    if hasattr(source, "manifest") and hasattr(source, "read"):  # a loaded Bundle
        return source.read(WEIGHTS), os.path.join(getattr(source, "path", "bundle"), WEIGHTS), source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            from nnpartials.bundle import load_bundle

            bundle = load_bundle(path)  # verifies the hashes
            return bundle.read(WEIGHTS), os.path.join(path, WEIGHTS), bundle
        try:
            with open(path, "rb") as f:
                return f.read(), path, None
        except FileNotFoundError:
            raise BundleError(f"no such weight file or bundle folder: {path!r}") from None
        except OSError as exc:
            raise BundleError(f"cannot read {path!r}: {exc}") from None
    raise TypeError(f"Kernel source must be a bundle folder, a .nnp path, bytes or a Bundle, "
                    f"got {type(source).__name__}")


class Kernel:
    """The C core for one weight file. See the module docstring.

    ``threads``: worker threads for large batches (default: the number of CPUs, at most 8); 1 disables the split.
    """

    def __init__(self, source, *, threads: int | None = None, key=None):
        _require_core()
        if key is not None:  # verify the bundle's signature (model.sig) with this public key first
            from nnpartials.bundle import load_bundle

            source = load_bundle(source, key=key)
        data, self.source, bundle = _read_source(source)
        need = ffi.new("size_t *")
        rc = lib.nnp_model_bytes(data, len(data), need)
        if rc != 0:
            raise WeightFileError(f"{self.source}: {strerror(rc)}", rc)
        self._storage = ffi.new("char[]", max(1, need[0]))
        out = ffi.new("nnp_model **")
        rc = lib.nnp_load(data, len(data), self._storage, need[0], out)
        if rc != 0:  # pragma: no cover - nnp_model_bytes accepted the same bytes
            raise WeightFileError(f"{self.source}: {strerror(rc)}", rc)
        self._m = out[0]
        self.n_in = int(lib.nnp_n_in(self._m))
        self.n_out = int(lib.nnp_n_out(self._m))
        self.n_layers = int(lib.nnp_n_layers(self._m))
        self.auto_mode = "forward" if lib.nnp_auto_mode(self._m) == 1 else "reverse"
        #: the model's input column names (from the bundle's manifest; None for a bare weight file): a pandas
        #: DataFrame is matched to them by name
        self.input_columns = None
        if bundle is not None:
            if (self.n_in, self.n_out) != (bundle.n_in, bundle.n_out):
                raise BundleError(f"{self.source}: the weight file has {self.n_in} inputs and {self.n_out} outputs, "
                                  f"the manifest {bundle.n_in} inputs and {bundle.n_out} outputs; the bundle is "
                                  f"inconsistent")
            self.input_columns = list(bundle.input_columns)
        if threads is None:
            threads = min(os.cpu_count() or 1, 8)
        if not isinstance(threads, (int, np.integer)) or threads < 1:
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        self.threads = int(threads)
        # Workspace sizes for an unbounded batch (the C side caps them at one block of points); those of the second
        # derivatives when first needed (_so_work).
        self._ws_len = {}
        n = ffi.new("size_t *")
        for op in _F32_OPS + _F64_OPS:
            rc = lib.nnp_workspace(self._m, _WS[op], 1 << 40, n)
            if rc != 0:
                raise WeightFileError(f"{self.source}: workspace size: {strerror(rc)}", rc)
            self._ws_len[op] = int(n[0])
        self._ws32_len = max(1, max(self._ws_len[o] for o in _F32_OPS))
        self._ws64_len = max(1, max(self._ws_len[o] for o in _F64_OPS))
        self._local = threading.local()
        # batch sizes from which forward() and jacobian() (by mode) split a call across threads
        flops = self._flops = sum(2 * r * c for r, c, *_ in self.layers)
        rows = {MODES["auto"]: 1 + min(self.n_in, self.n_out), MODES["forward"]: 1 + self.n_in,
                MODES["reverse"]: 1 + self.n_out}
        self._par_fwd = self._par_min(flops)
        self._par_jac = {cm: self._par_min(flops * r) for cm, r in rows.items()}
        self._so_min = {}  # second derivatives: batch size from which a call is split across threads
        self._pool = None
        self._pool_lock = threading.Lock()

    # ----- description -----------------------------------------------------------------------------------------
    @property
    def layers(self) -> list:
        """[(rows, cols, activation, p0, p1)] per layer."""
        rows, cols, act = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("int *")
        p0, p1 = ffi.new("float *"), ffi.new("float *")
        out = []
        for k in range(self.n_layers):
            lib.nnp_layer_info(self._m, k, rows, cols, act, p0, p1)
            out.append((int(rows[0]), int(cols[0]), ACTIVATION_NAMES[act[0]], float(p0[0]), float(p1[0])))
        return out

    def __repr__(self):
        return f"Kernel({self.source!r}, n_in={self.n_in}, n_out={self.n_out}, layers={self.n_layers})"

    # ----- scratch memory ----------------------------------------------------------------------------------------
    def _work32(self):
        try:
            return self._local.w32
        except AttributeError:
            # the cdata keeps the numpy array alive
            w = self._local.w32 = ffi.from_buffer("float[]", np.empty(self._ws32_len, np.float32))
            return w

    def _work64(self):
        try:
            return self._local.w64
        except AttributeError:
            w = self._local.w64 = ffi.from_buffer("double[]", np.empty(self._ws64_len, np.float64))
            return w

    def _so_work(self, op):
        """(workspace, its length) of this thread for a second-derivative operation, allocated at its first call."""
        try:
            ws = self._local.so
        except AttributeError:
            ws = self._local.so = {}
        w = ws.get(op)
        if w is None:
            length = self._ws_len.get(op)
            if length is None:
                n = ffi.new("size_t *")
                rc = lib.nnp_workspace(self._m, _WS[op], 1 << 40, n)
                if rc != 0:
                    raise WeightFileError(f"{self.source}: workspace size of {op}: {strerror(rc)}", rc)
                length = self._ws_len[op] = max(1, int(n[0]))
            if op.endswith("_f64"):
                w = ffi.from_buffer("double[]", np.empty(length, np.float64))
            else:
                w = ffi.from_buffer("float[]", np.empty(length, np.float32))
            ws[op] = w
        return w, self._ws_len[op]

    @staticmethod
    def _par_min(flops_per_point: int) -> int:
        """Batch size from which a call of flops_per_point counted FLOPs per point is split across threads."""
        return int(min(PARALLEL_MIN_BATCH, max(PARALLEL_FLOOR, -(-PARALLEL_MIN_FLOPS // max(1, flops_per_point)))))

    def _so_min_batch(self, op):
        """Batches from this size are split across threads, with ``rows`` the rows a point carries through the
        matrix products (a forward pass carries one): from PARALLEL_MIN_BATCH / rows points, or from the counted
        work of forward() and jacobian() (_par_min of the FLOPs of those rows) where that comes first. The first
        keeps narrow networks right, whose second derivatives cost far more per point than their few FLOPs (16 and
        8 units: a Hessian at 2,747 points takes 0.59 ms on one thread, 11 GFLOP/s counted); the second splits wide
        ones sooner (the 4 x 256 physics network's Hessian at 100 points: 2.63 -> 1.43 ms on two threads)."""
        n, n_out = self.n_in, self.n_out
        pairs = n * (n + 1) // 2
        rows = {"hessian": 1 + n + min(n_out, pairs), "laplacian": 2 + n, "hvp": 2 + 2 * n,
                "fd_hessian_f64": 4 * n * (n + 1) + n + 1, "fd_jacobian_f64": 4 * n + 1}[op]
        return min(max(1, PARALLEL_MIN_BATCH // rows), self._par_min(self._flops * rows))

    def _get_pool(self):
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="nnp-kernel")
        return self._pool

    def close(self):
        """Stop the worker threads (they are also stopped when the Kernel is garbage-collected)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __del__(self):
        try:
            pool = self._pool
            if pool is not None:
                pool.shutdown(wait=False)
        except Exception:
            pass

    def _split(self, n: int, threads, min_batch: int = PARALLEL_MIN_BATCH):
        t = self.threads if threads is None else int(threads)
        if t < 1:
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        if t == 1 or n < min_batch:
            return None
        parts = min(t, max(1, n // max(1, min_batch // 2)))
        if parts <= 1:
            return None
        bounds = np.linspace(0, n, parts + 1).astype(int)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def _run(self, fn, n, threads, min_batch: int = PARALLEL_MIN_BATCH):
        """fn(start, stop) computes rows [start, stop); run it on chunks across the pool for large n."""
        chunks = self._split(n, threads, min_batch)
        if chunks is None:
            fn(0, n)
            return
        pool = self._get_pool()
        futures = [pool.submit(fn, a, b) for a, b in chunks[1:]]
        fn(*chunks[0])
        for f in futures:
            f.result()

    def _prep32(self, x, nan_policy):
        """as_batch(x, n_in, nan_policy) for float32; the common case (a C-contiguous float32 [batch, n_in]
        ndarray, for which as_batch returns x itself) is checked without the numpy temporaries."""
        if (type(x) is np.ndarray and x.dtype is _F32 and x.ndim == 2 and x.shape[1] == self.n_in
                and x.flags.c_contiguous):
            if nan_policy == "propagate":
                return x
            if nan_policy == "raise":
                if x.size == 0 or lib.nnp_first_nonfinite_f32(ffi.from_buffer("float[]", x), x.size) == x.size:
                    return x
        return as_batch(x, self.n_in, name="x", nan_policy=nan_policy, columns=self.input_columns)

    @staticmethod
    def _check(rc):
        """Turn a C status code into the exception that says whose fault it is."""
        if rc == 0:
            return
        if rc == _E_INPUT:
            raise InputError(f"x: {strerror(rc)}")
        if rc in _FILE_ERRORS:
            raise WeightFileError(f"C core: {strerror(rc)}", rc)
        raise InternalError(f"C core error {rc} ({strerror(rc)}): nnpartials called its C core wrongly; this is a bug "
                            f"in nnpartials, please report it with the model and the call")

    # ----- evaluation --------------------------------------------------------------------------------------------
    def forward(self, x, *, nan_policy: str = "raise", threads: int | None = None) -> np.ndarray:
        """``y [batch, n_out]`` float32."""
        if type(x) is _ndarray and x.dtype is _F32 and nan_policy == "raise":  # fast path, as in jacobian()
            s = x.shape
            if len(s) == 2 and s[1] == self.n_in and 0 < s[0] < self._par_fwd and x.flags.c_contiguous:
                n = s[0]
                y = _empty((n, self.n_out), _F32)
                try:
                    w = self._local.w32
                except AttributeError:
                    w = self._work32()
                rc = _forward_checked(self._m, n, _from_buffer("float[]", x), _from_buffer("float[]", y), w,
                                      self._ws32_len)
                if rc == 0:
                    return y
                if rc != _E_INPUT:
                    self._check(rc)
        x = self._prep32(x, nan_policy)
        n = x.shape[0]
        y = np.empty((n, self.n_out), np.float32)
        if n == 0:
            return y
        xb = ffi.from_buffer("float[]", x)
        yb = ffi.from_buffer("float[]", y)
        n_in, n_out, m, wl = self.n_in, self.n_out, self._m, self._ws32_len

        def part(a, b):
            self._check(lib.nnp_forward(m, b - a, xb + a * n_in, yb + a * n_out, self._work32(), wl))

        self._run(part, n, threads, self._par_fwd)
        if nan_policy == "propagate":
            _propagate_nonfinite(x, y)
        return y

    def jacobian(self, x, mode: str = "auto", *, nan_policy: str = "raise", threads: int | None = None):
        """``(y [batch, n_out], dy_dx [batch, n_out, n_in])`` float32.

        ``mode``: ``"auto"`` (by shape), ``"forward"`` (cost ~ n_in) or ``"reverse"`` (cost ~ n_out); all give
        the same derivatives up to float32 rounding.
        """
        try:
            cmode = MODES[mode]
        except (KeyError, TypeError):
            raise InputError(f"mode must be one of {tuple(MODES)}, got {mode!r}") from None
        # Fast path for the common small call: a C-contiguous float32 [batch, n_in] array, which as_batch would
        # return unchanged. One C call checks its finiteness (the same rule as as_batch) and computes; on a NaN or
        # infinity it writes nothing and as_batch, below, reports where.
        if type(x) is _ndarray and x.dtype is _F32 and nan_policy == "raise":
            s = x.shape
            if len(s) == 2 and s[1] == self.n_in and 0 < s[0] < self._par_jac[cmode] and x.flags.c_contiguous:
                n = s[0]
                y = _empty((n, self.n_out), _F32)
                dy = _empty((n, self.n_out, self.n_in), _F32)
                try:
                    w = self._local.w32
                except AttributeError:
                    w = self._work32()
                rc = _jacobian_checked(self._m, cmode, n, _from_buffer("float[]", x), _from_buffer("float[]", y),
                                       _from_buffer("float[]", dy), w, self._ws32_len)
                if rc == 0:
                    return y, dy
                if rc != _E_INPUT:
                    self._check(rc)
        x = self._prep32(x, nan_policy)
        n = x.shape[0]
        n_in, n_out, m, wl = self.n_in, self.n_out, self._m, self._ws32_len
        y = np.empty((n, n_out), np.float32)
        dy = np.empty((n, n_out, n_in), np.float32)
        if n == 0:
            return y, dy
        if n < self._par_jac[cmode]:  # fast path: one call, no closures
            self._check(lib.nnp_jacobian(m, cmode, n, ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y),
                                         ffi.from_buffer("float[]", dy), self._work32(), wl))
            if nan_policy == "propagate":
                _propagate_nonfinite(x, y, dy)
            return y, dy
        xb = ffi.from_buffer("float[]", x)
        yb = ffi.from_buffer("float[]", y)
        jb = ffi.from_buffer("float[]", dy)
        jn = n_in * n_out

        def part(a, b):
            self._check(lib.nnp_jacobian(m, cmode, b - a, xb + a * n_in, yb + a * n_out, jb + a * jn,
                                         self._work32(), wl))

        self._run(part, n, threads, self._par_jac[cmode])
        if nan_policy == "propagate":
            _propagate_nonfinite(x, y, dy)
        return y, dy

    def forward_f64(self, x, *, nan_policy: str = "raise", threads: int | None = None) -> np.ndarray:
        """``y [batch, n_out]`` float64 (weights promoted exactly from float32)."""
        x = as_batch(x, self.n_in, name="x", nan_policy=nan_policy, dtype=np.float64, columns=self.input_columns)
        n = x.shape[0]
        y = np.empty((n, self.n_out), np.float64)
        if n == 0:
            return y
        xb = ffi.from_buffer("double[]", x)
        yb = ffi.from_buffer("double[]", y)
        n_in, n_out, m, wl = self.n_in, self.n_out, self._m, self._ws64_len

        def part(a, b):
            self._check(lib.nnp_forward_f64(m, b - a, xb + a * n_in, yb + a * n_out, self._work64(), wl))

        self._run(part, n, threads)
        return y

    def fd_jacobian(self, x, *, nan_policy: str = "raise", threads: int | None = None):
        """float64 finite-difference Jacobian: ``(estimate, error_estimate)``, both ``[batch, n_out, n_in]``.

        Central differences with steps h = cbrt(eps)·max(1, |x_j|) and h/2, Richardson-extrapolated; the error
        estimate is large where a kink of a piecewise activation lies within a step of the point.
        """
        x = as_batch(x, self.n_in, name="x", nan_policy=nan_policy, dtype=np.float64, columns=self.input_columns)
        n = x.shape[0]
        n_in, n_out, m, wl = self.n_in, self.n_out, self._m, self._ws64_len
        est = np.empty((n, n_out, n_in), np.float64)
        err = np.empty((n, n_out, n_in), np.float64)
        if n == 0:
            return est, err
        xb = ffi.from_buffer("double[]", x)
        eb = ffi.from_buffer("double[]", est)
        rb = ffi.from_buffer("double[]", err)
        jn = n_in * n_out

        def part(a, b):
            self._check(lib.nnp_fd_jacobian_f64(m, b - a, xb + a * n_in, ffi.NULL, eb + a * jn, rb + a * jn,
                                                self._work64(), wl))

        # finite differences cost 4 * n_in + 1 forward passes per point: split by that work
        chunks_at = self._so_min_batch("fd_jacobian_f64")
        if n >= chunks_at and (self.threads if threads is None else int(threads)) > 1:
            t = self.threads if threads is None else int(threads)
            parts = min(t, n)
            bounds = np.linspace(0, n, parts + 1).astype(int)
            pool = self._get_pool()
            futures = [pool.submit(part, int(a), int(b)) for a, b in zip(bounds[1:-1], bounds[2:]) if b > a]
            part(0, int(bounds[1]))
            for f in futures:
                f.result()
        else:
            part(0, n)
        return est, err

    # ----- second derivatives ------------------------------------------------------------------------------------
    def _so_call(self, op, fn, x, outs, per_point, threads, extra=None):
        """Run the C function fn(m, count, x, [extra,] *outs, work, work_len) over the batch x (already validated),
        in chunks across threads for large batches; outs are the output arrays (of x's dtype) with per_point values
        each, extra an input array laid out like x."""
        n = x.shape[0]
        if n == 0:
            return
        m, n_in = self._m, self.n_in
        ct = "float[]" if x.dtype is _F32 else "double[]"
        xb = _from_buffer(ct, x)
        eb = None if extra is None else _from_buffer(ct, extra)
        bufs = [_from_buffer(ct, o) for o in outs]
        try:
            min_batch = self._so_min[op]
        except KeyError:
            min_batch = self._so_min[op] = self._so_min_batch(op)
        if n < min_batch:  # one call, no closures (the common small call)
            w, wl = self._so_work(op)
            if eb is None:
                self._check(fn(m, n, xb, *bufs, w, wl))
            else:
                self._check(fn(m, n, xb, eb, *bufs, w, wl))
            return

        def part(a, b):
            w, wl = self._so_work(op)
            ptrs = [o + a * k for o, k in zip(bufs, per_point)]
            if eb is None:
                self._check(fn(m, b - a, xb + a * n_in, *ptrs, w, wl))
            else:
                self._check(fn(m, b - a, xb + a * n_in, eb + a * n_in, *ptrs, w, wl))

        self._run(part, n, threads, min_batch)

    def hessian(self, x, *, nan_policy: str = "raise", threads: int | None = None):
        """``(y [batch, n_out], dy_dx [batch, n_out, n_in], d2y_dx2 [batch, n_out, n_in, n_in])`` float32, with
        ``d2y_dx2[b, i, j, k] = d2 y[b, i] / dx[b, j] dx[b, k]`` (symmetric in j, k).

        Analytic (``nnp_hessian``): second derivatives of piecewise-linear activations are 0, also at their kinks;
        ``csrc/nnp.h`` lists the conventions. Inputs are validated as for :meth:`jacobian`.
        """
        x = self._prep32(x, nan_policy)
        n, n_in, n_out = x.shape[0], self.n_in, self.n_out
        y = np.empty((n, n_out), np.float32)
        dy = np.empty((n, n_out, n_in), np.float32)
        d2 = np.empty((n, n_out, n_in, n_in), np.float32)
        self._so_call("hessian", lib.nnp_hessian, x, (y, dy, d2), (n_out, n_out * n_in, n_out * n_in * n_in),
                      threads)
        if nan_policy == "propagate":
            _propagate_nonfinite(x, y, dy, d2)
        return y, dy, d2

    def laplacian(self, x, *, nan_policy: str = "raise", threads: int | None = None):
        """``(y [batch, n_out], dy_dx [batch, n_out, n_in], lap [batch, n_out])`` float32: ``lap[b, i]`` is the
        trace of the Hessian of output i, computed by one forward-Laplacian pass (``nnp_laplacian``: value, tangents
        and Laplacian carried through each layer; cost ~ n_in, never the full Hessian)."""
        x = self._prep32(x, nan_policy)
        n, n_in, n_out = x.shape[0], self.n_in, self.n_out
        y = np.empty((n, n_out), np.float32)
        dy = np.empty((n, n_out, n_in), np.float32)
        lap = np.empty((n, n_out), np.float32)
        self._so_call("laplacian", lib.nnp_laplacian, x, (y, dy, lap), (n_out, n_out * n_in, n_out), threads)
        if nan_policy == "propagate":
            _propagate_nonfinite(x, y, dy, lap)
        return y, dy, lap

    def hvp(self, x, v, *, nan_policy: str = "raise", threads: int | None = None):
        """``(y [batch, n_out], hvp [batch, n_out, n_in])`` float32 with ``hvp[b, i] = H_i(x[b]) v[b]``, the Hessian
        of output i times the direction ``v[b]`` (``nnp_hvp``: forward over forward along v, cost ~ n_in).

        ``v`` is validated like ``x`` and must have its shape: one direction per point."""
        x = self._prep32(x, nan_policy)
        v = as_batch(v, self.n_in, name="v", nan_policy=nan_policy, columns=self.input_columns)
        if v.shape != x.shape:
            raise InputError(f"v: expected one direction per point, the shape of x {tuple(x.shape)}, "
                             f"got shape {tuple(v.shape)}")
        n, n_in, n_out = x.shape[0], self.n_in, self.n_out
        y = np.empty((n, n_out), np.float32)
        hv = np.empty((n, n_out, n_in), np.float32)
        self._so_call("hvp", lib.nnp_hvp, x, (y, hv), (n_out, n_out * n_in), threads, extra=v)
        if nan_policy == "propagate":
            _propagate_nonfinite(x, y, hv)
            bad_v = ~np.isfinite(v).all(axis=1) if v.size else np.zeros(0, bool)
            if bad_v.any():
                hv[bad_v] = np.nan
        return y, hv

    def fd_hessian(self, x, *, nan_policy: str = "raise", threads: int | None = None):
        """float64 finite-difference Hessian: ``(y [batch, n_out], d2y_dx2 [batch, n_out, n_in, n_in], err)``.

        Central differences of the analytic float64 Jacobian with steps h = cbrt(eps)·max(1, |x_j|) and h/2,
        Richardson-extrapolated, symmetrized; ``err`` (the layout of ``d2y_dx2``) is large where a kink of a
        piecewise activation lies within a step of the point (``nnp_fd_hessian_f64`` in ``csrc/nnp.h``).
        """
        x = as_batch(x, self.n_in, name="x", nan_policy=nan_policy, dtype=np.float64, columns=self.input_columns)
        n, n_in, n_out = x.shape[0], self.n_in, self.n_out
        y = np.empty((n, n_out), np.float64)
        est = np.empty((n, n_out, n_in, n_in), np.float64)
        err = np.empty((n, n_out, n_in, n_in), np.float64)
        hn = n_out * n_in * n_in
        self._so_call("fd_hessian_f64", lib.nnp_fd_hessian_f64, x, (y, est, err), (n_out, hn, hn), threads)
        return y, est, err


__all__ = ["Kernel", "WEIGHTS", "MODES", "NAN_POLICIES", "strerror"]
