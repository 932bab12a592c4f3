"""Lower a forward ONNX graph of a dense network to the C core's weight file (``model.nnp``).

The subset: one float input ``[batch, n_in]``; a chain of affine maps (MatMul, Gemm, Add/Sub/Mul/Div/Neg with
constants, BatchNormalization, Identity/Cast/shape no-ops) separated by elementwise activations; one output,
or several outputs that are all affine maps of the same last hidden layer (they are concatenated in order).

How it works. Every variable tensor is tracked as an affine function ``h @ A + c`` of the current hidden layer
``h`` (at first the input ``x``); affine ops just update ``(A, c)``, so normalization layers, biases and
batch normalization fold into the neighbouring dense layer. An op that is not affine starts an *activation
region*: the smallest set of elementwise nodes, fed only by affine functions of ``h``, whose only tensor used
outside is one output. A single-node region of a known activation op (Relu, LeakyRelu, Elu, Selu, Tanh,
Sigmoid, Softplus, Softsign, Exp, Clip, HardSigmoid) is mapped by its attributes. A multi-node region (swish,
gelu, the tanh approximation of gelu, an ELU written with Where, ...) is identified by structure and numbers:
all its inputs must be per-unit affine functions of one pre-activation ``z``; the region is evaluated on a grid
of ``z`` values with onnxruntime and compared with every activation of the format (fitting alpha, scale, slope
and offset from the values). Its output becomes the next hidden layer.

Values do not fix the derivative at a kink (Keras's PReLU, relu(z) - a * relu(-z), has the values of leaky_relu(a)
but slope 0 at 0; Max(z, 0) those of relu but slope 1 at 0), so every region is then checked there: the region's
companion Jacobian (the derivative rules of the bundle's Jacobian graph) is evaluated with onnxruntime exactly at
the kinks and compared with the C activation's derivative; a region whose kinks no C activation reproduces is
not lowered (see ``_Lowerer._check_kinks``).

Anything else raises :class:`~nnpartials.errors.NotLowerableError` with the reason (op and node). The result is
checked against onnxruntime on random points before it is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nnpartials.errors import NotLowerableError
from nnpartials.exporter.nnp import SELU_ALPHA, SELU_SCALE, Layer, forward_ref, write_nnp

#: Ops allowed inside an activation region (elementwise, broadcasting over the batch only through constants).
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Exp", "Log", "Tanh", "Sigmoid", "Erf", "Relu", "LeakyRelu",
    "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Clip", "Sqrt", "Reciprocal",
    "Identity", "Cast", "Not", "Sign", "Max", "Min", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal",
    "And", "Or", "Where", "Sin", "Cos", "Atan", "Mish", "ThresholdedRelu", "Floor", "Ceil", "Round", "Gelu",
}
#: Layer ops that are not dense: a graph holding one is outside the C core, and the reason names them.
_NOT_DENSE = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
              "Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
              "Einsum", "Resize", "Gather", "GatherElements", "LSTM", "GRU", "RNN", "Attention", "ReduceMax",
              "ReduceMin", "Pad", "Tile"}
#: Single-node activations mapped by attributes.
SIMPLE = {"Relu", "LeakyRelu", "Elu", "Selu", "Tanh", "Sigmoid", "Softplus", "Softsign", "Exp", "Clip", "HardSigmoid",
          "Gelu"}
#: Tolerance of the numeric identification (float32 evaluation), relative to max(1, |f|).
MATCH_TOL = 2e-5
#: Tolerance of the final check against onnxruntime, relative to max(1, max |y|).
CHECK_TOL = 1e-4

#: Tolerance of the derivative check at the kinks, relative to max(1, |slope|): the slopes there are simple
#: numbers (0, 1, alpha, scale) that both sides compute to float32 rounding; a different convention differs by far more.
KINK_TOL = 2e-5

_GRID = np.concatenate([np.linspace(-8.0, 8.0, 641), [-1e-3, -1e-6, 1e-6, 1e-3, 0.0]]).astype(np.float32)


@dataclass
class _Aff:
    """A tensor equal to ``h @ A + c`` for hidden layer number ``hid``."""

    A: np.ndarray  # [w_h, w] float64
    c: np.ndarray  # [w] float64
    hid: int

    @property
    def width(self):
        return self.A.shape[1]


def _fail(msg):
    raise NotLowerableError(f"not in the C-core subset: {msg}")


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _nd(node):
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def _kinks(act, p0, p1):
    """The kinks of a C activation (where its derivative is a convention), as float32 values."""
    if act in ("relu", "leaky_relu", "elu", "selu"):
        return [0.0]
    if act == "relu6":
        return [0.0, 6.0]
    if act == "hard_sigmoid" and p0 != 0:
        return sorted(float(np.float32(v)) for v in (-p1 / p0, (1.0 - p1) / p0))
    return []


def _c_slope(act, p0, p1, v, fused=False):
    """The C core's derivative of an activation at float32 pre-activations v (``act_d_f32`` in csrc/nnp_kernels.h: the
    same branch conditions, in float32, so a kink gets the C core's convention), as float64. fused: hard_sigmoid's
    ``p0 * v + p1`` as one fused multiply-add (the C core is built with -ffp-contract=fast, and its AVX2+FMA build
    contracts it) instead of two roundings."""
    v = np.asarray(v, np.float32)
    f0, f1 = np.float32(p0), np.float32(p1)
    x = v.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if act == "linear":
            return np.ones_like(x)
        if act == "relu":
            return np.where(v > 0, 1.0, 0.0)
        if act == "leaky_relu":
            return np.where(v > 0, 1.0, float(f0))
        if act == "elu":
            return np.where(v > 0, 1.0, float(f0) * np.exp(np.minimum(x, 0.0)))
        if act == "selu":
            return np.where(v < 0, float(f1) * float(f0) * np.exp(np.minimum(x, 0.0)), float(f1))
        if act == "hard_sigmoid":
            if fused:  # f0 * v is exact in float64; the sum is rounded once more there, then to float32
                t = (np.float64(f0) * x + np.float64(f1)).astype(np.float32)
            else:
                t = f0 * v + f1
            return np.where((t > 0) & (t < 1), float(f0), 0.0)
        if act == "relu6":
            return np.where((v > 0) & (v < 6), 1.0, 0.0)
        if act == "tanh":
            return 1.0 - np.tanh(x) ** 2
        if act == "sigmoid":
            s = 1.0 / (1.0 + np.exp(-x))
            return s * (1.0 - s)
        if act == "softplus":
            return 1.0 / (1.0 + np.exp(-x))
        if act == "softsign":
            return 1.0 / (1.0 + np.abs(x)) ** 2
        if act == "swish":
            s = 1.0 / (1.0 + np.exp(-x))
            return s * (1.0 + x * (1.0 - s))
        if act == "gelu":
            from nnpartials.exporter.nnp import _erf_np

            return 0.5 * (1.0 + _erf_np(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        if act == "gelu_tanh":
            k, c = math.sqrt(2.0 / math.pi), 0.044715
            t = np.tanh(k * (x + c * x ** 3))
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * c * x * x)
        if act == "exponential":
            return np.exp(x)
    raise ValueError(f"unknown activation {act!r}")


#: C activations with the same values as another but a different derivative at a kink, tried in this order when
#: the graph's convention is not the first's: max(z, 0) with slope 1 at 0 (Max(z, 0), a tie going to z) is
#: selu(alpha=0, scale=1), whose z >= 0 branch holds at 0.
_EQUIVALENT = {"relu": [("selu", 0.0, 1.0)]}


def _act_desc(act, p0, p1):
    if act in ("leaky_relu", "elu"):
        return f"{act}(alpha={p0:g})"
    if act == "selu":
        return f"selu(alpha={p0:g}, scale={p1:g})"
    if act == "hard_sigmoid":
        return f"hard_sigmoid(slope={p0:g}, offset={p1:g})"
    return act


def _fmt(vals):
    return ", ".join(f"{v:g}" for v in vals)


class _Lowerer:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.g = g
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        init_names = set(self.consts)
        inputs = [i for i in g.input if i.name not in init_names]
        if len(inputs) != 1:
            _fail(f"the graph has {len(inputs)} inputs {[i.name for i in inputs]}; the C core takes one "
                  f"[batch, n_in] input")
        inp = inputs[0]
        tt = inp.type.tensor_type
        if tt.elem_type != onnx.TensorProto.FLOAT:
            _fail(f"input {inp.name!r} is not float32")
        dims = tt.shape.dim
        layers = sorted({n.op_type for n in g.node} & _NOT_DENSE)
        if layers:
            _fail(f"the graph has {', '.join(layers)} layers; the C core evaluates chains of dense layers with "
                  f"elementwise activations")
        if len(dims) != 2 or not dims[1].HasField("dim_value") or dims[1].dim_value < 1:
            _fail(f"input {inp.name!r} must have shape [batch, n_in] with a known n_in")
        self.input_name = inp.name
        self.n_in = int(dims[1].dim_value)
        self.outputs = [o.name for o in g.output]
        if not self.outputs:
            _fail("the graph has no outputs")
        self.nodes = list(g.node)
        self.consumers = {}
        for k, n in enumerate(self.nodes):
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(k)
        self.aff = {self.input_name: _Aff(np.eye(self.n_in), np.zeros(self.n_in), 0)}
        self.hid = 0
        self.width = self.n_in
        self.layers: list[Layer] = []
        self.pending = None  # (pre-activation _Aff, act, p0, p1) of the region that made the current hidden

    # ----- constants -------------------------------------------------------------------------------------------
    def _fold_const(self, node):
        """Evaluate a node whose inputs are all constants."""
        if node.op_type == "Constant":
            a = _attrs(node)
            if "value" in a:
                return [numpy_helper.to_array(a["value"])]
            for key in ("value_float", "value_int"):
                if key in a:
                    return [np.array(a[key])]
            for key in ("value_floats", "value_ints"):
                if key in a:
                    return [np.array(a[key])]
            _fail(f"unsupported Constant attribute in {_nd(node)}")
        from onnx.reference import ReferenceEvaluator

        ins = [n for n in node.input if n]
        graph = helper.make_graph(
            [node], "fold",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(self.consts[n].dtype),
                                           self.consts[n].shape) for n in ins],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        try:
            return ReferenceEvaluator(m).run(None, {n: self.consts[n] for n in ins})
        except Exception as exc:
            _fail(f"could not fold the constant {_nd(node)}: {exc}")

    def _colvec(self, arr, width, node):
        """A constant that broadcasts per column of a [batch, width] tensor, as a float64 [width] vector."""
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim > 2 or (a.ndim == 2 and a.shape[0] != 1):
            _fail(f"{_nd(node)} combines a [batch, {width}] tensor with a constant of shape {a.shape}")
        v = a.reshape(-1)
        if v.size == 1:
            return np.full(width, float(v[0]))
        if v.size != width:
            _fail(f"{_nd(node)}: constant of shape {a.shape} does not broadcast over {width} units")
        return v.copy()

    # ----- affine ops ------------------------------------------------------------------------------------------
    def _var(self, name, node):
        """The affine form of a variable input, checking that it belongs to the current hidden layer."""
        a = self.aff.get(name)
        if a is None:
            return None
        if a.hid != self.hid:
            _fail(f"{_nd(node)} uses tensor {name!r} from before the last activation (a skip/residual connection)")
        return a

    def _try_affine(self, node):
        """Apply node if it is affine in the current hidden layer; return True when handled."""
        op = node.op_type
        ins = list(node.input)
        var = [n for n in ins if n and n in self.aff]
        if not var:
            return False
        if op in ("Identity",) or (op == "Cast" and _attrs(node).get("to") == onnx.TensorProto.FLOAT):
            self.aff[node.output[0]] = self._var(ins[0], node)
            return True
        if op == "MatMul":
            a = self._var(ins[0], node)
            if a is None or ins[1] not in self.consts:
                _fail(f"{_nd(node)} multiplies two variables (only x @ constant is supported)")
            W = np.asarray(self.consts[ins[1]], dtype=np.float64)
            if W.ndim != 2 or W.shape[0] != a.width:
                _fail(f"{_nd(node)}: weight of shape {W.shape} for {a.width} inputs")
            self.aff[node.output[0]] = _Aff(a.A @ W, a.c @ W, self.hid)
            return True
        if op == "Gemm":
            at = _attrs(node)
            a = self._var(ins[0], node)
            if a is None or ins[1] not in self.consts or at.get("transA", 0):
                _fail(f"{_nd(node)} is not x @ constant (+ constant)")
            W = np.asarray(self.consts[ins[1]], dtype=np.float64)
            if at.get("transB", 0):
                W = W.T
            if W.ndim != 2 or W.shape[0] != a.width:
                _fail(f"{_nd(node)}: weight of shape {W.shape} for {a.width} inputs")
            W = W * float(at.get("alpha", 1.0))
            c = a.c @ W
            if len(ins) > 2 and ins[2]:
                if ins[2] not in self.consts:
                    _fail(f"{_nd(node)} has a variable bias")
                c = c + float(at.get("beta", 1.0)) * self._colvec(self.consts[ins[2]], W.shape[1], node)
            self.aff[node.output[0]] = _Aff(a.A @ W, c, self.hid)
            return True
        if op in ("Add", "Sub"):
            if len(var) == 2 and ins[0] in self.aff and ins[1] in self.aff:
                a, b = self._var(ins[0], node), self._var(ins[1], node)
                if a.width != b.width:
                    _fail(f"{_nd(node)} adds tensors of widths {a.width} and {b.width}")
                s = 1.0 if op == "Add" else -1.0
                self.aff[node.output[0]] = _Aff(a.A + s * b.A, a.c + s * b.c, self.hid)
                return True
            vi = 0 if ins[0] in self.aff else 1
            other = ins[1 - vi]
            if other not in self.consts:
                return False
            a = self._var(ins[vi], node)
            v = self._colvec(self.consts[other], a.width, node)
            if op == "Add":
                self.aff[node.output[0]] = _Aff(a.A, a.c + v, self.hid)
            elif vi == 0:
                self.aff[node.output[0]] = _Aff(a.A, a.c - v, self.hid)
            else:
                self.aff[node.output[0]] = _Aff(-a.A, v - a.c, self.hid)
            return True
        if op in ("Mul", "Div"):
            if len([n for n in ins if n in self.aff]) != 1:
                return False  # product of variables: not affine (maybe an activation region)
            vi = 0 if ins[0] in self.aff else 1
            other = ins[1 - vi]
            if other not in self.consts or (op == "Div" and vi == 1):
                return False
            a = self._var(ins[vi], node)
            v = self._colvec(self.consts[other], a.width, node)
            if op == "Div":
                if np.any(v == 0):
                    _fail(f"{_nd(node)} divides by zero")
                v = 1.0 / v
            self.aff[node.output[0]] = _Aff(a.A * v, a.c * v, self.hid)
            return True
        if op == "Neg":
            a = self._var(ins[0], node)
            self.aff[node.output[0]] = _Aff(-a.A, -a.c, self.hid)
            return True
        if op == "BatchNormalization":
            a = self._var(ins[0], node)
            if any(n not in self.consts for n in ins[1:5]):
                _fail(f"{_nd(node)} has variable statistics")
            scale, bias, mean, var = (self._colvec(self.consts[n], a.width, node) for n in ins[1:5])
            eps = float(_attrs(node).get("epsilon", 1e-5))
            s = scale / np.sqrt(var + eps)
            self.aff[node.output[0]] = _Aff(a.A * s, (a.c - mean) * s + bias, self.hid)
            return True
        if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            a = self._var(ins[0], node)
            if not self._keeps_2d(node, a.width):
                _fail(f"{_nd(node)} changes the [batch, {a.width}] shape")
            self.aff[node.output[0]] = a
            return True
        return False

    def _keeps_2d(self, node, width):
        op = node.op_type
        if op == "Flatten":
            return _attrs(node).get("axis", 1) == 1
        if op == "Reshape" and len(node.input) > 1 and node.input[1] in self.consts:
            shape = [int(s) for s in np.asarray(self.consts[node.input[1]]).reshape(-1)]
            return len(shape) == 2 and shape[1] in (width, -1) and shape[0] in (-1, 0)
        return False

    # ----- activation regions ----------------------------------------------------------------------------------
    def _region(self, start):
        """Grow the activation region from node index start; return (region node indices, output name, next)."""
        region, rtensors = [], set()
        k = start
        while k < len(self.nodes):
            node = self.nodes[k]
            ins = [n for n in node.input if n]
            uses_region = any(n in rtensors for n in ins)
            if not uses_region and k != start:
                # an affine op listed between the region's nodes, or another elementwise branch of the same
                # activation (e.g. both sides of a Where)
                if any(n in self.aff for n in ins):
                    if self._try_affine(node):
                        k += 1
                        continue
                    if node.op_type not in ELEMENTWISE:
                        _fail(f"{_nd(node)} is neither affine nor part of an elementwise activation")
                elif all(n in self.consts for n in ins):
                    for o, v in zip(node.output, self._fold_const(node)):
                        self.consts[o] = v
                    k += 1
                    continue
                else:
                    _fail(f"{_nd(node)} has inputs {ins} that are neither constants nor functions of the input")
            if node.op_type not in ELEMENTWISE:
                _fail(f"{_nd(node)} is not elementwise; after an activation only elementwise ops or a dense "
                      f"layer can follow")
            for n in ins:
                if n in rtensors or n in self.consts:
                    continue
                if n in self.aff:
                    self._var(n, node)
                    continue
                _fail(f"{_nd(node)} combines the activation with {n!r}, which is not a function of the same layer "
                      f"(several inputs, skip connection or Concat of variables)")
            region.append(k)
            rtensors.update(o for o in node.output if o)
            # closed when exactly one region tensor is used outside the region (or is a graph output)
            inside = set(region)
            open_ = [t for t in rtensors
                     if t in self.outputs or any(c not in inside for c in self.consumers.get(t, []))]
            if len(open_) == 1 and open_[0] == node.output[0] and not self._pending_affine(k, inside):
                return region, node.output[0], k + 1
            k += 1
        _fail("an activation's result is used by more than one path (skip connection or several heads)")

    def _pending_affine(self, k, inside):
        """True when a tensor of the current layer still has a consumer after node k outside the region."""
        for name, a in self.aff.items():
            if a.hid == self.hid and (name in self.outputs or
                                      any(c > k and c not in inside for c in self.consumers.get(name, []))):
                return True
        return False

    def _region_inputs(self, region):
        rt = {o for k in region for o in self.nodes[k].output}
        names = []
        for k in region:
            for n in self.nodes[k].input:
                if n and n in self.aff and n not in rt and n not in names:
                    names.append(n)
        return names

    def _common_preactivation(self, names, node):
        """Express every input as alpha * z + beta (per unit) of one pre-activation z (the first input)."""
        z = self.aff[names[0]]
        rel = []
        for n in names:
            a = self.aff[n]
            if a.width != z.width:
                _fail(f"{_nd(node)}: activation inputs of widths {z.width} and {a.width}")
            alpha = np.ones(z.width)
            for j in range(z.width):
                zj, aj = z.A[:, j], a.A[:, j]
                nz = float(np.dot(zj, zj))
                if nz == 0.0:
                    if np.any(aj != 0):
                        _fail(f"{_nd(node)}: the activation's inputs are different functions of the layer")
                    alpha[j] = 1.0
                    continue
                alpha[j] = float(np.dot(aj, zj)) / nz
                if np.max(np.abs(aj - alpha[j] * zj)) > 1e-6 * max(1.0, float(np.max(np.abs(aj)))):
                    _fail(f"{_nd(node)}: the activation's inputs are different functions of the layer "
                          f"(a skip/residual connection, or not one elementwise activation)")
            rel.append((n, alpha, a.c - alpha * z.c))
        return z, rel

    def _region_model(self, region, out_name, rel, width, z_width, out_dims=None):
        """The region as a graph of one input ``__nnp_z`` [g, z_width] (z_width is width, or 1 to broadcast one z
        to every unit): each region input is computed as alpha * z + beta, then the region's own nodes."""
        nodes = []
        inits = []
        for i, (n, alpha, beta) in enumerate(rel):
            an, bn, tmp = f"__nnp_alpha{i}", f"__nnp_beta{i}", f"__nnp_tmp{i}"
            inits += [numpy_helper.from_array(alpha.astype(np.float32).reshape(1, -1), an),
                      numpy_helper.from_array(beta.astype(np.float32).reshape(1, -1), bn)]
            nodes += [helper.make_node("Mul", ["__nnp_z", an], [tmp]), helper.make_node("Add", [tmp, bn], [n])]
        region_nodes = [self.nodes[k] for k in region]
        used = {n for nd in region_nodes for n in nd.input if n}
        for name in used:
            if name in self.consts and name not in {r[0] for r in rel}:
                inits.append(numpy_helper.from_array(np.asarray(self.consts[name]), name))
        graph = helper.make_graph(
            nodes + region_nodes, "region",
            [helper.make_tensor_value_info("__nnp_z", onnx.TensorProto.FLOAT, ["g", z_width])],
            [helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, out_dims)], initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])

    @staticmethod
    def _run(m, feeds, outputs=None):
        """Run a small graph with onnxruntime (the ONNX reference evaluator where onnxruntime refuses it)."""
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return sess.run(outputs, feeds)
        except Exception:
            from onnx.reference import ReferenceEvaluator

            return ReferenceEvaluator(m).run(outputs, feeds)

    def _evaluate_region(self, region, out_name, rel, width):
        """Evaluate the region as a function of z on the grid (same values in every column): [G, width]."""
        m = self._region_model(region, out_name, rel, width, width)
        ops = [self.nodes[k].op_type for k in region]
        zin = np.repeat(_GRID[:, None], width, axis=1)
        try:
            out = self._run(m, {"__nnp_z": zin})[0]
        except Exception as exc:
            _fail(f"could not evaluate the activation made of {ops}: {exc}")
        out = np.asarray(out, dtype=np.float64)
        if out.shape != zin.shape:
            _fail(f"the activation made of {ops} changes the shape")
        return out

    def _check_kinks(self, region, out_name, rel, width, act, p0, p1, post=None, graph_kinks=()):
        """Make sure the C core's derivative agrees with the graph's at the kinks; return (act, p0, p1).

        The region is matched to a C activation by its values, but at a kink the derivative is a convention the
        values do not show: Keras's PReLU, relu(z) - a * relu(-z), has the values of leaky_relu(a) and slope 0 at
        0 (the Relu rule), Abs those of leaky_relu(-1) and slope 0, Max(z, 0) those of relu and slope 1 (a tie
        goes to the first operand). So the derivative the graph defines there (its companion Jacobian, built by
        the same rules as the bundle's, in forward mode with one z broadcast to every unit) is compared with the
        C activation's (as ``act_d_f32`` computes it, in float32) at the same float32 points: every kink of that
        activation, the graph's own kinks where they are known (graph_kinks: the bounds of a Clip), and 0. Where
        they differ, an equivalent C activation with the graph's convention is taken (relu with slope 1 at 0 is
        selu(alpha=0, scale=1)); where there is none, the region is not lowered: the C core would silently give
        another number than the companion graph. (A Clip(lo, hi) lowered as hard_sigmoid whose rescaled bounds
        do not land exactly on lo and hi in float32 is refused by the same check.)
        """
        kinks = _kinks(act, p0, p1)
        pts = sorted(set(kinks) | {float(np.float32(v)) for v in graph_kinks} | {0.0})
        z = np.array(pts, np.float32).reshape(-1, 1)
        ops = [self.nodes[k].op_type for k in region]
        what = f"the activation {_nd(self.nodes[region[0]])}" + (f" (made of {ops})" if len(ops) > 1 else "")
        try:
            from nnpartials.exporter.jacobian import build_jacobian_model

            m = self._region_model(region, out_name, rel, width, 1, ["g", width])
            jm, info = build_jacobian_model(m, mode="forward")
            d = self._run(jm, {"__nnp_z": z}, [info["jacobian_outputs"][0]])[0]
            g = np.asarray(d, dtype=np.float64).reshape(len(pts), width)
        except Exception as exc:  # no derivative rule for an op, or a graph the engine or onnxruntime does not take
            if not kinks:
                return act, p0, p1  # a smooth C activation: nothing a convention could change
            _fail(f"{what} matches {_act_desc(act, p0, p1)} by its values, but its derivative at the kink(s) "
                  f"{_fmt(kinks)} could not be checked against the graph's ({exc})")
        s = 1.0 if post is None else float(post[0])
        first = None
        for cand in [(act, p0, p1)] + _EQUIVALENT.get(act, []):
            # both ways the C core may compute it (hard_sigmoid's p0 * z + p1 fused or not, by the CPU it runs on)
            for fused in ((False, True) if cand[0] == "hard_sigmoid" else (False,)):
                c = s * _c_slope(cand[0], cand[1], cand[2], z[:, 0], fused)[:, None]
                bad = np.abs(g - c) > KINK_TOL * np.maximum(1.0, np.abs(c))
                if bad.any():
                    break
            if not bad.any():
                return cand
            if first is None:
                i, j = np.argwhere(bad)[0]
                first = (pts[i], g[i, j], c[i, 0], int(bad.any(axis=0).sum()))
        zk, gv, cv, n_units = first
        _fail(f"{what} has slope {gv:g} at z = {zk:.9g} in the ONNX graph (and its companion Jacobian graph), but "
              f"the C activation with its values, {_act_desc(act, p0, p1)}, has slope {cv:g} there ({n_units} of "
              f"{width} units): the C core would give another derivative at this kink")

    def _identify(self, f, ops):
        """Match f (values on _GRID) with an activation of the format; return (name, p0, p1)."""
        from nnpartials.exporter.nnp import activation_ref

        z = _GRID.astype(np.float64)

        def at(v):
            return float(f[np.argmin(np.abs(z - v))])

        cands = [(n, 0.0, 0.0) for n in ("relu", "relu6", "tanh", "sigmoid", "softplus", "softsign", "swish",
                                         "gelu", "gelu_tanh", "exponential", "linear")]
        cands.append(("leaky_relu", at(-2.0) / -2.0, 0.0))
        cands.append(("elu", at(-1.0) / math.expm1(-1.0), 0.0))
        scale = at(1.0)
        if scale != 0:
            cands.append(("selu", at(-1.0) / (scale * math.expm1(-1.0)), scale))
        slope = (at(1e-3) - at(-1e-3)) / 2e-3
        cands.append(("hard_sigmoid", slope, at(0.0)))
        best = None
        for name, p0, p1 in cands:
            ref = activation_ref(name, z, p0, p1)
            with np.errstate(invalid="ignore", over="ignore"):
                err = float(np.max(np.abs(f - ref) / np.maximum(1.0, np.abs(ref))))
            if best is None or err < best[0]:
                best = (err, name, p0, p1)
            if err <= MATCH_TOL:
                return name, float(np.float32(p0)), float(np.float32(p1))
        _fail(f"the elementwise subgraph {ops} is not an activation the C core knows (closest: {best[1]}, "
              f"max relative difference {best[0]:.3g})")

    def _match_region(self, region, out, names, first):
        """Find the pre-activation z (a tensor of the current layer) of which the region is a known activation.

        Candidates are the region's inputs and every other tensor of the current layer (the biased dense output
        is usually one of them); the first whose function is the same in every unit and known wins."""
        ops = [self.nodes[k].op_type for k in region]
        cands = list(names) + [n for n, a in self.aff.items() if a.hid == self.hid and n not in names]
        reasons, kink_reasons = [], []
        for cand in cands:
            try:
                z, rel = self._common_preactivation([cand] + [n for n in names if n != cand], first)
            except NotLowerableError as exc:
                reasons.append(str(exc))
                continue
            f = self._evaluate_region(region, out, rel, z.width)
            if np.max(np.abs(f - f[:, :1])) > MATCH_TOL * max(1.0, float(np.max(np.abs(f)))):
                reasons.append(f"the elementwise subgraph {ops} differs between units")
                continue
            try:
                act, p0, p1 = self._identify(f[:, 0], ops)
            except NotLowerableError as exc:
                reasons.append(str(exc))
                continue
            try:
                act, p0, p1 = self._check_kinks(region, out, rel, z.width, act, p0, p1)
            except NotLowerableError as exc:
                kink_reasons.append(str(exc))
                continue
            return z, act, p0, p1
        reasons = kink_reasons + reasons  # the values matched, the derivative at a kink did not: say that
        _fail(reasons[0].replace("not in the C-core subset: ", "") if reasons else
              f"the elementwise subgraph {ops} is not an activation the C core knows")

    def _simple(self, node):
        """(name, p0, p1, post_scale, post_shift) of a single-node activation, by its attributes."""
        op = node.op_type
        at = _attrs(node)
        if op == "Relu":
            return "relu", 0.0, 0.0, None
        if op == "LeakyRelu":
            return "leaky_relu", float(at.get("alpha", 0.01)), 0.0, None
        if op == "Elu":
            return "elu", float(at.get("alpha", 1.0)), 0.0, None
        if op == "Selu":
            return "selu", float(at.get("alpha", SELU_ALPHA)), float(at.get("gamma", SELU_SCALE)), None
        if op == "HardSigmoid":
            return "hard_sigmoid", float(at.get("alpha", 0.2)), float(at.get("beta", 0.5)), None
        if op == "Clip":
            lo, hi = -np.inf, np.inf
            if self.opset >= 11:
                ins = list(node.input)
                for idx, which in ((1, "lo"), (2, "hi")):
                    if len(ins) > idx and ins[idx]:
                        if ins[idx] not in self.consts:
                            _fail(f"{_nd(node)} has a variable bound")
                        v = float(np.asarray(self.consts[ins[idx]]).reshape(-1)[0])
                        lo, hi = (v, hi) if which == "lo" else (lo, v)
            else:
                lo, hi = float(at.get("min", -np.inf)), float(at.get("max", np.inf))
            if lo == 0.0 and hi == 6.0:
                return "relu6", 0.0, 0.0, None
            if lo == 0.0 and hi == np.inf:
                return "relu", 0.0, 0.0, None
            if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
                # clip(z, lo, hi) = lo + (hi - lo) * clip((z - lo) / (hi - lo), 0, 1)
                return "hard_sigmoid", 1.0 / (hi - lo), -lo / (hi - lo), (hi - lo, lo)
            _fail(f"{_nd(node)} clips to [{lo}, {hi}], which is not an activation of the format")
        if op == "Gelu":  # opset 20: exact (erf) or the tanh approximation, both activations of the format
            approx = at.get("approximate", "none")
            approx = approx.decode() if isinstance(approx, bytes) else approx
            return ("gelu_tanh" if approx == "tanh" else "gelu"), 0.0, 0.0, None
        name = {"Tanh": "tanh", "Sigmoid": "sigmoid", "Softplus": "softplus", "Softsign": "softsign",
                "Exp": "exponential"}[op]
        return name, 0.0, 0.0, None

    def _activation(self, start):
        region, out, nxt = self._region(start)
        first = self.nodes[region[0]]
        names = self._region_inputs(region)
        if not names:
            _fail(f"{_nd(first)} does not depend on the input")
        if len(region) == 1 and first.op_type in SIMPLE and len(names) == 1:
            z = self.aff[names[0]]
            act, p0, p1, post = self._simple(first)
            rel = [(names[0], np.ones(z.width), np.zeros(z.width))]
            bounds = () if post is None else (post[1], post[1] + post[0])  # Clip(lo, hi): its own kinks
            act, p0, p1 = self._check_kinks(region, out, rel, z.width, act, p0, p1, post, bounds)
        else:
            z, act, p0, p1 = self._match_region(region, out, names, first)
            post = None
        self.layers.append(Layer(z.A.astype(np.float32), z.c.astype(np.float32), act, p0, p1))
        self.hid += 1
        w = z.width
        if post is None:
            self.aff[out] = _Aff(np.eye(w), np.zeros(w), self.hid)
        else:
            s, t = post
            self.aff[out] = _Aff(np.eye(w) * s, np.full(w, t), self.hid)
        return nxt

    # ----- driver ------------------------------------------------------------------------------------------
    def run(self) -> list:
        k = 0
        while k < len(self.nodes):
            node = self.nodes[k]
            ins = [n for n in node.input if n]
            if node.op_type == "Constant" or (ins and all(n in self.consts for n in ins)):
                for o, v in zip(node.output, self._fold_const(node)):
                    self.consts[o] = v
                k += 1
                continue
            if not any(n in self.aff for n in ins):
                _fail(f"{_nd(node)} has inputs {ins} that are neither constants nor functions of the input")
            if node.op_type == "PRelu":
                _fail(f"{_nd(node)}: PReLU (a slope per unit) is not an activation of the format")
            if self._try_affine(node):
                k += 1
                continue
            if node.op_type in ELEMENTWISE:
                k = self._activation(k)
                continue
            _fail(f"{_nd(node)}: op {node.op_type} is not supported by the C core (dense layers and elementwise "
                  f"activations only)")
        outs = []
        for name in self.outputs:
            if name not in self.aff:
                _fail(f"output {name!r} is not a function of the input")
            a = self.aff[name]
            if a.hid != self.hid:
                _fail(f"output {name!r} is taken before the last activation (several heads at different depths)")
            outs.append(a)
        A = np.concatenate([a.A for a in outs], axis=1)
        c = np.concatenate([a.c for a in outs])
        if not (self.layers and A.shape[0] == A.shape[1] and np.array_equal(A, np.eye(A.shape[0]))
                and not np.any(c)):
            self.layers.append(Layer(A.astype(np.float32), c.astype(np.float32), "linear"))
        for L in self.layers:
            if not (np.isfinite(L.W).all() and np.isfinite(L.b).all()):
                _fail("folding produced non-finite weights (e.g. a variance of zero in a normalization)")
        return self.layers


def lower_layers(model: onnx.ModelProto) -> tuple[list, int]:
    """Lower to a list of :class:`~nnpartials.exporter.nnp.Layer` and n_in (no final check)."""
    low = _Lowerer(model)
    return low.run(), low.n_in


def check_lowering(model: onnx.ModelProto, layers, n_in: int, n_points: int = 64, seed: int = 0):
    """Compare the layers with onnxruntime on random points; raise NotLowerableError on a mismatch."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (n_points, n_in)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    y = np.concatenate([np.asarray(o, dtype=np.float64).reshape(n_points, -1) for o in outs], axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        yl = forward_ref(layers, x)
    if yl.shape != y.shape:
        raise NotLowerableError(f"lowering check: {yl.shape[1]} outputs, the graph has {y.shape[1]}")
    finite = np.isfinite(y) & np.isfinite(yl)
    if not finite.all():
        y, yl = np.where(finite, y, 0.0), np.where(finite, yl, 0.0)
    err = float(np.max(np.abs(yl - y))) / max(1.0, float(np.max(np.abs(y))))
    if err > CHECK_TOL:
        raise NotLowerableError(f"lowering check failed: the C-core layers differ from the ONNX graph by {err:.3g} "
                                f"(relative) on random points")


def lower_onnx(model: onnx.ModelProto) -> bytes:
    """Convert a forward ONNX graph to ``model.nnp`` bytes, or raise NotLowerableError with the reason."""
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"lower_onnx expects an onnx.ModelProto, got {type(model).__name__}")
    layers, n_in = lower_layers(model)
    if len(layers) > 4096:
        _fail(f"{len(layers)} layers (the format allows 4096)")
    if any(max(L.W.shape) > 65536 for L in layers):
        _fail("a layer wider than 65536 units")
    check_lowering(model, layers, n_in)
    return write_nnp(layers, n_in)


__all__ = ["lower_onnx", "lower_layers", "check_lowering"]
