"""A small builder for adding nodes to an ONNX graph, with static-shape tracking.

Shapes are tuples whose entries are ints or ``None`` (unknown, in practice the batch dimension)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}

# Elementwise ops whose output shape is the broadcast of the input shapes.
_BROADCAST_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal",
    "And", "Or", "Not", "Xor", "Max", "Min", "Sum", "Mean",
}
_UNARY_OPS = {
    "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Tanh", "Sigmoid", "Erf", "Sign", "Cast", "Relu",
    "Softplus", "Softsign", "Identity", "Cos", "Sin", "Floor", "Ceil", "Round", "IsNaN", "IsInf",
    "Tan", "Atan", "Asin", "Acos", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Elu", "Selu", "Celu", "LeakyRelu",
    "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Gelu",
}


#: Ops whose ``axes`` became an input (from an attribute) at the given opset.
_AXES_INPUT_SINCE = {"ReduceSum": 13, "Unsqueeze": 13, "Squeeze": 13, "ReduceMean": 18, "ReduceMax": 18,
                     "ReduceMin": 18, "ReduceProd": 18, "ReduceSumSquare": 18, "ReduceL1": 18, "ReduceL2": 18,
                     "ReduceLogSum": 18, "ReduceLogSumExp": 18}


def broadcast_shapes(*shapes):
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        known = [d for d in dims if d is not None and d != 1]
        if any(d is None for d in dims):
            out.append(None if not known else known[0])
        elif known:
            out.append(known[0])
        else:
            out.append(1)
    return tuple(out)


class GraphBuilder:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        # the model's float type: derivative tensors and the constants of the rules are computed in it
        init_names = {t.name for t in model.graph.initializer}
        in_types = [i.type.tensor_type.elem_type for i in model.graph.input if i.name not in init_names]
        self.ftype = TensorProto.DOUBLE if in_types and in_types[0] == TensorProto.DOUBLE else TensorProto.FLOAT
        self.np_float = np.float64 if self.ftype == TensorProto.DOUBLE else np.float32
        self.names = set()
        for n in self.graph.node:
            self.names.update(n.input)
            self.names.update(n.output)
            if n.name:  # new nodes are named after their outputs: no clash with a node whose output was renamed
                self.names.add(n.name)
        for t in list(self.graph.input) + list(self.graph.output) + list(self.graph.initializer):
            self.names.add(t.name)
        self.shapes: dict[str, tuple] = {}
        #: symbolic dimension names where shape inference gave them ("batch" for the batch axis)
        self.dim_params: dict[str, tuple] = {}
        self.dtypes: dict[str, int] = {}
        self.const_values: dict[str, np.ndarray] = {}
        #: derivative tensors known to have a real batch axis (not broadcast from size 1)
        self.full: set = set()
        self.new_nodes: list = []
        self.new_inits: list = []
        self._const_cache: dict = {}
        self._producers: dict | None = None  # output name -> node of the original graph, built at first use
        self._counter = 0
        self._read_graph()

    # ----- reading -----------------------------------------------------------------------------------------
    def _read_graph(self):
        # data_prop: shapes computed at run time from Shape/Gather/Concat of static dims (attention heads) are
        # propagated, so the tensors they reshape keep static shapes
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False, data_prop=True)
        except Exception:  # pragma: no cover - data propagation failing on an unusual graph: plain inference
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if not tt.HasField("shape"):
                continue
            self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            self.dim_params[vi.name] = tuple(d.dim_param if d.HasField("dim_param") else None for d in tt.shape.dim)
            self.dtypes[vi.name] = tt.elem_type
        for init in self.graph.initializer:
            arr = numpy_helper.to_array(init)
            self.const_values[init.name] = arr
            self.shapes[init.name] = tuple(arr.shape)
            self.dtypes[init.name] = init.data_type
        for node in self.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        arr = numpy_helper.to_array(attr.t)
                        self.const_values[node.output[0]] = arr
                        self.shapes[node.output[0]] = tuple(arr.shape)
                        self.dtypes[node.output[0]] = attr.t.data_type
            elif node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in self.const_values:
                # an exporter's alias of a weight (TorchScript shares equal initializers this way) is a constant too
                self.const_values[node.output[0]] = self.const_values[node.input[0]]
                self.shapes.setdefault(node.output[0], self.shapes.get(node.input[0]))
                self.dtypes.setdefault(node.output[0], self.dtypes.get(node.input[0]))

    def shape(self, name):
        return self.shapes.get(name)

    def unknown_axes(self, name) -> list:
        """Axes of ``name`` whose size the graph does not give and that are not the batch axis (missing shape
        information, as opposed to the symbolic batch axis)."""
        s = self.shapes.get(name)
        if s is None:
            return []
        params = self.dim_params.get(name, (None,) * len(s))
        return [i for i, (d, p) in enumerate(zip(s, params)) if d is None and p != "batch"]

    def rank(self, name):
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def is_float(self, name):
        return self.dtypes.get(name, TensorProto.FLOAT) in FLOAT_TYPES

    def value(self, name):
        """The numpy value of a constant tensor (initializer or Constant node), else None."""
        return self.const_values.get(name)

    def scalar(self, name):
        """The value of a one-element constant tensor as a float, else None."""
        v = self.const_values.get(name)
        return None if v is None or np.size(v) != 1 else float(np.asarray(v).reshape(-1)[0])

    def producer(self, name):
        """The node of the original graph that computes tensor ``name``, else None (new nodes are not looked at)."""
        if self._producers is None:
            self._producers = {o: n for n in self.graph.node for o in n.output}
        return self._producers.get(name)

    # ----- writing -----------------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"nnp_{hint}_{self._counter}"
            if name not in self.names:
                self.names.add(name)
                return name

    def const(self, value, dtype=None, hint="c") -> str:
        """A constant tensor (an initializer, shared between equal values); ``dtype`` defaults to the model's
        float type."""
        arr = np.asarray(value, dtype=self.np_float if dtype is None else dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh(hint)
        self.new_inits.append(numpy_helper.from_array(arr, name))
        self.shapes[name] = tuple(arr.shape)
        self.dtypes[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)
        self.const_values[name] = arr
        self._const_cache[key] = name
        return name

    def op(self, op_type: str, inputs, shape=None, hint=None, dtype=None, **attrs) -> str:
        """Add one single-output node. Python numbers among the inputs become constants of the model's float type;
        ``dtype`` (of the output) defaults to it too."""
        if dtype is None:
            dtype = self.ftype
        ins = [self.const(i) if isinstance(i, (int, float, np.floating)) else i for i in inputs]
        since = _AXES_INPUT_SINCE.get(op_type)
        if since is not None and self.opset < since and len(ins) == 2 and ins[1] and self.value(ins[1]) is not None:
            # the model's opset takes the axes as an attribute (they became an input later)
            attrs = dict(attrs, axes=[int(a) for a in np.asarray(self.value(ins[1])).reshape(-1)])
            ins = ins[:1]
        out = self.fresh(hint or op_type.lower())
        self.new_nodes.append(helper.make_node(op_type, ins, [out], name=out, **attrs))
        if shape is None:
            if op_type in _BROADCAST_OPS:
                known = [self.shapes.get(i) for i in ins if i]
                shape = broadcast_shapes(*known) if all(k is not None for k in known) else None
            elif op_type in _UNARY_OPS:
                shape = self.shapes.get(ins[0])
        if shape is not None:
            self.shapes[out] = tuple(shape)
        if op_type in ("Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "And", "Or", "Not", "Xor"):
            dtype = TensorProto.BOOL
        if op_type == "Cast":
            dtype = attrs.get("to", dtype)
        self.dtypes[out] = dtype
        return out

    def multi(self, op_type: str, inputs, n_outputs: int, shapes=None, dtypes=None, **attrs) -> list:
        """Add one node with several outputs; returns their names."""
        outs = [self.fresh(op_type.lower()) for _ in range(n_outputs)]
        self.new_nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
        for k, o in enumerate(outs):
            if shapes and shapes[k] is not None:
                self.shapes[o] = tuple(shapes[k])
            self.dtypes[o] = (dtypes[k] if dtypes else None) or self.ftype
        return outs

    def shape_of(self, x) -> str:
        """The run-time shape of ``x`` (an int64 vector)."""
        s = self.shapes.get(x)
        return self.op("Shape", [x], dtype=TensorProto.INT64, shape=None if s is None else (len(s),))

    def k_shape(self, K: int, like) -> str:
        """``[K, *Shape(like)]`` at run time: the shape of the derivative tensor of ``like``."""
        s = self.shapes.get(like)
        return self.op("Concat", [self.const([K], np.int64), self.shape_of(like)], axis=0, dtype=TensorProto.INT64,
                       shape=None if s is None else (len(s) + 1,))

    def expand_like(self, d, like, K: int) -> str:
        """The derivative ``d`` [K, ...] of tensor ``like`` with its broadcast axes (a batch axis of size 1)
        expanded to ``like``'s run-time shape: needed before an op that moves or folds the batch axis."""
        if d in self.full:
            return d
        s = self.shapes.get(like)
        r = self.op("Expand", [d, self.k_shape(K, like)], shape=None if s is None else (K,) + tuple(s))
        self.full.add(r)
        return r

    # convenience wrappers
    def add(self, a, b):
        return self.op("Add", [a, b])

    def sub(self, a, b):
        return self.op("Sub", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def div(self, a, b):
        return self.op("Div", [a, b])

    def where(self, cond, a, b):
        return self.op("Where", [cond, a, b])

    def cast_float(self, x):
        return self.op("Cast", [x], to=self.ftype)

    def unsqueeze(self, x, axes, shape=None):
        return self.op("Unsqueeze", [x, self.const(axes, np.int64)], shape=shape)

    def reshape(self, x, target, shape=None):
        return self.op("Reshape", [x, self.const(target, np.int64)], shape=shape)
