"""Batched partials with onnxruntime: :class:`Partials`."""

from __future__ import annotations

import os
import threading

import numpy as np

from nnpartials.errors import BundleError, InputError, NNPartialsError, OrderNotAvailableError
from nnpartials.bundle import FORWARD, JACOBIAN, SECOND_ORDER_FILES, load_bundle
from nnpartials.validate import as_batch

#: The most points handed to onnxruntime in one call by default; larger inputs are split (bounded memory).
DEFAULT_MAX_BATCH = 65536
#: On the CPU, by default, a call gets as many points as keep the graph's intermediate tensors (their sizes summed over
#: the graph, per point, from ONNX shape inference) within this many bytes: rounded down to a multiple of
#: AUTO_BATCH_STEP, at least AUTO_BATCH_STEP, at most DEFAULT_MAX_BATCH. Beyond a few tens of MiB a call's tensors no
#: longer stay in cache and its elementwise passes wait on memory: on the benchmark suite's wide network (64 -> 2 x 256
#: gelu -> 1; 25 KiB of tensors per point in its Jacobian graph) 262,144 points ran at 244k points/s in calls of 65,536
#: (peak 1.29 GiB) and 435k points/s in the default calls of 2,048 (332 MiB): benchmarks/CALL_SIZE.md.
CALL_BYTES_BUDGET = 64 * 2 ** 20
AUTO_BATCH_STEP = 1024
#: Changes between forward and jacobian calls after which a Partials stops its sessions' threads from spinning
#: between calls (see Partials._session).
ALTERNATIONS_BEFORE_QUIET = 2
BACKENDS = ("onnxruntime", "c")


#: Provider options set unless the caller gives them. onnxruntime's CUDA provider multiplies float32 matrices in
#: TF32 (a 10-bit mantissa) by default on Ampere and newer GPUs: on an H200 the seed network's Jacobian came out with a
#: scaled error of 0.043 against float64 that way (the CPU provider: 1.3e-7), the physics network's 2.4e-4; with
#: use_tf32 = 0 both were within 2.3e-7, as on the CPU.
PROVIDER_DEFAULTS = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def with_provider_defaults(providers) -> list:
    """``providers`` (names or (name, options) pairs) with ``PROVIDER_DEFAULTS`` filled in where the caller's options
    do not set them: a name becomes a (name, options) pair where it has defaults; the caller's options win."""
    out = []
    for p in providers:
        name, opts = (p[0], dict(p[1])) if isinstance(p, tuple) else (p, {})
        for k, v in PROVIDER_DEFAULTS.get(name, {}).items():
            opts.setdefault(k, v)
        out.append((name, opts) if opts else name)
    return out


def resolve_providers(providers):
    """Map ``None``/"cpu"/"cuda"/a list to onnxruntime providers, checking they are available, with
    ``PROVIDER_DEFAULTS`` filled in (the CUDA provider without TF32 unless the caller's options ask for it)."""
    import onnxruntime as ort

    if providers is None or providers == "cpu":
        return ["CPUExecutionProvider"]
    if providers == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    missing = [p for p in names if p not in available]
    if missing:
        hint = " (install the [cuda] extra: pip install 'nnpartials[cuda]')" if "CUDAExecutionProvider" in missing else ""
        raise NNPartialsError(f"onnxruntime providers {missing} are not available; available: {available}{hint}")
    return with_provider_defaults(providers)


def graph_bytes_per_point(model) -> int | None:
    """Bytes per point of all the batch-sized tensors of an ONNX graph (``model``: ModelProto or serialized bytes),
    summed over every value of the graph after ONNX shape inference: an upper bound on what one call holds per
    point. None where some such tensor has a size shape inference cannot tell (then no estimate is made)."""
    import onnx
    from onnx import shape_inference

    try:
        proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else model
        proto = shape_inference.infer_shapes(proto)
    except Exception:
        return None
    batch_dims = {d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim[:1] if d.dim_param}
    total = 0
    for vi in list(proto.graph.value_info) + list(proto.graph.output):
        tt = vi.type.tensor_type
        dims = tt.shape.dim
        if not dims or not dims[0].dim_param or dims[0].dim_param not in batch_dims:
            continue  # constants and per-model tensors: not per point
        size = 1
        for d in dims[1:]:
            if not d.HasField("dim_value"):
                return None
            size *= d.dim_value
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
        except Exception:
            return None
        total += size * item
    return total or None


def auto_max_batch(bytes_per_point: int | None) -> int:
    """The default points per call for a graph with ``bytes_per_point`` (see CALL_BYTES_BUDGET)."""
    if not bytes_per_point:
        return DEFAULT_MAX_BATCH
    n = CALL_BYTES_BUDGET // int(bytes_per_point) // AUTO_BATCH_STEP * AUTO_BATCH_STEP
    return int(min(DEFAULT_MAX_BATCH, max(AUTO_BATCH_STEP, n)))


class Partials:
    """Serve ``y`` and ``dy_dx`` for a bundle.

    ``Partials(bundle, providers=None, max_batch=None, backend="onnxruntime", nan_policy="raise")``

    * ``bundle``: a bundle folder (or a :class:`~nnpartials.bundle.Bundle`); hashes are verified.
    * ``providers``: as in onnxruntime (list of names), or ``"cpu"``/``"cuda"``; CPU by default.
    * ``max_batch``: larger inputs are split into chunks of this many points. None (the default): chosen per graph
      on the CPU so that one call's tensors stay within ``CALL_BYTES_BUDGET`` (64 MiB; between 1,024 and 65,536
      points; :meth:`batch_limit`), 65,536 with the CUDA provider. Results do not depend on it.
    * ``backend="c"`` evaluates with the C core (:class:`nnpartials.runtime.kernel.Kernel`) instead.

    Inputs: one array ``[batch, n_in]`` (for several model inputs, their features concatenated in manifest
    order), or a list/dict of per-input arrays; numpy arrays, lists or pandas DataFrames; an input of higher
    rank (an image [batch, H, W, C]) may also be given in its own shape. Inputs are converted to the model's
    precision (float32, or float64 for a float64 model). Outputs: ``y [batch, n_out]`` and
    ``dy_dx [batch, n_out, n_in]`` over the flattened (C-order) features, ``dy_dx[b, i, j] = d y[b, i] / d x[b, j]``
    (``shaped=True``: in the inputs' and outputs' own shapes). Instances are safe to share between threads.
    """

    def __init__(self, bundle, providers=None, *, max_batch: int | None = None, backend: str = "onnxruntime",
                 nan_policy: str = "raise", session_options=None, threads: int | None = None, key=None):
        if backend not in BACKENDS:
            raise NNPartialsError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_batch is not None and (not isinstance(max_batch, (int, np.integer)) or isinstance(max_batch, bool)
                                      or max_batch < 1):
            raise InputError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.bundle = load_bundle(bundle, key=key)
        m = self.bundle.manifest
        self.input_names = [i["name"] for i in m["inputs"]]
        self.input_widths = [int(i["shape"][1]) for i in m["inputs"]]
        self.n_in = sum(self.input_widths)
        self._offsets = np.concatenate([[0], np.cumsum(self.input_widths)]).astype(int)
        #: per-point shape of each input (tensor_shape in the manifest; [width] for a flat input)
        self.input_shapes = [tuple(i.get("tensor_shape", ["batch", w])[1:])
                             for i, w in zip(m["inputs"], self.input_widths)]
        self._sessions_outputs = m.get("outputs", [])
        #: (name, per-point shape) of each model output
        self.output_shapes = [(o["name"], tuple(o.get("tensor_shape", ["batch", o["width"]])[1:]))
                              for o in self._sessions_outputs] or [("y", (self.bundle.n_out,))]
        #: the precision the model computes and is served in (float32, or float64 for a float64 model)
        self.dtype = np.dtype(m["inputs"][0].get("dtype", "float32"))
        self.n_out = self.bundle.n_out
        self.input_columns = self.bundle.input_columns
        self._input_cols = [list(i.get("columns") or []) or None for i in m["inputs"]]
        self.output_columns = self.bundle.output_columns
        self.mode = m["jacobian"]["mode"]
        #: the caller's max_batch (None: chosen per graph, see batch_limit)
        self.max_batch = None if max_batch is None else int(max_batch)
        self._limits = {}
        self.nan_policy = nan_policy
        self.backend = backend
        self._kernel = None
        self._sessions = {}
        self._own_options, self._threads = True, threads
        self._last_kind, self._alternations, self._quiet = None, 0, False
        self._rebuild_lock = threading.Lock()
        if backend == "c":
            from nnpartials.runtime.kernel import Kernel

            self._kernel = Kernel(self.bundle, threads=threads)
            self.providers = []
        else:
            self.providers = resolve_providers(providers)
            self._own_options = session_options is None
            self._sessions = self._make_sessions(session_options, stop_spinning=False)

    # ----- onnxruntime sessions ----------------------------------------------------------------------------------
    def _make_sessions(self, session_options, stop_spinning: bool) -> dict:
        import onnxruntime as ort

        so = session_options
        if so is None:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self._threads:
                so.intra_op_num_threads = int(self._threads)
            if stop_spinning:
                so.add_session_config_entry("session.force_spinning_stop", "1")
        self._session_options = so
        kinds = ["forward", "jacobian"] + [k for k in SECOND_ORDER_FILES if k in getattr(self, "_sessions", {})]
        return {kind: self._load_session(kind, so) for kind in kinds}

    def _load_session(self, kind, so):
        import onnxruntime as ort

        name = {"forward": FORWARD, "jacobian": JACOBIAN, **SECOND_ORDER_FILES}[kind]
        try:
            return ort.InferenceSession(self.bundle.read(name), sess_options=so, providers=self.providers)
        except NNPartialsError:
            raise
        except Exception as exc:
            raise BundleError(f"onnxruntime could not load {name} of the bundle {self.bundle.path!r}: {exc}") from None

    def _session(self, kind):
        """The session for ``kind``. Each session's thread pool spins for a while after a call; when forward and
        jacobian calls alternate, one session's spinning threads take the cores the other needs (at 100,000 points
        a Jacobian right after a forward call took 80 ms instead of 55). After ``ALTERNATIONS_BEFORE_QUIET`` changes
        of kind, both sessions are rebuilt once with ``session.force_spinning_stop`` (56 ms there); a caller of one
        kind only keeps the default, which is faster at mid-size batches. Sessions made from the caller's own
        ``session_options`` are left as they are."""
        if self._last_kind is not None and kind != self._last_kind and self._own_options and not self._quiet:
            self._alternations += 1
            if self._alternations >= ALTERNATIONS_BEFORE_QUIET:
                with self._rebuild_lock:
                    if not self._quiet:
                        self._sessions = self._make_sessions(None, stop_spinning=True)
                        self._quiet = True
        self._last_kind = kind
        sess = self._sessions.get(kind)
        if sess is None:  # a second-order graph, loaded on first use
            with self._rebuild_lock:
                sess = self._sessions.get(kind)
                if sess is None:
                    sess = self._sessions[kind] = self._load_session(kind, self._session_options)
        return sess

    def batch_limit(self, kind: str = "jacobian") -> int:
        """The most points of one onnxruntime call for graph ``kind`` ("forward", "jacobian", "hessian",
        "laplacian", "hvp"): ``max_batch`` when given, else :meth:`auto_batch_limit`."""
        return self.max_batch if self.max_batch is not None else self.auto_batch_limit(kind)

    def _call_size(self, kind: str, n: int) -> int:
        """Points per onnxruntime call for ``n`` points of graph ``kind``: the batch limit, found only when it can
        matter (n above the smallest automatic size, or a max_batch given), so small calls skip shape inference."""
        if n > AUTO_BATCH_STEP or self.max_batch is not None:
            return self.batch_limit(kind)
        return max(n, 1)

    def auto_batch_limit(self, kind: str = "jacobian") -> int:
        """The default points per call for graph ``kind``: from the graph's tensor sizes (``CALL_BYTES_BUDGET``) on
        the CPU, DEFAULT_MAX_BATCH with other providers (a GPU wants large calls)."""
        lim = self._limits.get(kind)
        if lim is None:
            first = self.providers[0] if self.providers else "CPUExecutionProvider"
            if (first[0] if isinstance(first, tuple) else first) != "CPUExecutionProvider":
                lim = DEFAULT_MAX_BATCH
            else:
                name = {"forward": FORWARD, "jacobian": JACOBIAN, **SECOND_ORDER_FILES}[kind]
                lim = auto_max_batch(graph_bytes_per_point(self.bundle.read(name)))
            self._limits[kind] = lim
        return lim

    @property
    def active_providers(self):
        """Providers onnxruntime actually uses for the Jacobian session."""
        return self._sessions["jacobian"].get_providers() if self._sessions else ["C core"]

    # ----- input handling -------------------------------------------------------------------------------------
    def _flat(self, x, k):
        """An array given in input k's own shape ([batch, *shape] or one point [*shape]) as [batch, width]."""
        shape = self.input_shapes[k]
        if len(shape) > 1 and isinstance(x, np.ndarray):
            if x.ndim == 1 + len(shape) and tuple(x.shape[1:]) == shape:
                return x.reshape(x.shape[0], -1)
            if x.ndim == len(shape) and tuple(x.shape) == shape:
                return x.reshape(1, -1)
        return x

    def _inputs(self, x, nan_policy):
        policy = nan_policy or self.nan_policy
        cols, dt = self._input_cols, self.dtype
        if isinstance(x, dict):
            unknown = [k for k in x if k not in self.input_names]
            missing = [n for n in self.input_names if n not in x]
            if missing or unknown:
                raise InputError(f"inputs by name: expected the keys {self.input_names}, got {list(x)}"
                                 + (f" (missing {missing})" if missing else "")
                                 + (f" (unknown {unknown})" if unknown else ""))
            parts = [as_batch(self._flat(x[n], k), w, name=n, nan_policy=policy, columns=c, dtype=dt)
                     for k, (n, w, c) in enumerate(zip(self.input_names, self.input_widths, cols))]
        elif len(self.input_names) == 1:
            return [as_batch(self._flat(x, 0), self.n_in, name="x", nan_policy=policy, columns=cols[0], dtype=dt)]
        elif isinstance(x, (list, tuple)) and len(x) == len(self.input_names) \
                and all(np.ndim(p) >= 2 or (np.ndim(p) == 1 and len(p) == w) for p, w in zip(x, self.input_widths)) \
                and not all(np.ndim(p) == 1 and len(x) == self.n_in for p in x):
            parts = [as_batch(self._flat(p, k), w, name=n, nan_policy=policy, columns=c, dtype=dt)
                     for k, (p, n, w, c) in enumerate(zip(x, self.input_names, self.input_widths, cols))]
        else:
            arr = as_batch(x, self.n_in, name="x", nan_policy=policy, columns=self.input_columns, dtype=dt)
            parts = np.split(arr, self._offsets[1:-1], axis=1)
        rows = {p.shape[0] for p in parts}
        if len(rows) != 1:
            raise InputError(f"inputs have different batch sizes {[p.shape[0] for p in parts]}")
        return [np.ascontiguousarray(p) for p in parts]

    def _feeds(self, parts, s=0, e=None):
        """onnxruntime feeds for rows [s, e): each input in its own shape."""
        out = {}
        for nm, p, sh in zip(self.input_names, parts, self.input_shapes):
            q = p[s:e] if (s or e is not None) else p
            out[nm] = q if len(sh) == 1 else q.reshape((q.shape[0],) + sh)
        return out

    # ----- evaluation ------------------------------------------------------------------------------------------
    def forward(self, x, *, nan_policy: str | None = None, shaped: bool = False):
        """``y [batch, n_out]`` (in the model's precision, float32 unless the model is float64).

        ``shaped=True``: ``y [batch, *output shape]`` for a model with one output, a dict by output name otherwise."""
        parts = self._inputs(x, nan_policy)
        if self._kernel is not None:
            y = self._kernel.forward(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0],
                                     nan_policy="propagate")
            return self._shape_y(y) if shaped else y
        n = parts[0].shape[0]
        sess = self._session("forward")
        mb = self._call_size("forward", n)
        if 0 < n <= mb and len(self._sessions_outputs) == 1:
            y = sess.run(None, self._feeds(parts))[0].reshape(n, self.n_out)
            return self._shape_y(y) if shaped else y
        y = np.empty((n, self.n_out), self.dtype)
        for s in range(0, n, mb):
            outs = sess.run(None, self._feeds(parts, s, s + mb))
            y[s:s + mb] = np.concatenate([o.reshape(o.shape[0], -1) for o in outs], axis=1)
        return self._shape_y(y) if shaped else y

    def jacobian(self, x, *, nan_policy: str | None = None, shaped: bool = False):
        """``(y [batch, n_out], dy_dx [batch, n_out, n_in])`` over the flattened (C-order) features, in the model's
        precision.

        ``shaped=True`` gives each output and input its own shape: for one input and one output,
        ``y [batch, *out_shape]`` and ``dy_dx [batch, *out_shape, *in_shape]``; otherwise dicts, ``y`` by output
        name and ``dy_dx`` by ``(output name, input name)``."""
        y, dy = self._jacobian(x, nan_policy)
        return self._shape_jacobian(y, dy) if shaped else (y, dy)

    def _jacobian(self, x, nan_policy):
        parts = self._inputs(x, nan_policy)
        if self._kernel is not None:
            return self._kernel.jacobian(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0],
                                         nan_policy="propagate")
        n = parts[0].shape[0]
        sess = self._session("jacobian")
        mb = self._call_size("jacobian", n)
        if 0 < n <= mb:  # one call: onnxruntime's fresh output arrays are returned as they are
            outs = sess.run(None, self._feeds(parts))
            return outs[0], (outs[1] if len(outs) == 2 else np.concatenate(outs[1:], axis=2))
        y = np.empty((n, self.n_out), self.dtype)
        dy = np.empty((n, self.n_out, self.n_in), self.dtype)
        offs = self._offsets
        for s in range(0, n, mb):
            outs = sess.run(None, self._feeds(parts, s, s + mb))
            y[s:s + mb] = outs[0]
            for k, j in enumerate(outs[1:]):
                dy[s:s + mb, :, offs[k]:offs[k + 1]] = j
        return y, dy

    # ----- second derivatives -----------------------------------------------------------------------------------
    def _require_order2(self, what):
        if self.bundle.order < 2:
            raise OrderNotAvailableError(
                f"{what}: bundle {self.bundle.path!r} was exported without second derivatives; export it again with "
                f"`nnpartials export MODEL -o BUNDLE --order 2` (Python: export(..., order=2))")

    def _run_second(self, kind, parts, extra, shapes):
        """Run the ``kind`` graph over ``parts`` in chunks of ``batch_limit(kind)``; ``shapes``: per-point shape of
        each output, which are written into preallocated arrays when the batch is split."""
        n = parts[0].shape[0]
        sess = self._session(kind)
        mb = self._call_size(kind, n)
        if 0 < n <= mb:
            return sess.run(None, dict(self._feeds(parts), **{k: v for k, v in extra.items()}))
        outs = [np.empty((n,) + sh, self.dtype) for sh in shapes]
        for s in range(0, n, mb):
            res = sess.run(None, dict(self._feeds(parts, s, s + mb),
                                      **{k: v[s:s + mb] for k, v in extra.items()}))
            for o, r in zip(outs, res):
                o[s:s + mb] = r
        return outs

    def _x_for_kernel(self, parts):
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def hessian(self, x, *, nan_policy: str | None = None):
        """``(y [batch, n_out], dy_dx [batch, n_out, n_in], d2y_dx2 [batch, n_out, n_in, n_in])`` with
        ``d2y_dx2[b, i, j, k] = d2 y[b, i] / dx[b, j] dx[b, k]`` over all inputs' flattened features (symmetric in j,
        k). Needs a bundle exported with ``order=2`` (:class:`OrderNotAvailableError` otherwise). For a
        piecewise-linear network (``bundle.second_derivatives_vanish``) it is zero almost everywhere."""
        self._require_order2("hessian")
        parts = self._inputs(x, nan_policy)
        if self._kernel is not None:
            return self._kernel.hessian(self._x_for_kernel(parts), nan_policy="propagate")
        no, ni = self.n_out, self.n_in
        y, dy, h = self._run_second("hessian", parts, {}, [(no,), (no, ni), (no, ni, ni)])
        return y, dy, h

    def laplacian(self, x, *, nan_policy: str | None = None):
        """``(y [batch, n_out], dy_dx [batch, n_out, n_in], laplacian [batch, n_out])``, the Laplacian being the
        trace of each output's Hessian over all input features, computed without the full Hessian (a
        forward-Laplacian pass; the manifest's ``second_order.laplacian.method``). Needs an ``order=2`` bundle."""
        self._require_order2("laplacian")
        parts = self._inputs(x, nan_policy)
        if self._kernel is not None:
            return self._kernel.laplacian(self._x_for_kernel(parts), nan_policy="propagate")
        no, ni = self.n_out, self.n_in
        y, dy, lap = self._run_second("laplacian", parts, {}, [(no,), (no, ni), (no,)])
        return y, dy, lap

    def hvp(self, x, v, *, nan_policy: str | None = None):
        """``(y [batch, n_out], hvp [batch, n_out, n_in])`` with ``hvp[b, i] = H_i(x[b]) @ v[b]``, the Hessian of
        output i times the direction ``v [batch, n_in]`` (one direction per point, over all inputs' flattened
        features; a single ``[n_in]`` direction is used for every point). Costs a few Jacobians, not a Hessian.
        Needs an ``order=2`` bundle."""
        self._require_order2("hvp")
        parts = self._inputs(x, nan_policy)
        n = parts[0].shape[0]
        policy = nan_policy or self.nan_policy
        varr = np.asarray(v) if not hasattr(v, "to_numpy") else v
        if np.ndim(varr) == 1 and n != 1 and np.shape(varr)[0] == self.n_in:
            varr = np.broadcast_to(np.asarray(varr, self.dtype), (n, self.n_in))
        vv = as_batch(varr, self.n_in, name="v", nan_policy=policy, dtype=self.dtype)
        if vv.shape[0] != n:
            raise InputError(f"v: expected {n} directions (one per point of x) or one [{self.n_in}] direction, got "
                             f"{vv.shape[0]} rows")
        vv = np.ascontiguousarray(vv)
        if self._kernel is not None:
            return self._kernel.hvp(self._x_for_kernel(parts), vv, nan_policy="propagate")
        vname = self.bundle.manifest["second_order"]["hvp"]["input"]
        y, hv = self._run_second("hvp", parts, {vname: vv}, [(self.n_out,), (self.n_out, self.n_in)])
        return y, hv

    def _shape_y(self, y):
        n = y.shape[0]
        if len(self.output_shapes) == 1:
            return y.reshape((n,) + self.output_shapes[0][1])
        out, off = {}, 0
        for name, sh in self.output_shapes:
            w = int(np.prod(sh, dtype=np.int64))
            out[name] = y[:, off:off + w].reshape((n,) + sh)
            off += w
        return out

    def _shape_jacobian(self, y, dy):
        n = y.shape[0]
        if len(self.output_shapes) == 1 and len(self.input_names) == 1:
            osh = self.output_shapes[0][1]
            return y.reshape((n,) + osh), dy.reshape((n,) + osh + self.input_shapes[0])
        blocks, off = {}, 0
        for oname, osh in self.output_shapes:
            w = int(np.prod(osh, dtype=np.int64))
            for k, (iname, ish) in enumerate(zip(self.input_names, self.input_shapes)):
                blk = dy[:, off:off + w, self._offsets[k]:self._offsets[k + 1]]
                blocks[(oname, iname)] = blk.reshape((n,) + osh + ish)
            off += w
        return self._shape_y(y), blocks

    def jacobian_by_input(self, x, **kw):
        """``(y, {input_name: dy_dx_k [batch, n_out, n_k]})`` for models with several inputs."""
        y, dy = self.jacobian(x, **kw)
        offs = np.concatenate([[0], np.cumsum(self.input_widths)])
        return y, {n: dy[:, :, offs[k]:offs[k + 1]] for k, n in enumerate(self.input_names)}

    def __repr__(self):
        return (f"Partials({os.path.basename(self.bundle.path)!r}, n_in={self.n_in}, n_out={self.n_out}, "
                f"mode={self.mode!r}, backend={self.backend!r}, providers={self.providers})")
