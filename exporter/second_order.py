"""Second-order companion graphs: the Hessian, the Laplacian and the Hessian-vector product of a forward ONNX graph.

All three reuse the first-order engine (:mod:`nnpartials.exporter.jacobian`) and its per-op rules:

* **Hessian** (``model.hess.onnx``): the Jacobian graph is built (reverse mode when ``n_out < n_in``), then the same
  engine runs in forward mode over *that* graph, K = n_in tangents through every node that ``dy_dx`` depends on
  (forward-over-reverse). The rules meet the Jacobian graph's own nodes there, whose tensors are ``[K, batch, ...]``
  with the batch axis second, and its masks (Greater, Where, Cast, Sign, ...), which carry no derivative: piecewise
  linear ops get a zero second derivative.
* **Hessian-vector product** (``model.hvp.onnx``): the same over the reverse-mode Jacobian graph with one tangent
  whose seed is the graph input ``v`` (K = 1): ``hvp[b, i] = H_i(x_b) v_b``, a few forward passes' cost.
* **Laplacian** (``model.lap.onnx``): one forward-Laplacian pass over the forward graph (Li et al. 2023, as the
  ``folx`` package), never the Hessian: for every input-dependent tensor ``t`` it carries the n_in tangents
  ``T[t] = [d t / d x_k]_k`` and the Laplacian ``L[t] = sum_k d2 t / d x_k^2``; no tensor carries two derivative
  axes. A rule's term maps both alike and, where the term itself depends on the input, adds the pairing of its own
  derivative with the tangents: for a scale ``dy = s * dx``, ``sum_k (d_k s)(d_k x)``, with ``ds`` from the
  elementwise derivative of the nodes the rule emitted for s (tanh: ``s = 1 - y^2``, ``ds = -2 y dy``; a product of
  two input-dependent tensors: ``2 sum_k d_k a d_k b``); for a linear map that depends on the input (softmax,
  normalization layers, a product of two input-dependent matrices), the map differentiated in direction k applied to
  tangent k, summed over k. Where a node's derivative uses an op this does not cover, the Laplacian graph is the
  trace of the Hessian graph instead, and ``info`` says so (``laplacian_method`` "hessian-trace",
  ``laplacian_fallback_reason`` naming the node).

:func:`second_derivatives_vanish` tells whether every op that depends on the input is linear or piecewise linear,
so that the Hessian is zero almost everywhere.

Every graph takes the forward graph's inputs (the HVP graph also ``v``), computes in the forward graph's float type
and outputs ``y [batch, n_out]`` (all outputs flattened and concatenated); the Hessian and Laplacian graphs also
``dy_dx [batch, n_out, n_in]``. Derivatives are over all inputs' flattened features, concatenated in graph-input
order (n_in of them).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nnpartials.errors import ExportError
from nnpartials.exporter.graph import broadcast_shapes
from nnpartials.exporter.jacobian import _Engine, _outer_reads, build_jacobian_model, fold_scales_into_matmul
from nnpartials.exporter.rules import RULES, ZERO_DERIVATIVE, Linear, RuleContext, Scale
from nnpartials.exporter.rules_nn import _zeros_like_k

JACOBIAN_LAYOUT = "dy_dx[b, i, j] = d y[b, i] / d x[b, j]"
HESSIAN_LAYOUT = "d2y_dx2[b, i, j, k] = d2 y[b, i] / dx[b, j] dx[b, k]"
LAPLACIAN_LAYOUT = "laplacian[b, i] = sum_j d2 y[b, i] / dx[b, j]^2"
HVP_LAYOUT = "hvp[b, i, j] = sum_k d2 y[b, i] / dx[b, j] dx[b, k] * v[b, k]"
LAPLACIAN_METHODS = ("forward-laplacian", "hessian-trace")

_INT64 = TensorProto.INT64

#: Ops whose output is an elementwise (broadcasting) function of their inputs, with Scale terms: the factor of a
#: scale term computed by these has an elementwise derivative (the forward Laplacian's correction).
_ELEMENTWISE = frozenset({
    "Identity", "Cast", "Add", "Sub", "Mul", "Div", "Neg", "Reciprocal", "Exp", "Log", "Sqrt", "Pow", "Tanh",
    "Sigmoid", "Erf", "Sin", "Cos", "Tan", "Atan", "Asin", "Acos", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Abs",
    "Softplus", "Softsign", "Where", "Max", "Min", "Sum", "Mean", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Clip",
    "HardSigmoid", "HardSwish", "ThresholdedRelu", "Mish", "Gelu",
})

#: Ops linear in their input-dependent operands when the other operands are constant (or do not depend on the input).
_LINEAR_OPS = frozenset({
    "Identity", "Dropout", "Cast", "Add", "Sum", "Mean", "Sub", "Neg", "BatchNormalization", "Reshape", "Flatten",
    "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice", "Split", "ReduceSum", "ReduceMean", "Gather",
    "GatherElements", "Pad", "Tile", "Expand", "Resize", "AveragePool", "GlobalAveragePool", "Conv", "ConvTranspose",
    "ScatterElements",
})
#: Linear in all their operands together.
_JOINTLY_LINEAR_OPS = frozenset({"Add", "Sum", "Mean", "Sub", "Concat"})
#: Ops linear in each operand separately: linear when at most one operand depends on the input.
_BILINEAR_OPS = frozenset({"Mul", "MatMul", "Gemm", "Einsum"})
#: Piecewise-linear ops: their second derivative is zero away from their kinks.
_PIECEWISE_LINEAR_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Clip", "HardSigmoid", "Max", "Min", "Abs", "MaxPool", "GlobalMaxPool",
    "ReduceMax", "ReduceMin", "ReduceL1", "ThresholdedRelu", "Where",
})


# ----- rules for nodes only Jacobian graphs hold ------------------------------------------------------------
def _scatter_elements(c):
    """ScatterElements in a Jacobian graph (the adjoint of MaxPool, GatherElements and Gather with run-time indices).

    Not in the rule table: the first-order engine never meets it in a forward graph it supports; registering it there
    wants its own single-node test in tests/test_rules.py."""
    # y = data with the updates written (reduction "none") or added ("add") at the indices along the axis: linear
    # in data and updates together, for indices that do not depend on the input (the adjoint of MaxPool and
    # GatherElements in a Jacobian graph, differentiated again)
    if c.need(1):
        c.unsupported("indices depend on the input")
    red = c.attr("reduction", b"none")
    red = red.decode() if isinstance(red, bytes) else red
    if red not in ("none", "add"):
        c.unsupported(f"reduction {red!r} (none and add are linear)")
    data, idx, upd = c.node.input[:3]
    xs = c.shape(data)
    axis = c.attr("axis", 0) % len(xs)
    K = c.K
    attrs = {"axis": axis + 1} if red == "none" else {"axis": axis + 1, "reduction": red}

    def kidx(b, like):
        return b.op("Expand", [b.unsqueeze(idx, [0]), b.k_shape(K, like)], dtype=_INT64)

    td = tu = None
    if c.need(0):  # the data's derivative, with the positions written (not added) zeroed
        def fwd_d(b, d):
            d = b.expand_like(d, data, K)
            if red == "add":
                return d
            return b.op("ScatterElements", [d, kidx(b, upd), _zeros_like_k(b, upd, K)], axis=axis + 1,
                        shape=(K,) + tuple(xs))

        td = Linear(fwd=fwd_d, rev=fwd_d)
    if c.need(2):
        def fwd_u(b, d):
            base = _zeros_like_k(b, data, K)
            return b.op("ScatterElements", [base, kidx(b, upd), b.expand_like(d, upd, K)], shape=(K,) + tuple(xs),
                        **attrs)

        def rev_u(b, g):
            r = b.op("GatherElements", [b.expand_like(g, data, K), kidx(b, upd)], axis=axis + 1)
            b.shapes[r] = (K,) + tuple(c.shape(upd))
            return r

        tu = Linear(fwd=fwd_u, rev=rev_u)
    return [td, None, tu]


_JACOBIAN_GRAPH_RULES = {"ScatterElements": _scatter_elements}


# ----- shared pieces ----------------------------------------------------------------------------------------------
class _Tangents(_Engine):
    """Forward mode over an existing graph (here: a Jacobian graph) with K directions and given seeds, through only
    the nodes the targets depend on (a Jacobian graph's MaxPool also computes values nobody reads, for example)."""

    def __init__(self, model: onnx.ModelProto, K: int):
        super().__init__(model, "forward")
        self.K = K

    def _rule(self, node):
        fn = _JACOBIAN_GRAPH_RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fn is None or node.op_type in RULES:
            return super()._rule(node)
        terms = fn(RuleContext(self.b, node, self.var, self.K))
        return terms if isinstance(terms, dict) else {0: terms}

    def identity_seeds(self) -> dict:
        b, seeds, off = self.b, {}, 0
        for name, w in zip(self.inputs, self.in_widths):
            seed = np.zeros((self.K, 1, w), b.np_float)
            seed[off:off + w, 0, :] = np.eye(w, dtype=b.np_float)
            seeds[name] = b.const(seed.reshape((self.K, 1) + tuple(b.shape(name)[1:])), hint="seed2")
            off += w
        return seeds

    def propagate(self, seeds: dict, targets) -> dict:
        nodes = list(self.model.graph.node)
        need, wanted = _needed(nodes, targets, with_tensors=True)
        D = dict(seeds)
        for pos, node in enumerate(nodes):
            if pos not in need or not any(i in D for i in node.input if i):
                continue
            if not any(o and o in self.var and o in wanted for o in node.output):
                continue  # e.g. a MaxPool computing argmax positions: its values need no derivative
            for k, terms in self._rule(node).items():
                y = node.output[k]
                parts = [self._fwd(t, D[x], x, y) for t, x in _merge_scales(self.b, terms, node.input)
                         if t is not None and x in D]
                if parts:
                    D[y] = self._sum(parts)
        return D


def _merge_scales(b, terms, inputs):
    """``(term, input)`` pairs with the scale terms of an input that occurs several times (``Mul(y, y)``) summed on the
    tensor's side: one product with the derivative instead of one per occurrence and a sum of derivatives."""
    pairs = list(zip(terms, inputs))
    seen = {}
    for t, x in pairs:
        if t is not None and isinstance(t, Scale):
            seen.setdefault(x, []).append(t)
    if all(len(v) == 1 for v in seen.values()):
        return pairs
    out, done = [], set()
    for t, x in pairs:
        if t is None or not isinstance(t, Scale) or len(seen[x]) == 1:
            out.append((t, x))
            continue
        if x in done:
            continue
        done.add(x)
        nums = [float(u.s) for u in seen[x] if isinstance(u.s, (int, float))]
        tens = [u.s for u in seen[x] if not isinstance(u.s, (int, float))]
        total = None
        for u in tens:
            total = u if total is None else b.op("Add", [total, u])
        if total is None:
            out.append((Scale(sum(nums)), x))
        else:
            out.append((Scale(b.op("Add", [total, b.const(sum(nums))]) if nums and sum(nums) else total), x))
    return out


def _needed(nodes, targets, with_tensors=False):
    """Positions of the nodes whose outputs the ``targets`` depend on (and, ``with_tensors``, those tensors)."""
    want = set(targets)
    out = set()
    for pos in range(len(nodes) - 1, -1, -1):
        node = nodes[pos]
        if any(o in want for o in node.output if o):
            out.add(pos)
            want.update(i for i in node.input if i)
            want.update(_outer_reads(node))
    return (out, want) if with_tensors else out


def _expand_batch(eng, d, K, tail):
    """``d`` [K, 1|B, *tail] with a real batch axis (an Expand only where it may be broadcast)."""
    b = eng.b
    if d in eng.full:
        return d
    bdim = b.op("Shape", [eng.inputs[0]], start=0, end=1, dtype=_INT64, shape=(1,)) if b.opset >= 15 else \
        b.op("Slice", [b.shape_of(eng.inputs[0]), b.const([0], np.int64), b.const([1], np.int64)], dtype=_INT64,
             shape=(1,))
    shp = b.op("Concat", [b.const([K], np.int64), bdim, b.const(list(tail), np.int64)], axis=0, dtype=_INT64,
               shape=(2 + len(tail),))
    r = b.op("Expand", [d, shp], shape=(K, None) + tuple(tail))
    eng.full.add(r)
    return r


def _concat(eng, parts, axis):
    """Concatenation of derivative tensors [K, 1|B, ...] along ``axis``: those whose batch axis may be broadcast get
    a real one first (Concat does not broadcast)."""
    if len(parts) == 1:
        return parts[0]
    if not all(p in eng.full for p in parts):
        parts = [_expand_batch(eng, p, eng.b.shape(p)[0], list(eng.b.shape(p)[2:])) for p in parts]
    r = eng.b.op("Concat", parts, axis=axis)
    if all(p in eng.full for p in parts):
        eng.full.add(r)
    return r


def _y_output(eng):
    """y [batch, n_out]: the forward outputs flattened and concatenated (as the Jacobian graph's)."""
    b = eng.b
    if len(eng.outputs) == 1 and len(b.shape(eng.outputs[0])) == 2:
        return b.op("Identity", [eng.outputs[0]])
    flat = [b.reshape(o, [-1, w]) for o, w in zip(eng.outputs, eng.out_widths)]
    return flat[0] if len(flat) == 1 else b.op("Concat", flat, axis=1)


def _reduce_axis0(b, op, t):
    """``op`` (ReduceSum or ReduceSumSquare) over the leading (direction) axis, kept."""
    s = b.shape(t)
    shape = None if s is None else (1,) + tuple(s[1:])
    if (op == "ReduceSum" and b.opset >= 13) or b.opset >= 18:
        return b.op(op, [t, b.const([0], np.int64)], keepdims=1, shape=shape)
    return b.op(op, [t], axes=[0], keepdims=1, shape=shape)


def _infer_shapes(b, nodes):
    """Static shapes of the outputs of ``nodes`` (added by rules) that the builder does not know, from ONNX shape
    inference on just these nodes."""
    unknown = [o for n in nodes for o in n.output if o and b.shape(o) is None]
    if not unknown:
        return
    made = {o for n in nodes for o in n.output if o}
    ins, inits = [], []
    for name in dict.fromkeys(i for n in nodes for i in n.input if i and i not in made):
        v = b.value(name)
        if v is not None:
            inits.append(numpy_helper.from_array(np.asarray(v), name))
        elif b.shape(name) is not None:
            ins.append(helper.make_tensor_value_info(name, b.dtypes.get(name, b.ftype),
                                                     ["batch" if d is None else d for d in b.shape(name)]))
        else:
            return
    g = helper.make_graph(list(nodes), "infer", ins, [helper.make_tensor_value_info(o, 0, None) for o in unknown],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", b.opset)])
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # pragma: no cover - shapes stay unknown; the caller refuses
        return
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if vi.name in unknown and tt.HasField("shape"):
            b.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def _lift(b, t, rank):
    """``t`` [K, ...] with axes of size 1 inserted after K up to ``rank`` axes (the leading axes a lower-rank tensor
    gains by broadcasting)."""
    s = b.shape(t)
    if s is None:
        raise _Fallback(f"the shape of {t!r} is unknown")
    if len(s) >= rank:
        return t
    extra = rank - len(s)
    return b.unsqueeze(t, list(range(1, 1 + extra)), shape=(s[0],) + (1,) * extra + tuple(s[1:]))


def _finish(eng, outs, name, doc, extra_inputs=()) -> onnx.ModelProto:
    """Outputs ``(tensor, output name, dims)`` renamed through Identity, derivative nodes added to the graph, dead
    nodes pruned, equal nodes merged, checked."""
    b, model = eng.b, eng.model
    g = model.graph
    tensors = {t.name for t in list(g.input) + list(g.initializer)} | {t.name for t in b.new_inits} | \
        {o for n in list(g.node) + b.new_nodes for o in n.output}
    for src, out, _ in outs:
        if src == out:
            continue
        if out in tensors:
            raise ExportError(f"the forward graph already has a tensor named {out!r}, an output name of the "
                              f"{name} graph; rename it in the model")
        b.new_nodes.append(helper.make_node("Identity", [src], [out], name=f"nnp_out_{out}"))
    fold_scales_into_matmul(b)
    g.node.extend(b.new_nodes)
    g.initializer.extend(b.new_inits)
    del g.output[:]
    for _, out, dims in outs:
        g.output.append(helper.make_tensor_value_info(out, b.ftype, dims))
    g.input.extend(extra_inputs)
    del g.value_info[:]
    _merge_equal_constants(g)
    _merge_equal_nodes(g)
    _fold_constant_factors(model)
    _prune(g)
    g.name = (g.name or "model").removesuffix("_jacobian") + f"_{name}"
    model.doc_string = doc
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"the generated {name} graph fails onnx.checker: {exc}") from exc
    return model


_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                               "Bernoulli", "Multinomial"})


def _replace_nodes(g, nodes):
    """The graph's node list replaced by ``nodes`` (copied first: they may be wrappers of the nodes removed)."""
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    del g.node[:]
    g.node.extend(copies)


def _merge_equal_constants(g):
    """Initializers with equal type, shape and values read under one name (the Jacobian graph's builder and the second
    pass's each made their own 1.0, for example), so that equal nodes reading them merge."""
    graph_inputs = {i.name for i in g.input}
    sub_reads = set()
    for n in g.node:
        sub_reads |= _outer_reads(n)
    first, alias = {}, {}
    for t in g.initializer:
        if t.name in graph_inputs or t.name in sub_reads:
            continue
        key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        if key in first:
            alias[t.name] = first[key]
        else:
            first[key] = t.name
    if not alias:
        return
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]


def _fold_constant_factors(model):
    """``Mul(Mul(p, q), c)`` and ``Neg(Mul(p, q))`` with c a scalar constant, the inner product used once and q the
    operand with fewer values per point (a tensor of the forward graph against a derivative tensor with K
    directions): the constant goes onto q, ``Mul(p, Mul(q, c))``, one pass over the large tensor fewer. (The factors
    of a rule's derivative, 1 - y^2 differentiated again, produce these.)"""
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    size = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            size[vi.name] = int(np.prod([d.dim_value for d in tt.shape.dim if d.HasField("dim_value")],
                                        dtype=np.int64))
    scalars = {t.name for t in g.initializer if int(np.prod(t.dims, dtype=np.int64)) == 1}
    for t in g.initializer:
        size[t.name] = int(np.prod(t.dims, dtype=np.int64))
    nodes = list(g.node)  # one set of wrappers: ids below refer to these
    producer = {o: n for n in nodes for o in n.output if o}
    uses = Counter(i for n in nodes for i in n.input)
    uses.update(o.name for o in g.output)
    before, drop, counter = {}, set(), [0]
    names = {o for n in nodes for o in n.output} | {n.name for n in nodes} | {t.name for t in g.initializer} | \
        {i.name for i in g.input}

    def fresh(hint):
        while True:
            counter[0] += 1
            name = f"nnp_{hint}_f{counter[0]}"
            if name not in names:
                names.add(name)
                return name

    for n in nodes:
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type == "Mul" and len(n.input) == 2 and (n.input[0] in scalars) != (n.input[1] in scalars):
            a, c = (n.input[1], n.input[0]) if n.input[0] in scalars else (n.input[0], n.input[1])
        elif n.op_type == "Neg":
            a, c = n.input[0], None
        else:
            continue
        m = producer.get(a)
        if m is None or m.op_type != "Mul" or m.domain not in ("", "ai.onnx") or uses[a] != 1 or id(m) in drop \
                or a not in size:
            continue
        small = [k for k, q in enumerate(m.input) if q in size and size[q] < size[a]]
        if len(small) != 1:
            continue
        k = small[0]
        q2 = fresh("factor")
        node = helper.make_node("Mul", [m.input[k], c], [q2], name=q2) if c is not None else \
            helper.make_node("Neg", [m.input[k]], [q2], name=q2)
        before.setdefault(id(m), []).append(node)
        size[q2] = size[m.input[k]]
        m.input[k] = q2
        m.output[0] = n.output[0]
        producer[n.output[0]] = m
        drop.add(id(n))
    if not drop:
        return
    kept = []
    for n in nodes:
        if id(n) in drop:
            continue
        kept.extend(before.get(id(n), []))
        kept.append(n)
    _replace_nodes(g, kept)


def _merge_equal_nodes(g):
    """Common-subexpression elimination: a node equal to an earlier one (op, inputs, attributes) is dropped and its
    outputs read from the earlier one. Rules called twice on one node (the forward Laplacian's tangent and Laplacian
    parts) and repeated shape computations emit such nodes."""
    alias, seen, keep = {}, {}, []
    outputs = {o.name for o in g.output}
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
        skip = (n.op_type in _NONDETERMINISTIC or n.domain not in ("", "ai.onnx")
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
                or any(o in outputs for o in n.output))
        if skip:
            keep.append(n)
            continue
        key = (n.op_type, tuple(n.input), tuple(o == "" for o in n.output),
               tuple(sorted(a.SerializeToString() for a in n.attribute)))
        prev = seen.get(key)
        if prev is None:
            seen[key] = n
            keep.append(n)
            continue
        for o, p in zip(n.output, prev.output):
            if o:
                alias[o] = p
    _replace_nodes(g, keep)


def _prune(g):
    """Drop nodes no output depends on, and initializers no node reads."""
    nodes = list(g.node)
    need = _needed(nodes, [o.name for o in g.output])
    kept = [n for pos, n in enumerate(nodes) if pos in need]
    _replace_nodes(g, kept)
    kept = list(g.node)
    used = {i for n in kept for i in n.input} | {o.name for o in g.output}
    for n in kept:
        used |= _outer_reads(n)
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


def _common_info(eng, jinfo=None) -> dict:
    if jinfo is not None:  # a graph built over the Jacobian graph: the forward model's sizes
        return {"n_in": jinfo["n_in"], "n_out": jinfo["n_out"], "inputs": jinfo["inputs"],
                "outputs": jinfo["outputs"], "jacobian_mode": jinfo["mode"]}
    return {"n_in": eng.n_in, "n_out": eng.n_out,
            "inputs": [{"name": n, "width": w} for n, w in zip(eng.inputs, eng.in_widths)],
            "outputs": [{"name": n, "width": w} for n, w in zip(eng.outputs, eng.out_widths)]}


def _jacobian_output(eng, jac_names):
    """``dy_dx`` over all inputs' features: the Jacobian graph's per-input outputs concatenated."""
    return jac_names[0] if len(jac_names) == 1 else eng.b.op("Concat", list(jac_names), axis=2)


# ----- Hessian ------------------------------------------------------------------------------------------------
def _second_tangents(fwd_model, jac_mode):
    """The Jacobian graph and forward mode over it (K = n_in): returns (engine, jacobian info, D of each dy_dx
    output as [n_in, 1|B, n_out, w] concatenated over the inputs to [n_in, 1|B, n_out, n_in])."""
    jac, jinfo = build_jacobian_model(fwd_model, mode=jac_mode)
    n_in, n_out = jinfo["n_in"], jinfo["n_out"]
    eng = _Tangents(jac, n_in)
    names = jinfo["jacobian_outputs"]
    D = eng.propagate(eng.identity_seeds(), names)
    b = eng.b
    parts = []
    for name, inp in zip(names, jinfo["inputs"]):
        d = D.get(name)
        if d is None:
            d = b.const(np.zeros((n_in, 1, n_out, inp["width"]), b.np_float))
        parts.append(d)
    return eng, jinfo, _expand_batch(eng, _concat(eng, parts, 3), n_in, [n_out, n_in])


def build_hessian_model(fwd_model: onnx.ModelProto, jac_mode: str = "auto") -> tuple[onnx.ModelProto, dict]:
    """The Hessian graph: inputs as the forward model's; outputs ``y [batch, n_out]``, ``dy_dx [batch, n_out, n_in]``
    and ``d2y_dx2 [batch, n_out, n_in, n_in]`` with ``d2y_dx2[b, i, j, k] = d2 y[b, i] / dx[b, j] dx[b, k]`` over
    all inputs' flattened features (concatenated in input order).

    Forward mode over the Jacobian graph (built in ``jac_mode``: "auto" takes reverse mode when n_out < n_in, i.e.
    forward-over-reverse, about n_in (1 + n_out) forward passes). Returns ``(model, info)``."""
    eng, jinfo, h = _second_tangents(fwd_model, jac_mode)
    b = eng.b
    n_in, n_out = jinfo["n_in"], jinfo["n_out"]
    ht = b.op("Transpose", [h], perm=[1, 2, 3, 0])
    outs = [("y", "y", ["batch", n_out]),
            (_jacobian_output(eng, jinfo["jacobian_outputs"]), "dy_dx", ["batch", n_out, n_in]),
            (ht, "d2y_dx2", ["batch", n_out, n_in, n_in])]
    method = f"forward-over-{jinfo['mode']}"
    model = _finish(eng, outs, "hessian",
                    f"nnpartials companion Hessian graph ({method}): y [batch, n_out], {JACOBIAN_LAYOUT}, "
                    f"{HESSIAN_LAYOUT}")
    info = _common_info(eng, jinfo)
    info.update({"method": method, "layout": HESSIAN_LAYOUT,
                 "layouts": {"dy_dx": JACOBIAN_LAYOUT, "d2y_dx2": HESSIAN_LAYOUT},
                 "graph_outputs": ["y", "dy_dx", "d2y_dx2"]})
    return model, info


# ----- Hessian-vector product ---------------------------------------------------------------------------------
def _free_name(names, base):
    if base not in names:
        return base
    k = 1
    while f"{base}_{k}" in names:
        k += 1
    return f"{base}_{k}"


def build_hvp_model(fwd_model: onnx.ModelProto, v_name: str = "v") -> tuple[onnx.ModelProto, dict]:
    """The Hessian-vector-product graph: inputs the forward model's plus ``v [batch, n_in]`` (named ``v``, or
    ``v_1``, ... when the model already has a tensor called v: ``info["v_input"]``); outputs ``y [batch, n_out]``
    and ``hvp [batch, n_out, n_in]`` with ``hvp[b, i, j] = sum_k d2 y[b, i] / dx[b, j] dx[b, k] v[b, k]``.

    One forward-mode tangent (seeded with v) over the reverse-mode Jacobian graph: about 2 + 2 n_out forward
    passes, whatever n_in is. Returns ``(model, info)``."""
    jac, jinfo = build_jacobian_model(fwd_model, mode="reverse")
    n_in, n_out = jinfo["n_in"], jinfo["n_out"]
    eng = _Tangents(jac, 1)
    b = eng.b
    v = _free_name(b.names, v_name)
    b.names.add(v)
    b.shapes[v] = (None, n_in)
    b.dtypes[v] = b.ftype
    seeds, off = {}, 0
    for name, w in zip(eng.inputs, eng.in_widths):
        part = v if len(eng.inputs) == 1 else b.op("Slice", [v, b.const([off], np.int64), b.const([off + w], np.int64),
                                                             b.const([1], np.int64)], shape=(None, w))
        tail = list(b.shape(name)[1:])
        seeds[name] = b.reshape(part, [1, -1] + tail, shape=(1, None) + tuple(tail))
        eng.full.add(seeds[name])
        off += w
    names = jinfo["jacobian_outputs"]
    D = eng.propagate(seeds, names)
    parts = [D.get(name) if D.get(name) is not None else b.const(np.zeros((1, 1, n_out, i["width"]), b.np_float))
             for name, i in zip(names, jinfo["inputs"])]
    h = _expand_batch(eng, _concat(eng, parts, 3), 1, [n_out, n_in])
    hvp = b.reshape(h, [-1, n_out, n_in], shape=(None, n_out, n_in))
    model = _finish(eng, [("y", "y", ["batch", n_out]), (hvp, "hvp", ["batch", n_out, n_in])], "hvp",
                    f"nnpartials companion Hessian-vector-product graph (forward-over-reverse, one tangent seeded "
                    f"with {v!r}): y [batch, n_out], {HVP_LAYOUT}",
                    extra_inputs=[helper.make_tensor_value_info(v, b.ftype, ["batch", n_in])])
    info = _common_info(eng, jinfo)
    info.update({"method": "forward-over-reverse (one tangent)", "v_input": v, "layout": HVP_LAYOUT,
                 "layouts": {"hvp": HVP_LAYOUT}, "graph_outputs": ["y", "hvp"],
                 "graph_inputs": list(eng.inputs) + [v]})
    return model, info


# ----- Laplacian ---------------------------------------------------------------------------------------------
class _Fallback(Exception):
    """The forward Laplacian does not cover a node; the message names it and why."""


_UNIT = object()  # the unit tensor (d u / d u) in the linear combinations of the elementwise pass


class _ForwardLaplacian:
    """One forward pass carrying, for every input-dependent tensor t, its tangents T[t] [n_in, *shape(t)] and its
    Laplacian L[t] [1, *shape(t)] (absent where zero).

    A node's rule gives, per input x, a term with ``T[y] = sum_x term(T[x])``. Then
    ``L[y] = sum_x term(L[x]) + sum_k (d_k term)(T[x]_k)``: the second part is zero for a constant term; for a
    scale ``s * dx`` it is ``sum_k (d_k s)(d_k x)``, from the elementwise derivative of the nodes the rule emitted
    for s (or, where those are not elementwise, from the tangents of s); for a linear map that depends on the input
    (softmax, normalization layers, a product of two input-dependent matrices) it is the map's own derivative,
    direction k applied to the tangent k (:meth:`_linear_correction`)."""

    def __init__(self, model: onnx.ModelProto):
        self.eng = _Engine(model, "forward")  # K = n_in for the tangents
        self.b = self.eng.b
        self.var = self.eng.var  # grows with the input-dependent tensors the rules emit (their rules see them)
        self.T: dict = {}
        self.L: dict = {}
        self._pairs: dict = {}

    # -- helpers -----------------------------------------------------------------------------------------------
    def _mark_var(self, nodes):
        for n in nodes:
            if n.domain in ("", "ai.onnx") and n.op_type in ZERO_DERIVATIVE:
                continue
            if any(i in self.var for i in n.input if i):
                self.var.update(o for o in n.output if o and self.b.is_float(o))

    def _with_k(self, K, fn):
        eng = self.eng
        old = eng.K
        eng.K = K
        try:
            return fn()
        finally:
            eng.K = old

    def _align(self, r, y):
        """A Laplacian part [1, ...] brought to [1, *shape(y)] (leading axes inserted, non-batch axes expanded)."""
        b = self.b
        ys = (1,) + tuple(b.shape(y))
        r = _lift(b, r, len(ys))
        rs = b.shape(r)
        if rs is None or len(rs) != len(ys) or any(v is not None and rv != v for rv, v in zip(rs[1:], ys[1:])):
            r = b.op("Expand", [r, b.const([1] + [1 if v is None else v for v in ys[1:]], np.int64)], shape=ys)
        return r

    def _pair(self, u, x, own):
        """P(u, x) = sum_k T[u]_k T[x]_k, [1, ...]. ``own``: (y, s, x) when u is the node's output y with
        T[y] = s T[x] (a single input-dependent input), which gives P(y, x) = s P(x, x) without a product of
        tangents."""
        key = frozenset((u, x))
        if key in self._pairs:
            return self._pairs[key]
        b = self.b
        if u == x:
            r = _reduce_axis0(b, "ReduceSumSquare", self.T[x])
        elif own is not None and own[0] in (u, x) and own[2] in (u, x):
            y, s, xi = own
            p = self._pair(xi, xi, None)
            p = _lift(b, p, 1 + len(b.shape(y)))
            r = b.op("Mul", [p, b.const(float(s)) if isinstance(s, (int, float)) else s])
        else:
            tu, tx = self.T[u], self.T[x]
            rank = max(len(b.shape(tu)), len(b.shape(tx)))
            r = _reduce_axis0(b, "ReduceSum", b.op("Mul", [_lift(b, tu, rank), _lift(b, tx, rank)]))
        self._pairs[key] = r
        return r

    def _tangents_of(self, nodes):
        """T of the input-dependent outputs of ``nodes`` (emitted by a rule), by their rules."""
        eng, b = self.eng, self.b
        _infer_shapes(b, nodes)
        for n in nodes:
            if n.domain in ("", "ai.onnx") and n.op_type in ZERO_DERIVATIVE:
                continue
            if not any(o and o in self.var and o not in self.T for o in n.output):
                continue
            missing = [i for i in n.input if i and i in self.var and i not in self.T]
            if missing:
                raise _Fallback(f"no tangents for {missing[0]!r} where {n.op_type} reads it")
            try:
                rules = eng._rule(n)
            except ExportError as exc:
                raise _Fallback(f"{n.op_type} in a derivative: {exc}") from None
            for k, terms in rules.items():
                y = n.output[k]
                parts = [eng._fwd(t, self.T[i], i, y) for t, i in _merge_scales(b, terms, n.input)
                         if t is not None and i in self.T]
                if parts:
                    self.T[y] = eng._sum(parts)

    def _grad(self, chain, s, u):
        """d s / d u elementwise through the ``chain`` nodes, as a linear combination ``{tensor or _UNIT: coefficient}``
        (so that 1 - y^2 gives ``{y: -2}``, one product, not a sum and a negation), or None for zero."""
        b = self.b
        G = {u: {_UNIT: 1.0}}
        for n in chain:
            if n.op_type in ZERO_DERIVATIVE or not any(i in G for i in n.input if i):
                continue
            terms = RULES[n.op_type](RuleContext(b, n, self.var, 1))
            if isinstance(terms, dict):
                raise _Fallback(f"{n.op_type} in the derivative of a scale factor")
            total = {}
            for t, i in zip(terms, n.input):
                if t is None or i not in G:
                    continue
                if not isinstance(t, Scale):
                    raise _Fallback(f"{n.op_type} in the derivative of a scale factor has a non-elementwise rule")
                for k, c in G[i].items():
                    if isinstance(t.s, (int, float)):
                        key, coef = k, c * float(t.s)
                    else:
                        key, coef = (t.s if k is _UNIT else b.op("Mul", [k, t.s])), c
                    total[key] = total.get(key, 0.0) + coef
            total = {k: c for k, c in total.items() if c != 0.0}
            if total:
                G[n.output[0]] = total
        return G.get(s)

    def _combine(self, g, p):
        """``sum_k coefficient_k * tensor_k * p`` for a linear combination g (see :meth:`_grad`)."""
        b = self.b
        parts = []
        for k, c in g.items():
            if k is _UNIT:
                parts.append(p if c == 1.0 else b.op("Mul", [p, b.const(c)]))
            else:
                parts.append(b.op("Mul", [k if c == 1.0 else b.op("Mul", [k, b.const(c)]), p]))
        r = parts[0]
        for q in parts[1:]:
            r = b.op("Add", [r, q])
        return r

    def _scale_correction(self, emitted, s, x, y, own):
        """sum_k (d_k s)(d_k x) for a scale term s * dx (input x, output y), as ``(inner, outer)``: the correction is
        ``s * inner + outer`` (inner [1, *shape(x)] or None: the part through y's own tangents, T[y] = s T[x], when
        x and y have one shape; outer [1, *shape(y)] or None)."""
        b = self.b
        produced = {o: n for n in emitted for o in n.output if o}
        chain, want, seen = [], [s], set()
        while want:
            t = want.pop()
            if t in seen or t not in produced:
                continue
            seen.add(t)
            n = produced[t]
            chain.append(n)
            want.extend(i for i in n.input if i)
        order = {id(n): k for k, n in enumerate(emitted)}
        chain.sort(key=lambda n: order[id(n)])
        inside = {o for n in chain for o in n.output}
        sources = []
        for t in ([s] if s not in inside else []) + [i for n in chain for i in n.input if i]:
            if t in self.var and t not in inside and t not in sources:
                sources.append(t)
        elementwise = all(n.domain in ("", "ai.onnx") and (n.op_type in _ELEMENTWISE or n.op_type in ZERO_DERIVATIVE)
                          for n in chain)
        if not elementwise or any(u not in self.T for u in sources):
            # the factor's own tangents (n_in of them) and their pairing with x's
            self._tangents_of(chain)
            if s not in self.T:
                return None, None
            return None, self._align(self._pair(s, x, None), y)
        # elementwise: d_k s = sum_u (ds/du) d_k u, so the correction is sum_u (ds/du) P(u, x): the derivative on
        # the tensors' side, one pairing of tangents per source
        same = tuple(b.shape(x)) == tuple(b.shape(y))
        inner, outer = [], []
        for u in sources:
            g = self._grad(chain, s, u)
            if not g:
                continue
            if own is not None and u == own[0] and x == own[2] and same:  # P(y, x) = s P(x, x): s goes outside
                inner.append(self._combine(g, self._pair(x, x, None)))
            else:
                outer.append(self._combine(g, _lift(b, self._pair(u, x, own), 1 + len(b.shape(y)))))

        def total(parts):
            if not parts:
                return None
            r = parts[0]
            for q in parts[1:]:
                r = b.op("Add", [r, q])
            return r

        inner, outer = total(inner), total(outer)
        return inner, None if outer is None else self._align(outer, y)

    # -- linear maps that depend on the input -------------------------------------------------------------------
    def _linear_correction(self, where, closure, d, r, y):
        """sum_k (d_k M)(T[x]_k) for a linear map M that depends on the input, applied as ``r = M(d)`` to the tangents
        ``d = T[x]`` by the ``closure`` nodes: each node differentiated with tangent k paired with slot k of the
        tangent tensors it reads (a "diagonal" forward mode), then summed over the slots."""
        b = self.b
        _infer_shapes(b, closure)
        slot, delta = {d}, {}
        for n in closure:
            ins = [i for i in n.input if i]
            if not any(i in slot for i in ins):  # a tensor of the map itself (no slot axis): ordinary tangents
                if not (n.domain in ("", "ai.onnx") and n.op_type in ZERO_DERIVATIVE):
                    self._mark_var([n])
                    self._tangents_of([n])
                continue
            outs = [o for o in n.output if o]
            slot.update(outs)
            if len(outs) != 1:
                raise _Fallback(f"{where}: {n.op_type} with several outputs in its derivative")
            dd = self._diag(where, n, slot, delta)
            if dd is not None:
                b.shapes.setdefault(dd, b.shape(outs[0]))
                delta[outs[0]] = dd
        dr = delta.get(r)
        if dr is None:
            return None
        return self._align(_reduce_axis0(b, "ReduceSum", dr), y)

    def _diag(self, where, n, slot, delta):
        """The diagonal tangent of node n's output (n reads at least one slot tensor), or None for zero."""
        b = self.b
        op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        ins = list(n.input)

        def tan(i):
            if not i:
                return None
            if i in slot:
                return delta.get(i)
            if i in self.var:
                if i not in self.T:
                    raise _Fallback(f"{where}: no tangents for {i!r}")
                return self.T[i]
            return None

        def rank(t, is_slot=True):
            s = b.shape(t)
            if s is None:
                raise _Fallback(f"{where}: unknown shape of {t!r}")
            return len(s) + (0 if is_slot else 1)

        def same_op(*new_inputs):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            return b.op(n.op_type, list(new_inputs), **attrs)

        def add_all(parts):
            parts = [p for p in parts if p is not None]
            if not parts:
                return None
            rk = max(rank(p) for p in parts)
            parts = [_lift(b, p, rk) for p in parts]
            r = parts[0]
            for p in parts[1:]:
                r = b.op("Add", [r, p])
            return r

        if op in ("Mul", "MatMul"):
            a, c = ins[:2]
            if a in slot and c in slot:
                raise _Fallback(f"{where}: a product of two derivative tensors")
            parts = []
            for pos, (i, other) in enumerate(((a, c), (c, a))):
                t = tan(i)
                if t is None:
                    continue
                rk = max(rank(t), rank(other, other in slot))
                left, right = _lift(b, t, rk), _lift(b, other, rk) if other in slot else other
                if op == "MatMul":
                    mm = [left, right] if pos == 0 else [right, left]
                    s0, s1 = b.shape(mm[0]), b.shape(mm[1])
                    shape = None if s0 is None or s1 is None else \
                        broadcast_shapes(s0[:-2], s1[:-2]) + (s0[-2], s1[-1])
                    parts.append(b.op("MatMul", mm, shape=shape))
                else:
                    parts.append(b.op("Mul", [left, right]))
            return add_all(parts)
        if op in ("Add", "Sub", "Sum"):
            if any(i not in slot and i in self.var for i in ins if i):
                raise _Fallback(f"{where}: {op} of a derivative tensor and an input-dependent one")
            parts = [tan(i) for i in ins]
            if op == "Sub" and parts[1] is not None:
                parts[1] = b.op("Neg", [parts[1]])
            return add_all(parts)
        if op in ("Neg", "Identity", "Cast"):
            t = tan(ins[0])
            return None if t is None else same_op(t)
        if op == "Div":
            if ins[1] in slot or ins[1] in self.var:
                raise _Fallback(f"{where}: a division by an input-dependent tensor in its derivative")
            t = tan(ins[0])
            return None if t is None else b.op("Div", [t, ins[1]])
        if op in ("ReduceSum", "ReduceMean", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Expand", "Flatten",
                  "Slice", "Pad", "Gather", "Tile"):
            if any(i in slot or i in self.var for i in ins[1:] if i):
                raise _Fallback(f"{where}: {op} with input-dependent parameters in its derivative")
            t = tan(ins[0])
            return None if t is None else same_op(t, *ins[1:])
        if op == "Einsum":
            eq = helper.get_attribute_value(next(a for a in n.attribute if a.name == "equation"))
            eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
            lhs, out = eq.split("->")
            specs = lhs.split(",")
            z = out[0]  # the rules' einsums carry the slot letter first
            if not all(z == sp[0] for sp, i in zip(specs, ins) if i in slot):
                raise _Fallback(f"{where}: an Einsum without a leading slot index")
            parts = []
            for j, i in enumerate(ins):
                t = tan(i)
                if t is None:
                    continue
                new_specs = list(specs)
                if i not in slot:
                    new_specs[j] = z + specs[j]
                ops = [t if k == j else ins[k] for k in range(len(ins))]
                parts.append(b.op("Einsum", ops, equation=",".join(new_specs) + "->" + out,
                                  shape=b.shape(n.output[0])))
            return add_all(parts)
        raise _Fallback(f"{where}: {op} in its derivative is not covered by the forward Laplacian")

    def _rule_k1(self, node):
        """The node's rule again for one direction (the Laplacian), since linear maps bake K into reshapes."""
        terms = RULES[node.op_type](RuleContext(self.b, node, self.var, 1))
        terms = terms if isinstance(terms, dict) else {0: terms}
        return {k: _merge_scales(self.b, t, node.input) for k, t in terms.items()}  # positions as the tangents'

    # -- the pass ----------------------------------------------------------------------------------------------
    def run(self):
        eng, b, T, L = self.eng, self.b, self.T, self.L
        off = 0
        for name, w in zip(eng.inputs, eng.in_widths):
            seed = np.zeros((eng.K, 1, w), b.np_float)
            seed[off:off + w, 0, :] = np.eye(w, dtype=b.np_float)
            T[name] = b.const(seed.reshape((eng.K, 1) + tuple(b.shape(name)[1:])), hint="seed")
            off += w
        for node in eng.model.graph.node:
            if not any(i in T for i in node.input if i) or not any(o and o in self.var for o in node.output):
                continue
            where = f"{node.op_type} node {node.name or node.output[0]!r}"
            n0 = len(b.new_nodes)
            rules = {k: _merge_scales(b, terms, node.input) for k, terms in eng._rule(node).items()}
            emitted = b.new_nodes[n0:]  # the nodes computing the terms' factors (the merged sums among them)
            self._mark_var(emitted)
            rules1 = None
            for k, pairs in rules.items():
                y = node.output[k]
                used = [(p, t, x) for p, (t, x) in enumerate(pairs) if t is not None and x in T]
                if not used:
                    continue
                parts, corrections = [], []
                for _, t, x in used:
                    m0 = len(b.new_nodes)
                    part = eng._fwd(t, T[x], x, y)
                    parts.append(part)
                    if isinstance(t, Linear):
                        closure = b.new_nodes[m0:]
                        if any(i in self.var for c in closure for i in c.input if i
                               and not (c.domain in ("", "ai.onnx") and c.op_type in ZERO_DERIVATIVE)):
                            corrections.append((closure, T[x], part))
                T[y] = eng._sum(parts)
                own = None
                if len(used) == 1 and isinstance(used[0][1], Scale):
                    own = (y, used[0][1].s, used[0][2])
                if corrections:
                    self._tangents_of(emitted)  # the tensors the maps read (softmax's y, normalization's xhat)
                lparts = [self._linear_correction(where, closure, d, r, y) for closure, d, r in corrections]
                for p, t, x in used:
                    inner = None
                    if isinstance(t, Scale) and isinstance(t.s, str) and t.s in self.var:
                        inner, outer = self._scale_correction(emitted, t.s, x, y, own)
                        lparts.append(outer)
                    lx = L.get(x)
                    if inner is not None:  # s * (L[x] + inner): one product with s for both
                        lx = inner if lx is None else b.op("Add", [lx, inner])
                    if lx is None:
                        continue
                    if isinstance(t, Linear):
                        if rules1 is None:
                            rules1 = self._rule_k1(node)
                        t1 = rules1[k][p][0]
                        lparts.append(self._with_k(1, lambda: eng._fwd(t1, lx, x, y)))
                    else:
                        lparts.append(self._with_k(1, lambda: eng._fwd(t, lx, x, y)))
                lparts = [q for q in lparts if q is not None]
                if lparts:
                    r = lparts[0]
                    for q in lparts[1:]:
                        r = b.op("Add", [r, q])
                    L[y] = r
        return [T.get(o) for o in eng.outputs], [L.get(o) for o in eng.outputs]


def _laplacian_forward(fwd_model):
    fl = _ForwardLaplacian(fwd_model)
    eng, b = fl.eng, fl.b
    n_in, n_out = eng.n_in, eng.n_out
    y = _y_output(eng)
    Ts, Ls = fl.run()
    ds, ls = [], []
    for o, d, lap, w in zip(eng.outputs, Ts, Ls, eng.out_widths):
        if d is None:
            d = b.const(np.zeros((n_in, 1, w), b.np_float))
        else:
            was_full, d = d in eng.full, b.reshape(d, [n_in, -1, w], shape=(n_in, None, w))
            if was_full:
                eng.full.add(d)
        ds.append(d)
        lap = b.const(np.zeros((1, 1, w), b.np_float)) if lap is None else b.reshape(lap, [1, -1, w],
                                                                                  shape=(1, None, w))
        ls.append(lap)
    d = _expand_batch(eng, _concat(eng, ds, 2), n_in, [n_out])
    jt = b.op("Transpose", [d], perm=[1, 2, 0])
    lap = _expand_batch(eng, _concat(eng, ls, 2), 1, [n_out])
    lap = b.reshape(lap, [-1, n_out], shape=(None, n_out))
    outs = [(y, "y", ["batch", n_out]), (jt, "dy_dx", ["batch", n_out, n_in]), (lap, "laplacian", ["batch", n_out])]
    model = _finish(eng, outs, "laplacian",
                    f"nnpartials companion Laplacian graph (forward Laplacian): y [batch, n_out], {JACOBIAN_LAYOUT}, "
                    f"{LAPLACIAN_LAYOUT}")
    return model, _common_info(eng)


def _laplacian_from_hessian(fwd_model):
    eng, jinfo, h = _second_tangents(fwd_model, "auto")
    b = eng.b
    n_in, n_out = jinfo["n_in"], jinfo["n_out"]
    eye = b.const(np.eye(n_in, dtype=b.np_float).reshape(n_in, 1, 1, n_in))
    diag = b.op("Mul", [h, eye])
    lap = b.op("ReduceSum", [diag, b.const([0, 3], np.int64)], keepdims=0, shape=(None, n_out)) if b.opset >= 13 \
        else b.op("ReduceSum", [diag], axes=[0, 3], keepdims=0, shape=(None, n_out))
    outs = [("y", "y", ["batch", n_out]),
            (_jacobian_output(eng, jinfo["jacobian_outputs"]), "dy_dx", ["batch", n_out, n_in]),
            (lap, "laplacian", ["batch", n_out])]
    model = _finish(eng, outs, "laplacian",
                    f"nnpartials companion Laplacian graph (trace of the forward-over-{jinfo['mode']} Hessian): "
                    f"y [batch, n_out], {JACOBIAN_LAYOUT}, {LAPLACIAN_LAYOUT}")
    return model, _common_info(eng, jinfo)


def build_laplacian_model(fwd_model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The Laplacian graph: inputs as the forward model's; outputs ``y [batch, n_out]``,
    ``dy_dx [batch, n_out, n_in]`` and ``laplacian [batch, n_out]``, the trace of each output's Hessian over all
    inputs' flattened features.

    One forward-Laplacian pass (n_in tangents and one Laplacian per tensor, never the Hessian) where every rule
    allows it; otherwise the trace of the Hessian graph. ``info["laplacian_method"]`` is "forward-laplacian" or
    "hessian-trace", and ``info["laplacian_fallback_reason"]`` names the node that needed the fallback."""
    try:
        model, info = _laplacian_forward(fwd_model)
        info.update({"laplacian_method": "forward-laplacian", "laplacian_fallback_reason": None})
    except _Fallback as exc:
        model, info = _laplacian_from_hessian(fwd_model)
        info.update({"laplacian_method": "hessian-trace", "laplacian_fallback_reason": str(exc)})
    info.update({"method": info["laplacian_method"], "layout": LAPLACIAN_LAYOUT,
                 "layouts": {"dy_dx": JACOBIAN_LAYOUT, "laplacian": LAPLACIAN_LAYOUT},
                 "graph_outputs": ["y", "dy_dx", "laplacian"]})
    return model, info


# ----- do second derivatives vanish? ---------------------------------------------------------------------------
def second_derivatives_vanish(fwd_model: onnx.ModelProto) -> tuple[bool, str]:
    """``(True, reason)`` when every op that depends on the input is linear (with constant weights) or piecewise
    linear (Relu, LeakyRelu, PRelu, Clip, HardSigmoid, Max/Min, Abs, MaxPool, ...): the Hessian is then zero almost
    everywhere (and undefined on the kinks). The reason names the piecewise-linear ops found, or the first ops with a
    nonzero second derivative."""
    eng = _Engine(fwd_model, "forward")
    var = eng.var
    nodes = list(eng.model.graph.node)
    # the nodes on a differentiable path from the inputs to the outputs (not those feeding masks or shapes only)
    want, relevant = set(eng.outputs), set()
    for pos in range(len(nodes) - 1, -1, -1):
        node = nodes[pos]
        if node.domain in ("", "ai.onnx") and node.op_type in ZERO_DERIVATIVE:
            continue
        if any(o and o in want and o in var for o in node.output):
            relevant.add(pos)
            want.update(i for i in node.input if i in var)
    linear, piecewise, smooth = Counter(), Counter(), {}
    for pos, node in enumerate(nodes):
        ins = [i for i in node.input if i and i in var]
        if pos not in relevant or not ins:
            continue
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        first_only = all(i not in var for i in node.input[1:] if i)  # weights, bounds, shapes: constant
        factors = [i for i in (node.input[:2] if op == "Gemm" else node.input) if i in var]
        if op in _LINEAR_OPS and (first_only or op in _JOINTLY_LINEAR_OPS
                                  or (op == "ScatterElements" and node.input[1] not in var)):
            linear[op] += 1
        elif op in _BILINEAR_OPS and len(factors) <= 1:
            linear[op] += 1
        elif op == "Div" and node.input[1] not in var:
            linear[op] += 1
        elif op in _PIECEWISE_LINEAR_OPS and (op != "PRelu" or first_only):
            piecewise[op] += 1
        else:
            smooth.setdefault(op, node.name or node.output[0])

    def listing(counter):
        return ", ".join(f"{op} ({n} nodes)" if n > 1 else op for op, n in sorted(counter.items()))

    if smooth:
        named = ", ".join(f"{op} (node {name!r})" for op, name in list(smooth.items())[:6])
        more = f" and {len(smooth) - 6} more op types" if len(smooth) > 6 else ""
        return False, f"ops with a nonzero second derivative depend on the input: {named}{more}"
    if piecewise:
        return True, (f"every op that depends on the input is linear or piecewise linear (piecewise linear: "
                      f"{listing(piecewise)}; linear: {listing(linear) or 'none'}), so the Hessian is zero almost "
                      f"everywhere (undefined on the kinks)")
    return True, (f"the model is linear in its inputs (linear ops: {listing(linear) or 'none'}), so the Hessian is "
                  f"zero")


__all__ = ["build_hessian_model", "build_laplacian_model", "build_hvp_model", "second_derivatives_vanish",
           "HESSIAN_LAYOUT", "LAPLACIAN_LAYOUT", "HVP_LAYOUT", "JACOBIAN_LAYOUT", "LAPLACIAN_METHODS"]
