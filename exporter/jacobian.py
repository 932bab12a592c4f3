"""Forward ONNX graph -> companion Jacobian graph (outputs ``y`` and ``dy_dx``).

Every derivative tensor has the layout ``[K, batch, *shape of the forward tensor]``: K directions first, so
a forward-graph scale ``s`` of shape ``[batch, ...]`` broadcasts against it without reshaping and a dense
layer's derivative is one large ``MatMul``. In forward mode K = n_in (tangents, one per input feature); in
reverse mode K = n_out (cotangents, one per output). The graph then transposes the result to the public
layout ``dy_dx[b, i, j] = d y[b, i] / d x[b, j]``.

Forward mode costs about n_in times a forward pass, reverse mode about n_out times; ``mode="auto"`` picks
reverse when ``n_out < n_in`` and forward otherwise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from nnpartials.errors import ExportError, UnsupportedOpError
from nnpartials.exporter.graph import GraphBuilder, broadcast_shapes
from nnpartials.exporter.rules import RULES, ZERO_DERIVATIVE, Linear, MatMulW, RuleContext, Scale
import nnpartials.exporter.rules_nn  # noqa: F401  (registers the network-layer rules)

MODES = ("auto", "forward", "reverse")


@dataclass(frozen=True)
class _Lazy:
    """A reverse-mode cotangent ``base * sum_i c_i prod_j f_ij`` whose elementwise factors (scale terms: forward
    tensors and numbers) are not multiplied in yet. A chain or region of elementwise ops (gelu's Mul, Neg, Erf,
    Sub, Mul) then costs one product with the cotangent, [K, batch, ...], after its factor was computed on the
    forward tensors' side, [batch, ...], with the numbers of every path folded into one per term; instead of a
    product with the cotangent per op. ``like``: the forward tensor the cotangent belongs to."""
    base: str
    terms: tuple
    like: str


def jacobian_output_names(input_names):
    """Names of the Jacobian outputs: ``dy_dx`` for one input, ``dy_dx__<name>`` for each of several."""
    if len(input_names) == 1:
        return ["dy_dx"]
    return [f"dy_dx__{n}" for n in input_names]


def choose_mode(n_in: int, n_out: int, mode: str = "auto") -> str:
    if mode not in MODES:
        raise ExportError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "reverse" if n_out < n_in else "forward"


class _Engine:
    def __init__(self, model: onnx.ModelProto, mode: str):
        self.model = copy.deepcopy(model)
        self.b = GraphBuilder(self.model)
        g = self.model.graph
        self.inputs = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
        self.outputs = [o.name for o in g.output]
        self.in_widths = [self._width(n, "input") for n in self.inputs]
        self.out_widths = [self._width(n, "output") for n in self.outputs]
        self.n_in, self.n_out = sum(self.in_widths), sum(self.out_widths)
        self.mode = choose_mode(self.n_in, self.n_out, mode)
        self.K = self.n_in if self.mode == "forward" else self.n_out
        self.var = self._variable_tensors()
        self.full = self.b.full  # derivative tensors known to have a real batch axis (not broadcast size 1)

    def _width(self, name, kind):
        s = self.b.shape(name)
        if s is None or len(s) < 1 or any(d is None for d in s[1:]):
            raise ExportError(f"graph {kind} {name!r} has shape {s}; expected [batch, static dims...]")
        return int(np.prod(s[1:], dtype=np.int64)) if len(s) > 1 else 1

    def _variable_tensors(self):
        """Float tensors that depend on an input through ops with a derivative (not Sign, Floor, Shape, ...).

        A control-flow node (If, Loop, Scan) whose body reads an input-dependent tensor from the outer graph is
        refused here: the body's reads are not among the node's inputs, so without this check its outputs would be
        taken as constants and get a zero derivative."""
        var = set(self.inputs)
        for node in self.model.graph.node:
            if node.domain in ("", "ai.onnx") and node.op_type in ZERO_DERIVATIVE:
                continue
            implicit = _outer_reads(node)
            hit = sorted(n for n in implicit if n in var)
            if hit:
                raise UnsupportedOpError(
                    node.op_type, node.name or node.output[0],
                    f"its subgraph reads the input-dependent tensor {hit[0]!r}; control flow is not differentiated "
                    f"(export the model without data-dependent branches or loops, e.g. unrolled)", has_rule=False)
            if any(i in var for i in node.input if i):
                for o in node.output:
                    if o and self.b.is_float(o):
                        var.add(o)
        return var

    def _rule(self, node):
        fn = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fn is None:
            raise UnsupportedOpError(node.op_type, node.name or node.output[0],
                                     "add a rule in nnpartials/exporter/rules.py" if not node.domain
                                     else f"custom domain {node.domain!r}")
        terms = fn(RuleContext(self.b, node, self.var, self.K))
        return terms if isinstance(terms, dict) else {0: terms}

    def _dshape(self, name):
        s = self.b.shape(name)
        return None if s is None else (self.K,) + tuple(s)

    # ----- term application ---------------------------------------------------------------------------------
    def _scale_tensor(self, s):
        return self.b.const(float(s)) if isinstance(s, (int, float)) else s

    def _is_batched(self, name):
        s = self.b.shape(name)
        return s is not None and len(s) > 0 and s[0] is None

    def _scale(self, term, d, d_shape, y):
        """``s * d`` for a Scale term (both modes): the product and whether it has a real batch axis."""
        full = d in self.full
        if isinstance(term.s, (int, float)) and float(term.s) == 1.0:
            return d, full
        b = self.b
        s = self._scale_tensor(term.s)
        dv, sv = b.value(d), b.value(s)
        if dv is not None and sv is not None and dv.dtype == sv.dtype == b.np_float:  # both constant (a seed row)
            return b.const(dv * sv, hint="seeds"), full
        r = b.op("Mul", [d, s], shape=broadcast_shapes(d_shape or (), b.shape(s) or ()))
        return r, full or (self._is_batched(s) and len(b.shape(s)) == len(b.shape(y)))

    def _fwd(self, term, d, x, y):
        b = self.b
        if isinstance(term, Scale):
            d_shape = self._dshape(x)
            xs, ys0, ss = b.shape(x), b.shape(y), b.shape(term.s) if isinstance(term.s, str) else None
            if xs is not None and ys0 is not None and ss is not None and len(ss) > len(xs) and len(ys0) > len(xs):
                # a scale of higher rank than x (x broadcast to a higher rank, e.g. a [batch, n] operand times a
                # [K, batch, n] derivative tensor of a Jacobian graph): x's leading axes go after the K axis first,
                # else the scale's leading axes would align with K
                extra = len(ys0) - len(xs)
                d_shape = None if d_shape is None else (d_shape[0],) + (1,) * extra + tuple(d_shape[1:])
                was_full, d = d in self.full, b.unsqueeze(d, list(range(1, 1 + extra)), shape=d_shape)
                if was_full:
                    self.full.add(d)
            r, full = self._scale(term, d, d_shape, y)
            ys, rs = self._dshape(y), b.shape(r)
            if ys is not None and rs is not None and len(rs) < len(ys):  # broadcasting that adds leading axes
                r = b.unsqueeze(r, list(range(1, 1 + len(ys) - len(rs))), shape=(rs[0],) + (1,) * (len(ys) - len(rs))
                                + tuple(rs[1:]))
                rs = b.shape(r)
            if ys is not None and rs is not None and (tuple(rs[2:]) != tuple(ys[2:]) or
                                                      (len(ys) > 1 and ys[1] is not None and rs[1] != ys[1])):
                r = b.op("Expand", [r, b.const([1] + [1 if v is None else v for v in ys[1:]], np.int64)],
                         shape=ys)
            if full:
                self.full.add(r)
            return r
        if isinstance(term, MatMulW):
            r = b.op("MatMul", [d, b.const(term.w)], shape=self._dshape(y))
        elif isinstance(term, Linear):
            r = term.fwd(b, d)
            b.shapes.setdefault(r, self._dshape(y))
        else:  # pragma: no cover
            raise TypeError(term)
        if d in self.full:
            self.full.add(r)
        return r

    def _rev(self, term, g, x, y):
        b = self.b
        xs = b.shape(x)
        if isinstance(term, Scale):
            r, full = self._scale(term, g, b.shape(g), y)
            rs = b.shape(r)
            if xs is None or rs is None:
                raise ExportError(f"unknown shape while differentiating {x!r}")
            if len(xs) + 1 > len(rs):
                raise ExportError(f"tensor {x!r} of shape {xs} has a derivative of shape {rs}")
            if len(xs) + 1 < len(rs):  # x was broadcast to a higher rank: sum over the leading axes it lacks
                extra = len(rs) - 1 - len(xs)
                r = b.op("ReduceSum", [r, b.const(list(range(1, 1 + extra)), np.int64)], keepdims=0,
                         shape=(rs[0],) + tuple(rs[1 + extra:]))
                rs = b.shape(r)
            axes = [i + 1 for i in range(len(xs)) if xs[i] == 1 and rs[i + 1] != 1]
            if axes:
                r = b.op("ReduceSum", [r, b.const(axes, np.int64)], keepdims=1, shape=self._dshape(x))
            if full:
                self.full.add(r)
            return r
        if isinstance(term, MatMulW):
            gv = b.value(g)
            if gv is not None:  # the seed times W^T is a constant: computed here, where fold_scales_into_matmul sees it
                r = b.const(np.matmul(gv, term.w.T).astype(b.np_float), hint="seedw")
            else:
                r = b.op("MatMul", [g, b.const(np.ascontiguousarray(term.w.T))], shape=self._dshape(x))
        elif isinstance(term, Linear):
            r = term.rev(b, g)
            b.shapes.setdefault(r, self._dshape(x))
        else:  # pragma: no cover
            raise TypeError(term)
        if g in self.full:
            self.full.add(r)
        return r

    def _sum(self, parts):
        r = self._plain_sum(parts)
        if any(p in self.full for p in parts):
            self.full.add(r)
        return r

    # ----- the two modes ------------------------------------------------------------------------------------
    def forward_mode(self):
        b, D = self.b, {}
        off = 0
        for name, w in zip(self.inputs, self.in_widths):
            seed = np.zeros((self.K, 1, w), b.np_float)
            seed[off:off + w, 0, :] = np.eye(w, dtype=b.np_float)
            D[name] = b.const(seed.reshape((self.K, 1) + tuple(b.shape(name)[1:])), hint="seed")
            off += w
        for node in self.model.graph.node:
            if not any(i in D for i in node.input if i):
                continue
            if not any(o and o in self.var for o in node.output):
                continue
            for k, terms in self._rule(node).items():
                y = node.output[k]
                parts = [self._fwd(t, D[x], x, y) for t, x in zip(terms, node.input) if t is not None and x in D]
                if parts:
                    D[y] = self._sum(parts)
        return [D.get(o) for o in self.outputs]

    def reverse_mode(self):
        b = self.b
        contrib: dict[str, list] = {}
        off = 0
        for name, w in zip(self.outputs, self.out_widths):
            tail = b.shape(name)[1:]
            seed = np.zeros((self.K, 1, w), b.np_float)
            seed[off:off + w, 0, :] = np.eye(w, dtype=b.np_float)
            contrib.setdefault(name, []).append(b.const(seed.reshape((self.K, 1) + tuple(tail)), hint="seed"))
            off += w
        for node in reversed(self.model.graph.node):
            outs = [o for o in node.output if o in contrib]
            if not outs or not any(i in self.var for i in node.input if i):
                continue
            for k, terms in self._rule(node).items():
                y = node.output[k]
                if y not in contrib:
                    continue
                g = self._gather(contrib[y], y)
                for t, x in zip(terms, node.input):
                    if t is None or x not in self.var:
                        continue
                    if isinstance(t, Scale) and self._deferrable(t, x, y):
                        contrib.setdefault(x, []).append(self._compose(g, t.s, x))
                    elif isinstance(t, MatMulW) and isinstance(g, _Lazy):
                        # a number the factor would be multiplied by goes into the constant W^T instead
                        gm, k = self._materialize(g, pull_number=True)
                        w = t.w if k == 1.0 else (t.w * k).astype(t.w.dtype)
                        contrib.setdefault(x, []).append(self._rev(MatMulW(w), gm, x, y))
                    else:
                        r = self._rev(t, self._materialize(g), x, y)
                        if isinstance(t, Linear) and t.rev_factor is not None:
                            r = _Lazy(r, ((1.0, (t.rev_factor,)),), x)
                        contrib.setdefault(x, []).append(r)
        return [self._gather(contrib[i], i, materialize=True) if i in contrib else None for i in self.inputs]

    # ----- reverse mode: elementwise factors multiplied in once (see _Lazy) -----------------------------------
    def _deferrable(self, term, x, y):
        """A scale term that maps y's cotangent to x's without broadcasting or reducing: x and y of one shape and the
        factor broadcasting to it."""
        b = self.b
        xs, ys = b.shape(x), b.shape(y)
        if xs is None or ys is None or tuple(xs) != tuple(ys):
            return False
        if isinstance(term.s, (int, float)):
            return True
        ss = b.shape(term.s)
        return ss is not None and len(ss) <= len(xs) and broadcast_shapes(xs, ss) == tuple(xs) and \
            b.dtypes.get(term.s, b.ftype) == b.ftype

    def _compose(self, g, s, x):
        if not isinstance(g, _Lazy):
            g = _Lazy(g, ((1.0, ()),), x)
        v = None if isinstance(s, (int, float)) else self.b.value(s)
        if v is not None and v.size == 1 and v.dtype == self.b.np_float:  # a constant scalar tensor is a number
            s = float(v.reshape(-1)[0])
        if isinstance(s, (int, float)):
            terms = tuple((c * float(s), f) for c, f in g.terms)
        else:
            terms = tuple((c, f + (s,)) for c, f in g.terms)
        return _Lazy(g.base, terms, x)

    def _gather(self, items, y, materialize=False):
        """The cotangent of y from its contributions: one lazy product where they all share one base (the paths of
        an elementwise region, e.g. gelu's x * Phi(x)), else their sum."""
        lazies = [g for g in items if isinstance(g, _Lazy)]
        if len(lazies) == len(items) and len({g.base for g in lazies}) == 1 and not materialize:
            return lazies[0] if len(lazies) == 1 else _Lazy(lazies[0].base, sum((g.terms for g in lazies), ()), y)
        return self._sum([self._materialize(g) for g in items])

    def _absorb(self, c, fs):
        """Factors that a rule computed as (tensor * number) or -tensor, taken apart: the number joins the term's
        coefficient (so erf's 2 / sqrt(pi) and the signs and scales of a gelu's paths become one number)."""
        b = self.b
        producer = {n.output[0]: n for n in b.new_nodes if n.op_type in ("Mul", "Neg") and len(n.output) == 1}
        out = []
        for f in fs:
            while f in producer:
                n = producer[f]
                if n.op_type == "Neg":
                    c, f = -c, n.input[0]
                    continue
                vals = [b.value(i) for i in n.input]
                k = next((j for j, v in enumerate(vals) if v is not None and v.size == 1 and v.dtype == b.np_float), None)
                other = n.input[1 - k] if k is not None else None
                if other is None or b.shape(other) is None or b.shape(f) is None or \
                        len(b.shape(other)) != len(b.shape(f)):
                    break
                c, f = c * float(vals[k].reshape(-1)[0]), other
            out.append(f)
        return c, out

    def _materialize(self, g, pull_number=False):
        """base * sum_i c_i prod_j f_ij, with the factors shared by every term taken out and the factor computed on
        the forward tensors' side before its one product with the (K times larger) cotangent.
        ``pull_number``: return ``(tensor, k)`` with the cotangent ``k * tensor`` (a number for a constant matrix that
        comes next)."""
        if not isinstance(g, _Lazy):
            return (g, 1.0) if pull_number else g
        b = self.b
        merged: dict = {}
        for c, f in g.terms:
            c, f = self._absorb(c, f)
            key = tuple(sorted(f))
            merged[key] = merged.get(key, 0.0) + c
        terms = [(c, list(f)) for f, c in merged.items() if c != 0.0]
        k = 1.0
        if pull_number and terms:
            k = max(terms, key=lambda t: len(t[1]))[0]
            terms = [(c / k, f) for c, f in terms]
        if not terms:
            r = self._rev(Scale(0.0), g.base, g.like, g.like)
            return (r, 1.0) if pull_number else r
        common = []
        for f in terms[0][1]:
            if all(f in fs for _, fs in terms):
                common.append(f)
                for _, fs in terms:
                    fs.remove(f)

        def product(fs):
            r = None
            for f in fs:
                r = f if r is None else b.op("Mul", [r, f])
            return r

        number, parts = 0.0, []
        for c, fs in terms:
            p = product(fs)
            if p is None:
                number += c
            else:
                parts.append(p if c == 1.0 else b.op("Mul", [p, b.const(c)]))
        s = self._plain_sum(parts) if parts else None
        if s is not None and number != 0.0:
            s = b.op("Add", [s, b.const(number)])
        factor = product(common + ([s] if s is not None else []))
        if factor is None:
            r = self._rev(Scale(number), g.base, g.like, g.like)
        else:
            if s is None and number != 1.0:
                factor = b.op("Mul", [factor, b.const(number)])
            r = self._rev(Scale(factor), g.base, g.like, g.like)
        return (r, k) if pull_number else r

    def _plain_sum(self, parts):
        """parts[0] + parts[1] + ..., in that order (parts[0] itself for one part)."""
        r = parts[0]
        for p in parts[1:]:
            r = self.b.op("Add", [r, p])
        return r

    # ----- assembly -----------------------------------------------------------------------------------------
    def _batch_expand(self, d, tail):
        """Give a derivative tensor [K, 1|B, *tail] a real batch axis (only where it may lack one)."""
        b = self.b
        if d in self.full:
            return d
        if b.opset >= 15:
            bdim = b.op("Shape", [self.inputs[0]], start=0, end=1, dtype=TensorProto.INT64, shape=(1,))
        else:  # Shape's start/end attributes came with opset 15
            bdim = b.op("Slice", [b.shape_of(self.inputs[0]), b.const([0], np.int64), b.const([1], np.int64)],
                        dtype=TensorProto.INT64, shape=(1,))
        shp = b.op("Concat", [b.const([self.K], np.int64), bdim, b.const(list(tail), np.int64)], axis=0,
                   dtype=TensorProto.INT64, shape=(2 + len(tail),))
        return b.op("Expand", [d, shp], shape=(self.K, None) + tuple(tail))

    def _zeros(self, tail):
        return self._batch_expand(self.b.const(np.zeros((self.K, 1) + tuple(tail), self.b.np_float)), tail)

    def build(self) -> onnx.ModelProto:
        b = self.b
        jac_names = jacobian_output_names(self.inputs)
        # y: every output flattened to [B, m] and concatenated
        if len(self.outputs) == 1 and len(b.shape(self.outputs[0])) == 2:
            y = b.op("Identity", [self.outputs[0]])
        else:
            flat = [b.reshape(o, [-1, w]) for o, w in zip(self.outputs, self.out_widths)]
            y = flat[0] if len(flat) == 1 else b.op("Concat", flat, axis=1)
        outs = [(y, "y", ["batch", self.n_out])]
        if self.mode == "forward":
            ds = []
            for o, d, w in zip(self.outputs, self.forward_mode(), self.out_widths):
                d = self._zeros([w]) if d is None else b.reshape(d, [self.K, -1, w])
                ds.append(d)
            full = all(d in self.full for d in ds)
            d = ds[0] if len(ds) == 1 else b.op("Concat", ds, axis=2)
            if full:
                self.full.add(d)
            d = self._batch_expand(d, [self.n_out])
            jt = b.op("Transpose", [d], perm=[1, 2, 0])  # [B, n_out, n_in]
            if len(self.inputs) == 1:
                outs.append((jt, jac_names[0], ["batch", self.n_out, self.n_in]))
            else:
                off = 0
                for name, w in zip(jac_names, self.in_widths):
                    part = b.op("Slice", [jt, b.const([off], np.int64), b.const([off + w], np.int64),
                                          b.const([2], np.int64)])
                    outs.append((part, name, ["batch", self.n_out, w]))
                    off += w
        else:
            for name, x, d, w in zip(jac_names, self.inputs, self.reverse_mode(), self.in_widths):
                if d is not None and len(b.shape(x)) != 2:
                    was_full, d = d in self.full, b.reshape(d, [self.K, -1, w])
                    if was_full:
                        self.full.add(d)
                d = self._zeros([w]) if d is None else self._batch_expand(d, [w])
                if self.K == 1:
                    jt = b.reshape(d, [-1, 1, w])
                else:
                    jt = b.op("Transpose", [d], perm=[1, 0, 2])
                outs.append((jt, name, ["batch", self.n_out, w]))
        # final graph: forward nodes + derivative nodes, outputs renamed through Identity
        g = self.model.graph
        for src, name, dims in outs:
            b.new_nodes.append(helper.make_node("Identity", [src], [name], name=f"nnp_out_{name}"))
        fold_scales_into_matmul(b)
        fold_constant_scale_before_matmul(b, {name for _, name, _ in outs})
        _drop_unused_nodes(b, g)
        used = {i for n in list(g.node) + b.new_nodes for i in n.input}
        b.new_inits = [t for t in b.new_inits if t.name in used]  # constants a rule made but did not use
        g.node.extend(b.new_nodes)
        g.initializer.extend(b.new_inits)
        del g.output[:]
        for _, name, dims in outs:
            g.output.append(helper.make_tensor_value_info(name, b.ftype, dims))
        del g.value_info[:]
        g.name = (g.name or "model") + "_jacobian"
        self.model.doc_string = (f"nnpartials companion Jacobian graph ({self.mode} mode): y [batch, n_out], "
                                 f"dy_dx[b, i, j] = d y[b, i] / d x[b, j]")
        return self.model


def _outer_reads(node) -> set:
    """Names a node's subgraphs (If branches, Loop/Scan bodies, nested) read from enclosing graphs."""
    out = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) \
            if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                out.update(i for i in n.input if i and i not in local)
                out.update(r for r in _outer_reads(n) if r not in local)
            out.update(o.name for o in g.output if o.name not in local)
    return out


def _drop_unused_nodes(b, g):
    """Derivative nodes whose outputs nothing reads (a factor a rule computed as tensor * number, whose number went
    into a coefficient instead): a runtime would still compute them."""
    needed = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = []
    for n in reversed(b.new_nodes):
        if n.op_type == "Identity" and n.name.startswith("nnp_out_") or any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    b.new_nodes = keep[::-1]


def _rank_may_drop(b, t, consumers, outputs):
    """Whether every use of ``t`` gives the same values when ``t`` loses leading axes of size 1: elementwise ops
    (broadcasting puts them back, or the loss passes on to their output), products with a constant matrix, reshapes
    to a constant target."""
    if t in outputs:
        return False
    rank = len(b.shape(t) or ())
    for n in consumers.get(t, []):
        if n.op_type in ("Mul", "Add", "Sub", "Div"):
            others = [i for i in n.input if i != t]
            if any(b.shape(o) is None for o in others):
                return False
            if all(len(b.shape(o)) < rank for o in others) and not _rank_may_drop(b, n.output[0], consumers, outputs):
                return False
        elif n.op_type == "MatMul":
            w = b.value(n.input[1])
            if n.input[0] != t or w is None or w.ndim != 2 or not _rank_may_drop(b, n.output[0], consumers, outputs):
                return False
        elif n.op_type == "Reshape":
            tgt = b.value(n.input[1])
            if n.input[0] != t or tgt is None or (np.asarray(tgt) == 0).any():
                return False
        else:
            return False
    return True


def fold_constant_scale_before_matmul(b, outputs):
    """Among the derivative nodes, rewrite ``MatMul(Mul(c, t), W)`` as ``MatMul(t, c^T * W)`` where c and W are
    constants, c varies along the last axis only and the product has no other use: the first step of reverse mode
    through an activation, the seed times the last layer's W^T (a constant) times the activation's derivative, then
    the next W^T. One node and one pass fewer. The product then has the rank of t, which may lack c's leading axes of
    size 1; the rewrite is made only where every later use gives the same values (see _rank_may_drop)."""
    nodes = b.new_nodes
    consumers: dict[str, list] = {}
    for n in list(b.graph.node) + nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {n.output[0]: n for n in nodes if n.op_type == "Mul"}
    drop = set()
    for mm in nodes:
        if mm.op_type != "MatMul" or mm.input[0] not in producer or len(consumers.get(mm.input[0], [])) != 1:
            continue
        w = b.value(mm.input[1])
        mul = producer[mm.input[0]]
        if w is None or w.ndim != 2 or w.dtype != b.np_float or id(mul) in drop:
            continue
        for c, t in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            cv, ts = b.value(c), b.shape(t)
            if cv is None or b.value(t) is not None or ts is None or cv.dtype != b.np_float or cv.ndim == 0 or \
                    any(d != 1 for d in cv.shape[:-1]) or cv.shape[-1] != w.shape[0] or \
                    ts[-1] != w.shape[0] or len(ts) < 2:
                continue
            if cv.ndim > len(ts) and not _rank_may_drop(b, mm.output[0], consumers, outputs):
                continue
            mm.input[0] = t
            mm.input[1] = b.const(cv.reshape(-1, 1) * w, hint="wscaled")
            b.shapes[mm.output[0]] = tuple(ts[:-1]) + (w.shape[1],)
            drop.add(id(mul))
            break
    if drop:
        b.new_nodes = [n for n in nodes if id(n) not in drop]


def fold_scales_into_matmul(b):
    """Among the derivative nodes, rewrite ``Mul(MatMul(a, W), c)`` as ``MatMul(a, W * c)`` where W and c are
    constants, c varies along the last axis only and the product has no other use. This is what a constant
    elementwise factor after the last product becomes, e.g. the 1/std of a Normalization layer in reverse mode:
    one node and one pass over the batch fewer. The result differs from the two-step product by float32
    rounding only. The forward graph's own nodes are left as they are."""
    nodes = b.new_nodes
    graph_nodes = list(b.graph.node)
    uses: dict[str, int] = {}
    for n in graph_nodes + nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    producer = {n.output[0]: n for n in nodes if n.op_type == "MatMul"}
    drop = set()
    for n in nodes:
        if n.op_type != "Mul":
            continue
        for t, c in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            mm = producer.get(t)
            cv, tshape = b.value(c), b.shape(t)
            if mm is None or cv is None or uses.get(t) != 1 or tshape is None:
                continue
            w = b.value(mm.input[1])
            if w is None or w.ndim != 2 or cv.dtype != b.np_float or w.dtype != b.np_float:
                continue
            if cv.ndim > len(tshape) or any(d != 1 for d in cv.shape[:-1]) or \
                    (cv.ndim and cv.shape[-1] not in (1, w.shape[1])):
                continue
            mm.input[1] = b.const(w * cv.reshape(-1), hint="wscaled")
            mm.output[0] = n.output[0]
            drop.add(id(n))
            break
    if drop:
        b.new_nodes = [n for n in nodes if id(n) not in drop]
        used = {i for n in graph_nodes + b.new_nodes for i in n.input}
        b.new_inits = [t for t in b.new_inits if t.name in used]


def build_jacobian_model(model: onnx.ModelProto, mode: str = "auto") -> tuple[onnx.ModelProto, dict]:
    """Return ``(jacobian_model, info)``; info has the chosen mode, n_in, n_out, input/output names."""
    eng = _Engine(model, mode)
    g = eng.model.graph  # the engine's copy, before build() adds the companion graph's nodes
    taken = {n for node in g.node for n in node.output} | {t.name for t in g.initializer} | set(eng.inputs)
    clash = sorted(taken & {"y", *jacobian_output_names(eng.inputs)})
    if clash:
        raise ExportError(f"the graph already has a value named {', '.join(map(repr, clash))}, a name of the "
                          f"companion graph's own outputs; rename it first (nnpartials.export renames such outputs, "
                          f"e.g. 'y' to 'out_y')")
    jm = eng.build()
    try:
        onnx.checker.check_model(jm, full_check=True)
    except Exception as exc:
        raise ExportError(f"the generated Jacobian graph fails onnx.checker: {exc}") from exc
    info = {
        "mode": eng.mode,
        "n_in": eng.n_in,
        "n_out": eng.n_out,
        "inputs": [{"name": n, "width": w} for n, w in zip(eng.inputs, eng.in_widths)],
        "outputs": [{"name": n, "width": w} for n, w in zip(eng.outputs, eng.out_widths)],
        "jacobian_outputs": jacobian_output_names(eng.inputs),
    }
    return jm, info
