"""An independent float64 reference for any ONNX forward graph: the graph promoted to float64 and evaluated by
onnx's own reference implementation (``onnx.reference.ReferenceEvaluator``, numpy), and central finite differences
of it with Richardson extrapolation and a per-entry error estimate.

Neither onnxruntime nor the derivative rules take part, so this is a reference for both the companion graphs
(``nnpartials check`` without a C core, and export-time validation of ONNX input) and the C core::

    ref = Float64Graph(model)              # onnx.ModelProto (float32 weights are promoted exactly)
    y = ref.forward(xs)                    # xs: one array [batch, ...] per graph input; y [batch, n_out] float64
    J, err = ref.fd_jacobian(xs)           # [batch, n_out, n_in] over the flattened, concatenated features

Entries whose error estimate is large sit within a step of a kink of a piecewise function (ReLU and the like),
where no finite difference is meaningful; callers leave them out (see ``tolerances.CHECK_FD_KINK``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from nnpartials.errors import NNPartialsError

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
_DOUBLE = onnx.TensorProto.DOUBLE
#: Relative step of the central differences (as the C core's): h_j = FD_STEP * max(1, |x_j|), and h_j / 2.
FD_STEP = float(np.cbrt(np.finfo(np.float64).eps))
#: Values in one batch of perturbed inputs (bounds memory: 4 perturbations x n_in features x n_in values a point).
FD_CHUNK_VALUES = 1 << 22


def _float64_ops():
    """Overrides of onnx reference kernels that round through float32 (Erf, and so Gelu, which expands to it)."""
    import math

    from onnx.reference.op_run import OpRun

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x):
            return (np.vectorize(math.erf, otypes=[x.dtype])(x),)

    class Gelu(OpRun):  # run as its function body otherwise, whose Erf is the float32 one
        op_domain = ""

        def _run(self, x, approximate="none"):
            if approximate == "tanh":
                k = math.sqrt(2.0 / math.pi)
                return ((0.5 * x * (1.0 + np.tanh(k * (x + 0.044715 * x ** 3)))).astype(x.dtype),)
            erf = np.vectorize(math.erf, otypes=[x.dtype])
            return ((0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(x.dtype),)

    return [Erf, Gelu]


FLOAT64_OPS = None  # built on first use (imports onnx.reference)


def reference_evaluator(model: onnx.ModelProto):
    """``onnx.reference.ReferenceEvaluator`` for ``model`` with kernels that keep float64 precision."""
    global FLOAT64_OPS
    from onnx.reference import ReferenceEvaluator

    if FLOAT64_OPS is None:
        FLOAT64_OPS = _float64_ops()
    return ReferenceEvaluator(model, new_ops=FLOAT64_OPS)


def _promote_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_type not in _FLOATS:
        return t
    arr = numpy_helper.to_array(t).astype(np.float64)
    return numpy_helper.from_array(arr, t.name)


def _promote_type(tp: onnx.TypeProto):
    if tp.HasField("tensor_type") and tp.tensor_type.elem_type in _FLOATS:
        tp.tensor_type.elem_type = _DOUBLE
    elif tp.HasField("sequence_type"):
        _promote_type(tp.sequence_type.elem_type)
    elif tp.HasField("optional_type"):
        _promote_type(tp.optional_type.elem_type)


def _promote_graph(g: onnx.GraphProto):
    for i, t in enumerate(g.initializer):
        g.initializer[i].CopyFrom(_promote_tensor(t))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        _promote_type(vi.type)
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(_promote_tensor(a.t))
            elif a.type == onnx.AttributeProto.GRAPH:
                _promote_graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _promote_graph(sub)
            elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i in _FLOATS:
                a.i = _DOUBLE
            elif a.name == "stash_type" and node.op_type == "GroupNormalization" and a.i in _FLOATS:
                a.i = _DOUBLE  # the precision of the statistics (the reference LayerNormalization uses the input's)
        if node.op_type == "GroupNormalization" and node.domain in ("", "ai.onnx") \
                and not any(a.name == "stash_type" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("stash_type", _DOUBLE))  # default 1 is float32
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for k, a in enumerate(node.attribute):  # value_float(s) would make a float32 tensor
                if a.name == "value_float":
                    new = onnx.helper.make_attribute("value", numpy_helper.from_array(np.array(a.f, np.float64)))
                elif a.name == "value_floats":
                    new = onnx.helper.make_attribute("value",
                                                     numpy_helper.from_array(np.array(list(a.floats), np.float64)))
                else:
                    continue
                node.attribute.pop(k)
                node.attribute.insert(k, new)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float64: float tensors, types, casts and constants promoted."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _promote_graph(m.graph)
    return m


class Float64Graph:
    """A forward ONNX graph evaluated in float64 by ``onnx.reference``; see the module docstring."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        init = {t.name for t in model.graph.initializer}
        self.inputs = [i for i in model.graph.input if i.name not in init]
        self.input_names = [i.name for i in self.inputs]
        try:
            self._ev = reference_evaluator(to_float64(model))
        except Exception as exc:
            raise NNPartialsError(f"the float64 reference cannot evaluate this graph: {type(exc).__name__}: {exc}") \
                from None

    def forward(self, xs) -> np.ndarray:
        """``y [batch, n_out]`` in float64: every output flattened per point, concatenated in graph order."""
        xs = [np.asarray(x, dtype=np.float64) for x in xs]
        if len(xs) != len(self.input_names):
            raise NNPartialsError(f"the graph has inputs {self.input_names}, got {len(xs)} arrays")
        n = xs[0].shape[0]
        try:
            with np.errstate(all="ignore"):
                outs = self._ev.run(None, dict(zip(self.input_names, xs)))
        except Exception as exc:
            raise NNPartialsError(f"the float64 reference failed to evaluate the graph: {type(exc).__name__}: "
                                  f"{exc}") from None
        return np.concatenate([np.asarray(o, dtype=np.float64).reshape(n, -1) for o in outs], axis=1)

    def fd_jacobian(self, xs, chunk_values: int = FD_CHUNK_VALUES):
        """Central differences with steps h and h/2 (h = FD_STEP·max(1, |x_j|)), Richardson-extrapolated.

        Returns ``(J, err)``, both ``[batch, n_out, n_in]`` over the flattened, concatenated input features;
        ``err = |R - D(h/2)|``, the difference between the extrapolated and the plain h/2 estimate."""
        xs = [np.asarray(x, dtype=np.float64) for x in xs]
        n = xs[0].shape[0]
        shapes = [x.shape[1:] for x in xs]
        widths = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        flat = np.concatenate([x.reshape(n, -1) for x in xs], axis=1) if n else np.zeros((0, sum(widths)))
        n_in = flat.shape[1]
        offs = np.concatenate([[0], np.cumsum(widths)]).astype(int)

        def unflatten(rows):
            return [rows[:, offs[k]:offs[k + 1]].reshape((rows.shape[0],) + shapes[k]) for k in range(len(xs))]

        # 4 perturbations per feature: +h, -h, +h/2, -h/2
        pts = max(1, chunk_values // max(1, 4 * n_in * n_in))
        J = err = None
        for s in range(0, n, pts):
            x = flat[s:s + pts]
            b = x.shape[0]
            h = FD_STEP * np.maximum(1.0, np.abs(x))                       # [b, n_in]
            xp = np.repeat(x[:, None, None, :], 4, axis=1).repeat(n_in, axis=2)  # [b, 4, n_in, n_in]
            eye = np.eye(n_in)
            for k, f in enumerate((1.0, -1.0, 0.5, -0.5)):
                xp[:, k] += f * h[:, :, None] * eye[None]
            # the steps actually taken (x + h - x is not h in floating point)
            steps = np.stack([xp[:, 0, j, j] - xp[:, 1, j, j] for j in range(n_in)], axis=1) if n_in else h
            steps2 = np.stack([xp[:, 2, j, j] - xp[:, 3, j, j] for j in range(n_in)], axis=1) if n_in else h
            y = self.forward(unflatten(xp.reshape(b * 4 * n_in, n_in)))
            y = y.reshape(b, 4, n_in, -1)
            d1 = (y[:, 0] - y[:, 1]) / steps[:, :, None]                  # [b, n_in, n_out]
            d2 = (y[:, 2] - y[:, 3]) / steps2[:, :, None]
            r = (4.0 * d2 - d1) / 3.0
            e = np.abs(r - d2)
            if J is None:
                n_out = y.shape[-1]
                J = np.empty((n, n_out, n_in))
                err = np.empty((n, n_out, n_in))
            J[s:s + b] = r.transpose(0, 2, 1)
            err[s:s + b] = e.transpose(0, 2, 1)
        if J is None:
            n_out = self.forward(unflatten(np.zeros((1, n_in)))).shape[1]
            J = np.zeros((0, n_out, n_in))
            err = np.zeros((0, n_out, n_in))
        return J, err


def fd_hessian(jac_model: onnx.ModelProto, xs, kink_tolerance: float = None):
    """``(H [N, n_out, n_in, n_in], keep)``: float64 central differences (Richardson) of a Jacobian graph (outputs
    ``y`` then one ``dy_dx`` per input, as ``model.jac.onnx``), evaluated by the onnx reference implementation in
    float64, over all inputs' flattened features. ``keep`` is the 0/1 mask of the entries whose error estimate shows
    no kink within a step (``err <= kink_tolerance * max(1, max|H|)``, default ``tolerances.CHECK_FD_KINK``)."""
    from nnpartials import tolerances

    if kink_tolerance is None:
        kink_tolerance = tolerances.CHECK_FD_KINK
    n = xs[0].shape[0]
    R, err = Float64Graph(jac_model).fd_jacobian(xs)   # rows: y, then each dy_dx output flattened, in graph order
    n_in = R.shape[2]
    dims = []
    for o in jac_model.graph.output:
        dims.append([d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim])
    n_out = dims[0][1]
    blocks, eblocks, off = [], [], n_out
    for d in dims[1:]:
        rows = n_out * d[2]
        blocks.append(R[:, off:off + rows].reshape(n, n_out, d[2], n_in))
        eblocks.append(err[:, off:off + rows].reshape(n, n_out, d[2], n_in))
        off += rows
    H, E = np.concatenate(blocks, axis=2), np.concatenate(eblocks, axis=2)
    scale = max(1.0, float(np.max(np.abs(H)))) if H.size else 1.0
    return H, (E <= kink_tolerance * scale).astype(np.float64)


__all__ = ["Float64Graph", "to_float64", "reference_evaluator", "fd_hessian", "FD_STEP"]
