"""Every derivative rule on its own: a single-node ONNX graph, its companion Jacobian (both modes, float32,
onnxruntime) against central finite differences of the same node evaluated in float64 by onnx's reference
evaluator (numpy). Points stay away from kinks; kinks themselves are checked against TensorFlow's convention."""


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from nnpartials.onnx_reference import reference_evaluator, to_float64

from nnpartials import tolerances
from nnpartials.errors import UnsupportedOpError
from nnpartials.exporter.jacobian import build_jacobian_model
from nnpartials.exporter.rules import RULES

B = 64
RNG = np.random.default_rng(1234)


def make_model(op, inputs, out_shape, attrs=None, consts=None, dtype=np.float32, opset=17, n_outputs=1,
               out_shapes=None):
    """inputs: list of (name, shape-without-batch) graph inputs; consts: {name: array} initializers."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g_inputs = [helper.make_tensor_value_info(n, et, ["batch"] + list(s)) for n, s in inputs]
    inits = []
    for name, value in (consts or {}).items():
        v = np.asarray(value)
        if v.dtype.kind == "f":
            v = v.astype(dtype)
        inits.append(numpy_helper.from_array(v, name))
    outs = [f"y{k}" for k in range(n_outputs)]
    shapes = out_shapes or [out_shape] * n_outputs
    node = helper.make_node(op, [n for n in attrs.pop("_inputs")] if attrs and "_inputs" in attrs else
                            [n for n, _ in inputs] + list((consts or {}).keys()), outs, name=f"{op}_node",
                            **(attrs or {}))
    g_outputs = [helper.make_tensor_value_info(o, et, ["batch"] + list(s)) for o, s in zip(outs, shapes)]
    graph = helper.make_graph([node], f"single_{op}", g_inputs, g_outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def fd_jacobian(model, feeds, h=1e-6):
    """Central differences in float64 of the concatenated, flattened outputs w.r.t. each input feature."""
    ref = reference_evaluator(to_float64(model))  # float64 throughout (onnx's Erf rounds through float32)
    names = [i.name for i in model.graph.input]
    f64 = {k: v.astype(np.float64) for k, v in feeds.items()}

    def f(fd):
        outs = ref.run(None, fd)
        return np.concatenate([np.asarray(o, np.float64).reshape(B, -1) for o in outs], axis=1)

    y0 = f(f64)
    jac = {}
    for name in names:
        x = f64[name]
        flat = x.reshape(B, -1)
        cols = []
        for j in range(flat.shape[1]):
            step = h * np.maximum(1.0, np.abs(flat[:, j]))
            xp, xm = flat.copy(), flat.copy()
            xp[:, j] += step
            xm[:, j] -= step
            yp = f({**f64, name: xp.reshape(x.shape)})
            ym = f({**f64, name: xm.reshape(x.shape)})
            cols.append((yp - ym) / (2 * step[:, None]))
        jac[name] = np.stack(cols, axis=2)
    return y0, jac


def check_rule(model, feeds, modes=("forward", "reverse")):
    y_ref, j_ref = fd_jacobian(model, feeds)
    names = [i.name for i in model.graph.input]
    for mode in modes:
        jm, info = build_jacobian_model(model, mode=mode)
        assert info["mode"] == mode
        sess = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"])
        types = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
        outs = sess.run(None, {k: v.astype(types.get(k, np.float32)) for k, v in feeds.items()})
        np.testing.assert_allclose(outs[0], y_ref, rtol=1e-5, atol=1e-5)
        for name, j in zip(names, outs[1:]):
            a, rel, _ = tolerances.scaled_error(j, j_ref[name])
            assert rel <= tolerances.RULE_FD_F32, f"{mode} mode, input {name}: max rel error {rel:.3g}"


def away_from(x, kinks, margin=0.05):
    for k in kinks:
        close = np.abs(x - k) < margin
        x = np.where(close, k + np.sign(x - k + 1e-12) * margin * 2, x)
    return x


def u(shape, lo=-3.0, hi=3.0, kinks=()):
    return away_from(RNG.uniform(lo, hi, size=(B,) + tuple(shape)), kinks).astype(np.float32)


UNARY = [
    ("Identity", {}, (-3, 3), ()),
    ("Neg", {}, (-3, 3), ()),
    ("Abs", {}, (-3, 3), (0,)),
    ("Relu", {}, (-3, 3), (0,)),
    ("LeakyRelu", {"alpha": 0.2}, (-3, 3), (0,)),
    # slopes outside (0, 1) take the compare-and-select mask instead of clip(ceil(y), alpha, 1)
    ("LeakyRelu", {"alpha": 1.5}, (-3, 3), (0,)),
    ("LeakyRelu", {"alpha": -0.4}, (-3, 3), (0,)),
    ("LeakyRelu", {"alpha": 0.0}, (-3, 3), (0,)),
    ("Elu", {"alpha": 0.7}, (-3, 3), (0,)),
    ("Selu", {}, (-3, 3), (0,)),
    ("Tanh", {}, (-3, 3), ()),
    ("Sigmoid", {}, (-5, 5), ()),
    ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, (-4, 4), (-2.5, 2.5)),
    ("HardSwish", {}, (-5, 5), (-3, 3)),
    ("Softplus", {}, (-5, 5), ()),
    ("Softsign", {}, (-5, 5), (0,)),
    ("Exp", {}, (-3, 2), ()),
    ("Log", {}, (0.2, 5), ()),
    ("Sqrt", {}, (0.2, 5), ()),
    ("Reciprocal", {}, (0.3, 3), ()),
    ("Erf", {}, (-3, 3), ()),
    ("Sin", {}, (-3, 3), ()),
    ("Cos", {}, (-3, 3), ()),
]


@pytest.mark.parametrize("op,attrs,rng,kinks", UNARY,
                         ids=[u_[0] + "".join(f"-{k}={v}" for k, v in u_[1].items()) for u_ in UNARY])
def test_unary_rule(op, attrs, rng, kinks):
    m = make_model(op, [("x", (3,))], (3,), attrs=dict(attrs))
    check_rule(m, {"x": u((3,), *rng, kinks=kinks)})


def test_dropout_and_cast():
    m = make_model("Dropout", [("x", (3,))], (3,))
    check_rule(m, {"x": u((3,))})
    m = make_model("Cast", [("x", (3,))], (3,), attrs={"to": TensorProto.FLOAT})
    check_rule(m, {"x": u((3,))})


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"])
def test_binary_rule_two_variables(op):
    lo = 0.3 if op in ("Div", "Pow") else -3
    m = make_model(op, [("a", (3,)), ("b", (3,))], (3,))
    a, b = u((3,), lo, 3), u((3,), lo, 3)
    if op in ("Max", "Min"):
        b = np.where(np.abs(a - b) < 0.05, b + 0.2, b).astype(np.float32)
    if op == "Pow":
        b = u((3,), -2, 2)
    check_rule(m, {"a": a, "b": b})


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min"])
def test_binary_rule_broadcast_variable(op):
    """b has shape [batch, 1] and broadcasts over a's features: the reverse mode must sum over them."""
    m = make_model(op, [("a", (3,)), ("b", (1,))], (3,))
    a, b = u((3,)), u((1,), 0.5, 3)
    if op in ("Max", "Min"):
        a = np.where(np.abs(a - b) < 0.05, a + 0.2, a).astype(np.float32)
    check_rule(m, {"a": a, "b": b})


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow", "Max", "PRelu"])
def test_binary_rule_constant_operand(op):
    c = np.array([0.5, 2.0, 3.0], np.float32) if op != "PRelu" else np.array([0.1, 0.2, 0.3], np.float32)
    m = make_model(op, [("x", (3,))], (3,), consts={"c": c})
    lo = 0.3 if op == "Pow" else -3
    check_rule(m, {"x": u((3,), lo, 3, kinks=(0, 0.5, 2.0, 3.0))})


@pytest.mark.parametrize("exponent", [2.0, 3.0, 0.5, -1.5])
def test_pow_scalar_exponent(exponent):
    m = make_model("Pow", [("x", (3,))], (3,), consts={"p": np.array(exponent, np.float32)})
    check_rule(m, {"x": u((3,), 0.3, 3)})


@pytest.mark.parametrize("op,n", [("Sum", 3), ("Mean", 3)])
def test_variadic_rules(op, n):
    names = [f"x{k}" for k in range(n)]
    m = make_model(op, [(nm, (3,)) for nm in names], (3,))
    check_rule(m, {nm: u((3,)) for nm in names})


def test_where_rule():
    cond = RNG.uniform(size=(3,)) > 0.5
    m = make_model("Where", [("a", (3,)), ("b", (3,))], (3,), consts={"cond": cond},
                   attrs={"_inputs": ["cond", "a", "b"]})
    check_rule(m, {"a": u((3,)), "b": u((3,))})


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-1.0, None)])
def test_clip_rule(lo, hi):
    consts = {"lo": np.array(lo, np.float32)}
    names = ["x", "lo"]
    if hi is not None:
        consts["hi"] = np.array(hi, np.float32)
        names.append("hi")
    m = make_model("Clip", [("x", (3,))], (3,), consts=consts, attrs={"_inputs": names})
    check_rule(m, {"x": u((3,), -3, 8, kinks=(lo, hi if hi is not None else lo))})


def test_matmul_rule():
    w = RNG.normal(size=(4, 5)).astype(np.float32)
    check_rule(make_model("MatMul", [("x", (4,))], (5,), consts={"w": w}), {"x": u((4,))})


def _two_node_model(nodes, consts, n_in, n_out):
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", n_out])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_constant_scale_folds_into_the_last_product():
    """Reverse mode turns x * c -> MatMul(., w) into MatMul(g, w^T) -> Mul(., c): folded into one MatMul."""
    w = RNG.normal(size=(3, 4)).astype(np.float32)
    c = RNG.uniform(0.5, 2.0, size=(3,)).astype(np.float32)
    m = _two_node_model([helper.make_node("Mul", ["x", "c"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["out"])],
                        {"c": c, "w": w}, 3, 4)
    check_rule(m, {"x": u((3,))})
    jm, _ = build_jacobian_model(m, mode="reverse")
    derivative_nodes = list(jm.graph.node)[2:]
    assert not [n for n in derivative_nodes if n.op_type == "Mul"], [n.op_type for n in derivative_nodes]


def test_constant_scale_is_not_folded_into_a_shared_product():
    """The fold must leave a product that something else also reads: out = (x - x * c) @ w sends the product's
    adjoint both to x directly and, times -1, to x * c."""
    w = RNG.normal(size=(3, 4)).astype(np.float32)
    c = RNG.uniform(0.5, 2.0, size=(3,)).astype(np.float32)
    m = _two_node_model([helper.make_node("Mul", ["x", "c"], ["p"]), helper.make_node("Sub", ["x", "p"], ["s"]),
                         helper.make_node("MatMul", ["s", "w"], ["out"])], {"c": c, "w": w}, 3, 4)
    check_rule(m, {"x": u((3,))})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_rule(trans_b):
    w = RNG.normal(size=(5, 4) if trans_b else (4, 5)).astype(np.float32)
    c = RNG.normal(size=(5,)).astype(np.float32)
    m = make_model("Gemm", [("x", (4,))], (5,), consts={"w": w, "c": c},
                   attrs={"alpha": 0.7, "beta": 1.3, "transB": trans_b})
    check_rule(m, {"x": u((4,))})


def test_gemm_variable_bias():
    w = RNG.normal(size=(4, 5)).astype(np.float32)
    m = make_model("Gemm", [("x", (4,)), ("c", (5,))], (5,), consts={"w": w}, attrs={"beta": 0.5,
                                                                                    "_inputs": ["x", "w", "c"]})
    check_rule(m, {"x": u((4,)), "c": u((5,))})


def test_batchnorm_rule():
    c = 4
    consts = {"scale": RNG.uniform(0.5, 2, c), "bias": RNG.normal(size=c), "mean": RNG.normal(size=c),
              "var": RNG.uniform(0.5, 2, c)}
    m = make_model("BatchNormalization", [("x", (c,))], (c,), consts=consts, attrs={"epsilon": 1e-3})
    check_rule(m, {"x": u((c,))})


def test_concat_rule():
    m = make_model("Concat", [("a", (2,)), ("b", (3,))], (5,), attrs={"axis": -1})
    check_rule(m, {"a": u((2,)), "b": u((3,))})


@pytest.mark.parametrize("op,attrs,consts,out_shape", [
    ("Reshape", {}, {"shape": np.array([-1, 2, 3], np.int64)}, (2, 3)),
    ("Flatten", {"axis": 1}, {}, (6,)),
    ("Unsqueeze", {}, {"axes": np.array([1], np.int64)}, (1, 6)),
])
def test_reshape_family(op, attrs, consts, out_shape):
    m = make_model(op, [("x", (6,))], out_shape, attrs=dict(attrs), consts=consts)
    check_rule(m, {"x": u((6,))})


def test_squeeze_and_transpose_rank3():
    m = make_model("Squeeze", [("x", (1, 4))], (4,), consts={"axes": np.array([1], np.int64)})
    check_rule(m, {"x": u((1, 4))})
    m = make_model("Transpose", [("x", (2, 3))], (3, 2), attrs={"perm": [0, 2, 1]})
    check_rule(m, {"x": u((2, 3))})


def test_slice_rule():
    consts = {"starts": np.array([1], np.int64), "ends": np.array([-1], np.int64), "axes": np.array([1], np.int64)}
    m = make_model("Slice", [("x", (5,))], (3,), consts=consts)
    check_rule(m, {"x": u((5,))})


@pytest.mark.parametrize("starts,ends,axes,steps,shape,out", [
    # x[:, 1:3] as tf2onnx writes it: the batch axis "sliced" whole (ends INT32_MAX)
    ([0, 1], [2 ** 31 - 1, 3], [0, 1], None, (5,), (2,)),
    # every axis whole (INT64_MAX ends): the identity
    ([0, 0], [2 ** 63 - 1, 2 ** 63 - 1], [0, 1], None, (5,), (5,)),
    # the batch axis whole, a range and a step on the others
    ([0, 1, 0], [2 ** 31 - 1, 3, 5], [0, 1, 2], [1, 1, 2], (4, 5), (2, 3)),
    # a whole axis reversed (how a Bidirectional layer's time reversal is exported)
    ([-1], [-(2 ** 63) + 1], [1], [-1], (3, 2), (3, 2)),
])
def test_slice_whole_batch_axis(starts, ends, axes, steps, shape, out):
    consts = {"s": np.array(starts, np.int64), "e": np.array(ends, np.int64), "a": np.array(axes, np.int64)}
    if steps is not None:
        consts["st"] = np.array(steps, np.int64)
    check_rule(make_model("Slice", [("x", shape)], out, consts=consts), {"x": u(shape)})


def test_slice_of_the_batch_axis_is_refused():
    consts = {"s": np.array([1], np.int64), "e": np.array([2 ** 31 - 1], np.int64), "a": np.array([0], np.int64)}
    with pytest.raises(UnsupportedOpError, match="batch axis"):
        build_jacobian_model(make_model("Slice", [("x", (3,))], (3,), consts=consts))


def test_split_rule():
    m = make_model("Split", [("x", (5,))], None, consts={"split": np.array([2, 3], np.int64)},
                   attrs={"axis": 1}, n_outputs=2, out_shapes=[(2,), (3,)])
    check_rule(m, {"x": u((5,))})


@pytest.mark.parametrize("op,keep", [("ReduceSum", 1), ("ReduceSum", 0), ("ReduceMean", 1), ("ReduceMean", 0)])
def test_reduce_rules(op, keep):
    # opset 17: ReduceSum takes axes as an input, ReduceMean as an attribute
    if op == "ReduceSum":
        m = make_model(op, [("x", (2, 3))], (2, 1) if keep else (2,), consts={"axes": np.array([2], np.int64)},
                       attrs={"keepdims": keep})
    else:
        m = make_model(op, [("x", (2, 3))], (2, 1) if keep else (2,), attrs={"keepdims": keep, "axes": [-1]})
    check_rule(m, {"x": u((2, 3))})


def test_every_rule_has_a_test():
    """Keeps this file in step with the rule table: an op added to RULES must be exercised here."""
    import re
    from pathlib import Path

    text = Path(__file__).read_text()
    untested = [op for op in RULES if not re.search(rf'"{op}"', text)]
    assert not untested, f"rules without a single-node test: {untested}"


# ----- kinks follow TensorFlow's gradient convention --------------------------------------------------------
@pytest.mark.parametrize("op,attrs,expected", [
    ("Relu", {}, 0.0),            # tf: relu'(0) = 0
    ("LeakyRelu", {"alpha": 0.3}, 0.3),  # tf: gradient alpha where x <= 0
    ("Elu", {"alpha": 1.0}, 1.0),  # tf: x <= 0 branch, alpha * exp(0)
])
def test_kink_convention(op, attrs, expected):
    m = make_model(op, [("x", (1,))], (1,), attrs=dict(attrs))
    for mode in ("forward", "reverse"):
        jm, _ = build_jacobian_model(m, mode=mode)
        sess = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"])
        _, j = sess.run(None, {"x": np.zeros((1, 1), np.float32)})
        assert j[0, 0, 0] == pytest.approx(expected)


@pytest.mark.parametrize("alpha", [0.3, 1.5, -0.4])
def test_leaky_relu_mask_near_the_kink(alpha):
    """Exactly 1 or alpha next to the kink too: tiny, subnormal and signed-zero inputs, as TensorFlow."""
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    x = np.array([[0.0], [-0.0], [tiny], [-tiny], [1e-30], [-1e-30], [3e38], [-3e38]], np.float32)
    want = np.where(x > 0, 1.0, alpha).astype(np.float32)  # tf.nn.leaky_relu's gradient: x > 0 ? 1 : alpha
    m = make_model("LeakyRelu", [("x", (1,))], (1,), attrs={"alpha": alpha})
    for mode in ("forward", "reverse"):
        jm, _ = build_jacobian_model(m, mode=mode)
        sess = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"])
        _, j = sess.run(None, {"x": x})
        np.testing.assert_array_equal(j[:, 0, 0], want[:, 0])


# ----- unsupported ops ------------------------------------------------------------------------------------------
def test_unsupported_op_names_op_and_node():
    m = make_model("LpNormalization", [("x", (3,))], (3,), attrs={"axis": -1})
    with pytest.raises(UnsupportedOpError) as ei:
        build_jacobian_model(m)
    assert "LpNormalization" in str(ei.value) and "LpNormalization_node" in str(ei.value)
    assert ei.value.op_type == "LpNormalization" and ei.value.node_name == "LpNormalization_node"


def test_matmul_of_two_variables_is_refused():
    m = make_model("MatMul", [("a", (3,)), ("b", (3,))], (3,))
    # [batch, 3] @ [batch, 3]-shaped operands contract over the points of the batch
    with pytest.raises(UnsupportedOpError, match="contracts over the points"):
        build_jacobian_model(m)


# ----- layers of real networks (exporter/rules_nn.py) and batch axes that move -----------------------------------
def graph_model(nodes, inputs, outputs, consts=None, opset=17, dtype=np.float32):
    """A multi-node graph: inputs/outputs (name, shape-without-batch) with a leading batch axis."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = []
    for name, value in (consts or {}).items():
        v = np.asarray(value)
        inits.append(numpy_helper.from_array(v.astype(dtype) if v.dtype.kind == "f" else v, name))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, et, ["batch"] + list(sh)) for n, sh in inputs],
                          [helper.make_tensor_value_info(n, et, ["batch"] + list(sh)) for n, sh in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset < 21 else 10
    return m


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_rules(op, axis):
    check_rule(make_model(op, [("x", (3, 4))], (3, 4), attrs={"axis": axis}), {"x": u((3, 4))})


CONV_CASES = {
    "1d-stride-pad": ((2, 7), (3, 2, 3), {"strides": [2], "pads": [1, 1]}),
    "2d-dilation": ((2, 5, 6), (4, 2, 3, 2), {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 0, 1]}),
    "2d-groups": ((4, 5, 5), (4, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    "2d-same-upper": ((1, 6, 5), (2, 1, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "3d": ((1, 3, 4, 4), (2, 1, 2, 2, 2), {}),
    # stride 1 with several input channels per group: the adjoint is a Conv with the flipped, transposed kernel
    "1d-stride1": ((2, 7), (3, 2, 3), {"pads": [2, 1]}),
    "2d-stride1-dilation-asym": ((3, 7, 6), (4, 3, 3, 2), {"dilations": [2, 1], "pads": [2, 0, 1, 1]}),
    "2d-stride1-groups-wide": ((6, 5, 5), (9, 2, 3, 2), {"group": 3, "pads": [0, 1, 1, 0]}),
    "3d-stride1-channels": ((2, 3, 4, 4), (2, 2, 2, 2, 2), {"pads": [1, 0, 0, 0, 1, 0]}),
    # padding wider than the kernel reaches: the flipped convolution would need negative padding
    "2d-pad-beyond-kernel": ((2, 4, 4), (3, 2, 1, 1), {"pads": [1, 1, 1, 1]}),
}

#: the op the reverse-mode graph uses for a Conv's adjoint, per case (stride 1 and more than one input channel per
#: group: Conv; otherwise ConvTranspose)
CONV_ADJOINT = {"1d-stride-pad": "ConvTranspose", "2d-dilation": "ConvTranspose", "2d-groups": "Conv",
                "2d-same-upper": "ConvTranspose", "3d": "ConvTranspose", "1d-stride1": "Conv",
                "2d-stride1-dilation-asym": "Conv", "2d-stride1-groups-wide": "Conv", "3d-stride1-channels": "Conv",
                "2d-pad-beyond-kernel": "ConvTranspose"}


def _conv_out(x_shape, w_shape, attrs):
    """Output shape of a convolution (without the batch axis), from the ONNX formulas."""
    sp, k = x_shape[1:], w_shape[2:]
    n = len(sp)
    s, d = attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)
    if attrs.get("auto_pad") == "SAME_UPPER":
        return (w_shape[0],) + tuple(-(-sp[i] // s[i]) for i in range(n))
    p = attrs.get("pads", [0] * (2 * n))
    return (w_shape[0],) + tuple((sp[i] + p[i] + p[n + i] - ((k[i] - 1) * d[i] + 1)) // s[i] + 1 for i in range(n))


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_rule(case):
    xs, ws, attrs = CONV_CASES[case]
    out = _conv_out(xs, ws, attrs)
    consts = {"w": RNG.normal(size=ws), "bias": RNG.normal(size=ws[0])}
    m = make_model("Conv", [("x", xs)], out, consts=consts, attrs=dict(attrs))
    check_rule(m, {"x": u(xs)})
    ops = [n.op_type for n in build_jacobian_model(m, mode="reverse")[0].graph.node]
    # the forward pass's Conv, then the adjoint
    want = ["Conv", CONV_ADJOINT[case]]
    assert sorted(o for o in ops if o.startswith("Conv")) == sorted(want), ops


@pytest.mark.parametrize("pads,opad", [([1, 0, 1, 1], [1, 0]), ([0, 1, 0, 0], [1, 1])])
def test_conv_transpose_rule(pads, opad):
    xs, ws = (2, 3, 4), (2, 3, 3, 3)
    attrs = {"strides": [2, 2], "pads": pads, "output_padding": opad}
    # out = s (in - 1) + output_padding + k - pads
    out = (3, 2 * (3 - 1) + opad[0] + 3 - pads[0] - pads[2], 2 * (4 - 1) + opad[1] + 3 - pads[1] - pads[3])
    check_rule(make_model("ConvTranspose", [("x", xs)], out, consts={"w": RNG.normal(size=ws)}, attrs=dict(attrs)),
               {"x": u(xs)})


@pytest.mark.parametrize("op,attrs,out", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, (2, 3, 2)),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [1, 2], "pads": [1, 1, 1, 1]}, (2, 6, 3)),
    ("MaxPool", {"kernel_shape": [3, 2], "strides": [3, 2]}, (2, 2, 2)),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}, (2, 2, 2)),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, (2, 3, 2)),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0}, (2, 6, 5)),
    ("AveragePool", {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1], "count_include_pad": 1},
     (2, 3, 5)),
    ("GlobalAveragePool", {}, (2, 1, 1)),
    ("GlobalMaxPool", {}, (2, 1, 1)),
])
def test_pooling_rules(op, attrs, out):
    check_rule(make_model(op, [("x", (2, 6, 5))], out, attrs=dict(attrs)), {"x": u((2, 6, 5))})


@pytest.mark.parametrize("xs,kernel", [((2, 7), [2]), ((2, 6, 5), [2, 2]), ((1, 4, 5, 4), [2, 2, 2])])
@pytest.mark.parametrize("opset,dtype", [(11, np.float32), (17, np.float32), (17, np.float64)])
def test_max_pool_tiled_windows(xs, kernel, opset, dtype):
    """Windows that tile the input (stride = kernel): the adjoint spreads g over each window and masks it with
    the argmax (no scatter); uncovered rows at the end get zero. 1-D, 2-D and 3-D, odd sizes; opset 11 (Resize
    with its region-of-interest input) and 17; a float64 model keeps the scatter (onnxruntime's CPU Resize has no
    float64 kernel)."""
    n = len(kernel)
    out = (xs[0],) + tuple(xs[1 + i] // kernel[i] for i in range(n))
    m = make_model("MaxPool", [("x", xs)], out, attrs={"kernel_shape": kernel, "strides": kernel}, opset=opset,
                   dtype=dtype)
    check_rule(m, {"x": u(xs).astype(dtype)})
    ops = {nd.op_type for nd in build_jacobian_model(m, mode="reverse")[0].graph.node}
    if dtype == np.float32:
        assert "ScatterElements" not in ops and "Resize" in ops, ops
    else:
        assert "ScatterElements" in ops and "Resize" not in ops, ops


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("kernel,strides", [([2, 2], [2, 2]), ([3, 2], [3, 2]), ([3, 3], [1, 2])])
def test_max_pool_ties_go_to_the_first_maximum(mode, kernel, strides):
    """Ties (here most windows hold equal values, as after a relu): the derivative goes to the first maximum of
    each window in row-major order, and only there; checked against windows scanned in numpy."""
    xs = (2, 6, 5)
    x = RNG.integers(0, 3, size=(B,) + xs).astype(np.float32)
    x[:5] = 0.0  # whole windows tied
    out = (xs[0],) + tuple((xs[1 + i] - kernel[i]) // strides[i] + 1 for i in range(2))
    m = make_model("MaxPool", [("x", xs)], out, attrs={"kernel_shape": kernel, "strides": strides})
    jm, _ = build_jacobian_model(m, mode=mode)
    sess = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"])
    y, j = sess.run(None, {"x": x})
    want_y = np.zeros((B,) + out, np.float32)
    want = np.zeros((B,) + out + xs, np.float32)
    for bi in range(B):
        for ch in range(xs[0]):
            for oi in range(out[1]):
                for oj in range(out[2]):
                    r, q = oi * strides[0], oj * strides[1]
                    win = x[bi, ch, r:r + kernel[0], q:q + kernel[1]]
                    a, b_ = np.unravel_index(int(np.argmax(win)), win.shape)  # numpy: first maximum, row-major
                    want_y[bi, ch, oi, oj] = win.max()
                    want[bi, ch, oi, oj, ch, r + a, q + b_] = 1.0
    np.testing.assert_array_equal(y.reshape(want_y.shape), want_y)
    np.testing.assert_array_equal(j.reshape(want.shape), want)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare",
                                "ReduceLogSumExp", "ReduceLogSum"])
@pytest.mark.parametrize("keep", [0, 1])
def test_more_reduce_rules(op, keep):
    lo = 0.3 if op == "ReduceLogSum" else -3
    x = u((3, 4), lo, 3, kinks=(0,) if op == "ReduceL1" else ())
    m = make_model(op, [("x", (3, 4))], (3, 1) if keep else (3,), attrs={"keepdims": keep, "axes": [2]})
    check_rule(m, {"x": x})


@pytest.mark.parametrize("op,axis", [("LayerNormalization", -1), ("LayerNormalization", 1)])
def test_layer_norm_rule(op, axis):
    sh = (3, 4) if axis == -1 else (3, 4)
    scale_shape = (4,) if axis == -1 else (3, 4)
    consts = {"scale": RNG.uniform(0.5, 2, scale_shape), "bias": RNG.normal(size=scale_shape)}
    check_rule(make_model(op, [("x", sh)], sh, consts=consts, attrs={"axis": axis, "epsilon": 1e-3}), {"x": u(sh)})


def test_instance_and_group_norm_rules():
    consts = {"scale": RNG.uniform(0.5, 2, 4), "bias": RNG.normal(size=4)}
    check_rule(make_model("InstanceNormalization", [("x", (4, 3, 2))], (4, 3, 2), consts=consts,
                          attrs={"epsilon": 1e-3}), {"x": u((4, 3, 2))})
    consts = {"scale": RNG.uniform(0.5, 2, 4), "bias": RNG.normal(size=4)}  # opset 21: one scale per channel
    check_rule(make_model("GroupNormalization", [("x", (4, 3, 2))], (4, 3, 2), consts=consts,
                          attrs={"epsilon": 1e-3, "num_groups": 2}, opset=21), {"x": u((4, 3, 2))})


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_rule(approximate):
    check_rule(make_model("Gelu", [("x", (3,))], (3,), attrs={"approximate": approximate}, opset=20),
               {"x": u((3,))})


@pytest.mark.parametrize("op,lo,hi,opset,attrs", [
    ("Tan", -1.2, 1.2, 17, {}), ("Atan", -3, 3, 17, {}), ("Asin", -0.9, 0.9, 17, {}), ("Acos", -0.9, 0.9, 17, {}),
    ("Sinh", -2, 2, 17, {}), ("Cosh", -2, 2, 17, {}), ("Asinh", -3, 3, 17, {}), ("Acosh", 1.2, 3, 17, {}),
    ("Atanh", -0.9, 0.9, 17, {}), ("ThresholdedRelu", -3, 3, 17, {"alpha": 0.5}), ("Celu", -3, 3, 17, {"alpha": 0.7}),
    ("Mish", -3, 3, 18, {}),
])
def test_more_elementwise_rules(op, lo, hi, opset, attrs):
    kinks = (0.5,) if op == "ThresholdedRelu" else (0,) if op == "Celu" else ()
    check_rule(make_model(op, [("x", (3,))], (3,), attrs=dict(attrs), opset=opset), {"x": u((3,), lo, hi, kinks)})


@pytest.mark.parametrize("op", sorted({"Sign", "Ceil", "Floor", "Round"}))
def test_zero_derivative_rules(op):
    """Piecewise-constant ops carry no derivative: y = x * op(x) has dy/dx = op(x) away from the steps."""
    m = graph_model([helper.make_node(op, ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["out"])],
                    [("x", (3,))], [("out", (3,))])
    check_rule(m, {"x": u((3,), -3, 3, kinks=(-2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5))})


def test_zero_derivative_ops_are_registered():
    """Ops with no float derivative: registered, and their outputs carry no derivative."""
    from nnpartials.exporter.rules import ZERO_DERIVATIVE

    listed = {"Sign", "Ceil", "Floor", "Round", "Shape", "Size", "ArgMax", "ArgMin", "IsNaN", "IsInf", "NonZero",
              "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "EyeLike",
              "ConstantOfShape", "RandomNormalLike", "RandomUniformLike", "Bernoulli"}
    assert listed == ZERO_DERIVATIVE - {"TopK_indices"}
    assert listed <= set(RULES)
    # y = x * cast(argmax(x) == 1): the mask is piecewise constant, dy/dx = mask
    nodes = [helper.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=1),
             helper.make_node("Equal", ["am", "one"], ["eq"]),
             helper.make_node("Cast", ["eq"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "m"], ["out"])]
    check_rule(graph_model(nodes, [("x", (3,))], [("out", (3,))], consts={"one": np.array([1], np.int64)}),
               {"x": u((3,))})


def test_shape_subgraph_and_argmax_are_constant():
    """A reshape whose target is computed at run time from Shape/Gather/Concat, next to an ArgMax output."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Concat", ["b", "m1"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["r"]),
             helper.make_node("Tanh", ["r"], ["out"])]
    m = graph_model(nodes, [("x", (2, 3))], [("out", (6,))],
                    consts={"i0": np.array([0], np.int64), "m1": np.array([-1], np.int64)})
    check_rule(m, {"x": u((2, 3))})


def test_gather_rules():
    check_rule(make_model("Gather", [("x", (5,))], (3,), consts={"i": np.array([4, 0, 4], np.int64)},
                          attrs={"axis": 1}), {"x": u((5,))})
    check_rule(make_model("Gather", [("x", (3, 5))], (3,), consts={"i": np.array(-2, np.int64)},
                          attrs={"axis": 2}), {"x": u((3, 5))})
    idx = RNG.integers(0, 4, size=(B, 3)).astype(np.int64)
    check_rule(make_model("GatherElements", [("x", (4,))], (3,), consts={"i": idx}, attrs={"axis": 1}),
               {"x": u((4,))})


def test_pad_tile_expand_rules():
    check_rule(make_model("Pad", [("x", (3,))], (6,), consts={"pads": np.array([0, 1, 0, 2], np.int64)}),
               {"x": u((3,))})
    check_rule(make_model("Tile", [("x", (2, 3))], (4, 3), consts={"r": np.array([1, 2, 1], np.int64)}),
               {"x": u((2, 3))})
    check_rule(make_model("Expand", [("x", (1, 3))], (4, 3), consts={"s": np.array([1, 4, 3], np.int64)}),
               {"x": u((1, 3))})
    # x [batch, 3] expanded to [2, batch, 3] (a leading axis, the batch axis moved), then transposed back
    nodes = [helper.make_node("Expand", ["x", "s"], ["e"]), helper.make_node("Transpose", ["e"], ["out"], perm=[1, 0, 2])]
    check_rule(graph_model(nodes, [("x", (3,))], [("out", (2, 3))], consts={"s": np.array([2, 1, 3], np.int64)}),
               {"x": u((3,))})


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_rule(mode):
    m = make_model("Resize", [("x", (1, 3, 4))], (1, 6, 8),
                   consts={"scales": np.array([1, 1, 2, 2], np.float32)},
                   attrs={"mode": mode, "_inputs": ["x", "", "scales"]})
    check_rule(m, {"x": u((1, 3, 4))})


def test_einsum_rule():
    check_rule(make_model("Einsum", [("a", (2, 3)), ("b", (3, 4))], (2, 4), attrs={"equation": "nij,njk->nik"}),
               {"a": u((2, 3)), "b": u((3, 4))})
    check_rule(make_model("Einsum", [("a", (3,))], (4,), consts={"w": RNG.normal(size=(3, 4))},
                          attrs={"equation": "ni,ij->nj"}), {"a": u((3,))})


def test_matmul_of_two_variables_attention():
    """[batch, 2, 3] @ [batch, 3, 4]: both operands depend on the input, per point (as in attention)."""
    check_rule(make_model("MatMul", [("a", (2, 3)), ("b", (3, 4))], (2, 4)), {"a": u((2, 3)), "b": u((3, 4))})
    # a broadcast operand: [batch, 2, 3] @ [3, 4] computed from the input (x[:, 0] reshaped)
    nodes = [helper.make_node("Tanh", ["a"], ["t"]), helper.make_node("MatMul", ["t", "b"], ["out"])]
    check_rule(graph_model(nodes, [("a", (2, 3)), ("b", (3, 4))], [("out", (2, 4))]),
               {"a": u((2, 3)), "b": u((3, 4))})


def test_batch_axis_moves_and_folds():
    """Transpose moving the batch axis, Reshape folding it ([B, 3, 4] -> [B*3, 4]), and back."""
    w = RNG.normal(size=(4, 5))
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Tanh", ["t"], ["h"]),
             helper.make_node("Transpose", ["h"], ["u"], perm=[1, 0, 2]),
             helper.make_node("Reshape", ["u", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["p"]),
             helper.make_node("Reshape", ["p", "back"], ["out"])]
    m = graph_model(nodes, [("x", (3, 4))], [("out", (3, 5))],
                    consts={"w": w, "flat": np.array([-1, 4], np.int64), "back": np.array([-1, 3, 5], np.int64)})
    check_rule(m, {"x": u((3, 4))})


def test_broadcast_that_changes_rank():
    """[batch, 3] + [2, batch, 3]: the first operand is broadcast to a higher rank."""
    nodes = [helper.make_node("Unsqueeze", ["b", "ax"], ["bu"]), helper.make_node("Concat", ["bu", "bu"], ["bb"], axis=0),
             helper.make_node("Add", ["a", "bb"], ["s"]), helper.make_node("Transpose", ["s"], ["out"], perm=[1, 0, 2])]
    m = graph_model(nodes, [("a", (3,)), ("b", (3,))], [("out", (2, 3))], consts={"ax": np.array([0], np.int64)})
    check_rule(m, {"a": u((3,)), "b": u((3,))})


def test_slice_several_axes_and_steps():
    consts = {"s": np.array([0, 4], np.int64), "e": np.array([3, 0], np.int64), "a": np.array([1, 2], np.int64),
              "st": np.array([2, -2], np.int64)}
    check_rule(make_model("Slice", [("x", (4, 5))], (2, 2), consts=consts), {"x": u((4, 5))})


def test_float64_model_differentiates_in_float64():
    m = make_model("Tanh", [("x", (3,))], (3,), dtype=np.float64)
    jm, _ = build_jacobian_model(m)
    assert jm.graph.output[1].type.tensor_type.elem_type == TensorProto.DOUBLE
    x = RNG.uniform(-2, 2, (5, 3))
    _, j = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert j.dtype == np.float64
    np.testing.assert_allclose(np.einsum("bii->bi", j), 1 - np.tanh(x) ** 2, rtol=1e-14, atol=1e-15)


def test_refusals_name_the_reason():
    m = make_model("BatchNormalization", [("x", (4,))], (4,), attrs={"training_mode": 1},
                   consts={k: RNG.uniform(0.5, 2, 4) for k in ("scale", "bias", "mean", "var")})
    with pytest.raises(UnsupportedOpError, match="training"):
        build_jacobian_model(m)
    m = make_model("Concat", [("a", (2,)), ("b", (2,))], (2,), attrs={"axis": 0})
    with pytest.raises(UnsupportedOpError, match="batch axis"):
        build_jacobian_model(m)


def test_missing_shape_information_is_said_as_such():
    """A reshape whose target comes from outside the graph has no static shape; a softmax over it is refused, and the
    error says shape information is missing (not only that the axis is dynamic, nor that a rule is missing)."""
    g = helper.make_graph([helper.make_node("Reshape", ["x", "target"], ["r"]),
                           helper.make_node("Softmax", ["r"], ["s"], axis=1, name="sm"),
                           helper.make_node("Reshape", ["s", "back"], ["out"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6]),
                           helper.make_tensor_value_info("target", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 6])],
                          [numpy_helper.from_array(np.array([-1, 6], np.int64), "back")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(UnsupportedOpError, match="'sm'.*missing shape information: the graph gives no size") as ei:
        build_jacobian_model(m)
    assert "no derivative rule" not in str(ei.value)
