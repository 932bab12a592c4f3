"""Any ONNX file -> the forward graph nnpartials differentiates.

A model from PyTorch (``torch.onnx.export``), scikit-learn (skl2onnx), tf2onnx or written with ``onnx.helper``
is normalised so the derivative engine and the bundle see one form:

* self-contained (external data is refused: it is a path-traversal surface, and bundles carry no side files);
* the default ONNX domain only, at opset 13 or later (older opsets, down to 9, are upgraded with onnx's version
  converter; opsets below 9 are refused);
* float32 or float64 inputs and outputs (the derivative is taken in the model's own precision);
* every graph input and output has a leading batch axis, made symbolic (``batch``) when the exporter fixed it
  (``torch.onnx.export`` without dynamic axes writes 1); the other axes must be static;
* outputs named ``y`` or ``dy_dx*`` (the companion graphs' own names) are renamed, never left to collide;
* the result passes ``onnx.checker.check_model(full_check=True)``.

:func:`load_onnx` returns an :class:`OnnxModel`; every refusal is an :class:`~nnpartials.errors.ExportError`
that says what was expected and what was found.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from nnpartials.errors import ExportError

#: Opsets older than this are upgraded to it (the derivative rules read opset-13 forms: ReduceSum axes as an
#: input, Softmax over one axis, Squeeze/Unsqueeze axes as inputs, Split sizes as an input).
MIN_OPSET = 13
#: The oldest opset the version converter is trusted to upgrade from.
OLDEST_OPSET = 9
#: Names the companion graphs use for their own outputs; a source output with one of them is renamed.
RESERVED_OUTPUTS = ("y", "x", "v")
RESERVED_PREFIXES = ("dy_dx", "d2y_dx2", "laplacian", "hvp")
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}


@dataclass
class OnnxModel:
    """A normalised forward graph and what export needs to know about it."""

    model: onnx.ModelProto
    input_names: list
    input_shapes: list    # per-point shape of each input (without the batch axis), tuples of ints
    output_names: list
    output_shapes: list
    dtype: str            # "float32" or "float64"
    producer: str = ""
    renamed_outputs: dict = field(default_factory=dict)
    dropped_outputs: list = field(default_factory=list)  # non-float outputs left out (no derivative)
    upgraded_from: int | None = None
    source: str = "onnx"

    @property
    def input_widths(self) -> list:
        return [int(np.prod(s, dtype=np.int64)) for s in self.input_shapes]

    @property
    def output_widths(self) -> list:
        return [int(np.prod(s, dtype=np.int64)) for s in self.output_shapes]


def _default_opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _has_external_data(graph: onnx.GraphProto) -> str | None:
    """The name of a tensor stored outside the file anywhere in the graph (subgraphs included), else None."""
    def ext(t):
        return t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0

    for t in graph.initializer:
        if ext(t):
            return t.name
    for st in graph.sparse_initializer:
        if ext(st.values) or ext(st.indices):
            return st.values.name
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and ext(a.t):
                return a.t.name or node.name
            if a.type == onnx.AttributeProto.TENSORS and any(ext(t) for t in a.tensors):
                return node.name
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) \
                if a.type == onnx.AttributeProto.GRAPHS else []
            for sub in subs:
                found = _has_external_data(sub)
                if found:
                    return found
    return None


def _read(source) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return copy.deepcopy(source)
    if isinstance(source, (bytes, bytearray)):
        try:
            return onnx.load_model_from_string(bytes(source))
        except Exception as exc:
            raise ExportError(f"the bytes are not a readable ONNX model: {type(exc).__name__}: {exc}") from None
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ExportError(f"ONNX model {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            return onnx.load_model_from_string(f.read())
    except Exception as exc:
        raise ExportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _elem_dtype(vi, what) -> str:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise ExportError(f"{what} {vi.name!r} is not a tensor (sequence, map or optional types are not supported)")
    if tt.elem_type not in _DTYPES:
        name = onnx.TensorProto.DataType.Name(tt.elem_type)
        raise ExportError(f"{what} {vi.name!r} has element type {name}; nnpartials differentiates float32 or "
                          f"float64 inputs and outputs")
    return _DTYPES[tt.elem_type]


def _dims(vi):
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str):
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new
        for a in node.attribute:  # subgraphs may read outer-scope tensors by name
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                        if a.type == onnx.AttributeProto.GRAPHS else []):
                _rename_tensor(sub, old, new)
    for vi in list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def _prune(graph: onnx.GraphProto):
    """Remove the nodes and initializers no graph output needs (after outputs were dropped)."""
    from nnpartials.exporter.jacobian import _outer_reads

    need = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
            need.update(_outer_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [t for t in graph.initializer if t.name in need]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _all_names(graph) -> set:
    names = {vi.name for vi in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names.update(t.name for t in graph.initializer)
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    return names


_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial",
               "If", "Loop", "Scan", "SequenceConstruct", "Optional"}
#: Constants larger than this (elements) are not materialised by folding (keeps the graph's size bounded).
FOLD_MAX_ELEMENTS = 1 << 16


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace nodes whose inputs are all constants by initializers holding their values (computed by onnx's
    reference implementation): exporters compute reshape targets from constants (TorchScript: Mod, Slice, Concat
    of constants), and shape inference resolves them only once they are plain values. Returns the count folded."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    const = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    outputs = {o.name for o in g.output}
    opset = _default_opset(model) or 17
    keep, folded = [], 0
    for node in g.node:
        ins = [i for i in node.input if i]
        if (node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED or not ins
                or any(i not in const for i in ins) or any(o in outputs for o in node.output)
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.input:
                for a in node.attribute:
                    if a.name == "value":
                        const[node.output[0]] = numpy_helper.to_array(a.t)
            keep.append(node)
            continue
        try:
            feeds = {i: const[i] for i in ins}
            sub = onnx.helper.make_graph(
                [node], "fold", [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                                                   list(v.shape)) for i, v in feeds.items()],
                [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o])
            m = onnx.helper.make_model(sub, opset_imports=[onnx.helper.make_opsetid("", opset)])
            vals = ReferenceEvaluator(m).run(None, feeds)
        except Exception:  # an op the reference cannot fold: keep it
            keep.append(node)
            continue
        if any(np.asarray(v).size > FOLD_MAX_ELEMENTS for v in vals):
            keep.append(node)
            continue
        for o, v in zip([o for o in node.output if o], vals):
            v = np.asarray(v)
            const[o] = v
            g.initializer.append(numpy_helper.from_array(v, o))
        folded += 1
    if folded:
        del g.node[:]
        g.node.extend(keep)
    return folded


def load_onnx(source) -> OnnxModel:
    """Read and normalise an ONNX model (a path, bytes or an ``onnx.ModelProto``); see the module docstring."""
    model = _read(source)
    what = f"{os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else "the ONNX model"
    g = model.graph
    ext = _has_external_data(g)
    if ext:
        raise ExportError(f"{what}: tensor {ext!r} is stored in an external data file; nnpartials takes "
                          f"self-contained ONNX only (save it with onnx.save(model, path, save_as_external_data="
                          f"False))")
    opset = _default_opset(model)
    if opset is None:
        raise ExportError(f"{what}: no default-domain opset is imported; expected an ONNX graph of standard ops")
    if opset < OLDEST_OPSET:
        raise ExportError(f"{what}: opset {opset} is older than {OLDEST_OPSET}, the oldest nnpartials upgrades")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"{what} fails the ONNX checker: {exc}") from None
    upgraded = None
    if opset < MIN_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise ExportError(f"{what}: upgrading opset {opset} to {MIN_OPSET} failed ({type(exc).__name__}: {exc})"
                              f"; re-export the model at opset {MIN_OPSET} or later") from None
        upgraded = opset
        g = model.graph
    init = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in init]
    if not inputs:
        raise ExportError(f"{what}: the graph has no inputs (every input has an initializer)")
    if len(g.output) == 0:
        raise ExportError(f"{what}: the graph has no outputs")
    # outputs that are not floating point (a classifier's int64 label) have no derivative: they are left out of the
    # bundle (listed in dropped_outputs), with the nodes only they needed
    dropped = [vi.name for vi in g.output if vi.type.HasField("tensor_type")
               and vi.type.tensor_type.elem_type not in _DTYPES and vi.type.tensor_type.elem_type not in
               (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)]
    if dropped:
        if len(dropped) == len(g.output):
            raise ExportError(f"{what}: no output is floating point ({dropped}); there is nothing to differentiate")
        keep = [vi for vi in g.output if vi.name not in dropped]
        del g.output[:]
        g.output.extend(keep)
        _prune(g)
    dtypes = {_elem_dtype(vi, "input") for vi in inputs} | {_elem_dtype(vi, "output") for vi in g.output}
    if len(dtypes) != 1:
        raise ExportError(f"{what}: inputs and outputs mix float32 and float64; expected one precision")
    dtype = dtypes.pop()
    # initializers that are also graph inputs become constants (they are weights, not points)
    if len(inputs) != len(g.input):
        keep = [i for i in g.input if i.name not in init]
        del g.input[:]
        g.input.extend(keep)
    # outputs named like the companion graphs' own outputs are renamed
    renamed = {}
    names = _all_names(g)
    input_names = [i.name for i in inputs]
    for vi in list(g.output):
        n = vi.name
        if n in RESERVED_OUTPUTS or n.startswith(RESERVED_PREFIXES) or n in input_names:
            new, k = f"out_{n}", 1
            while new in names:
                k += 1
                new = f"out{k}_{n}"
            if n in input_names:  # an input passed straight through: give the output its own tensor
                node = onnx.helper.make_node("Identity", [n], [new], name=f"nnp_passthrough_{n}")
                g.node.append(node)
                vi.name = new
            else:
                _rename_tensor(g, n, new)
            names.add(new)
            renamed[n] = new
    # the batch axis: leading, symbolic; every other axis static
    in_shapes, out_shapes = [], []
    for kind, vis, shapes in (("input", inputs, in_shapes), ("output", list(g.output), out_shapes)):
        for vi in vis:
            dims = _dims(vi)
            if dims is None or len(dims) == 0:
                raise ExportError(f"{what}: {kind} {vi.name!r} has {'no shape' if dims is None else 'rank 0'}; "
                                  f"expected [batch, ...] with a leading batch axis")
            rest = dims[1:]
            if any(not isinstance(d, int) or d <= 0 for d in rest):
                raise ExportError(f"{what}: {kind} {vi.name!r} has shape {dims}; every axis after the batch axis "
                                  f"must be static")
            shapes.append(tuple(int(d) for d in rest))
            d0 = vi.type.tensor_type.shape.dim[0]
            d0.Clear()
            d0.dim_param = "batch"
    del g.value_info[:]  # re-inferred with the symbolic batch axis
    fold_constants(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"{what}: with a symbolic batch axis the graph fails the ONNX checker ({exc}); was it "
                          f"exported for one fixed batch size?") from None
    del model.graph.value_info[:]
    return OnnxModel(model=model, input_names=input_names, input_shapes=in_shapes,
                     output_names=[o.name for o in model.graph.output], output_shapes=out_shapes, dtype=dtype,
                     producer=f"{model.producer_name} {model.producer_version}".strip(), renamed_outputs=renamed,
                     dropped_outputs=dropped, upgraded_from=upgraded)


def check_batch_independence(om: OnnxModel, n: int = 3, seed: int = 0):
    """Run the graph on a batch of ``n`` and on each point alone (onnxruntime): the outputs must agree, else the
    graph mixes points of a batch (or fixes the batch size), and per-point partials are not defined."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    dt = np.float32 if om.dtype == "float32" else np.float64
    xs = [rng.uniform(-1, 1, (n,) + s).astype(dt) for s in om.input_shapes]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(om.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        full = sess.run(None, dict(zip(om.input_names, xs)))
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot run the graph on a batch of {n} points ({type(exc).__name__}: {exc}); "
                          f"was it exported for a fixed batch size? (torch.onnx.export: dynamic_axes / "
                          f"dynamic_shapes for the batch axis)") from None
    for k in range(n):
        one = sess.run(None, {nm: x[k:k + 1] for nm, x in zip(om.input_names, xs)})
        for name, a, b in zip(om.output_names, full, one):
            if a.shape[0] != n or b.shape[0] != 1:
                raise ExportError(f"output {name!r} has {a.shape[0]} rows for a batch of {n} points and "
                                  f"{b.shape[0]} for one point: its first axis is not the batch axis (a converter "
                                  f"that reshapes the outputs, e.g. to [-1, 1], merges points with other axes)")
            if not np.allclose(a[k:k + 1], b, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(b).max())):
                raise ExportError(f"output {name!r} of point {k} differs when computed in a batch and alone; the "
                                  f"graph mixes the points of a batch, so per-point partials are not defined")


__all__ = ["OnnxModel", "load_onnx", "check_batch_independence", "MIN_OPSET"]
