"""Second-order companion graphs (exporter/second_order.py): the Hessian, Laplacian and Hessian-vector-product graphs.

References are independent of the code under test:

* every rule with a nonzero second derivative, as a single-node graph, and every linear or piecewise-linear rule
  between two nonlinearities (so that its forward node and the nodes of its derivative are differentiated again):
  float64 central differences (Richardson) of the float64 Jacobian graph, evaluated by onnx's reference implementation
  (``nnpartials.onnx_reference.fd_hessian``; the Jacobian graph is built in forward mode, while the Hessians under
  test are built over both modes). Entries next to a kink are left out by the differences' own error estimate;
* Keras models: nested ``tf.GradientTape`` (``nnpartials.exporter.reference.tf_hessian``) on the Keras model itself,
  on 200 points. Two exceptions use the finite differences above: softsign, whose gradient op (SoftsignGrad) has no
  gradient in TensorFlow, and Keras's LayerNormalization, whose nested-tape Hessian is wrong (see that test);
* PyTorch's exporters' files (tests/fixtures/torch/) and graphs at older opsets: the finite differences above.

The Laplacian is compared with the trace of the reference Hessian, the product with ``H_ref @ v`` for random v.
Module-wide, the graphs are float32 (float64 in one test) and held to ``tolerances.SECOND_ORDER_F32`` scaled by
max(1, max|H_ref|).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from nnpartials import tolerances
from nnpartials.exporter.jacobian import build_jacobian_model
from nnpartials.exporter.rules import RULES, ZERO_DERIVATIVE
from nnpartials.exporter.second_order import (HESSIAN_LAYOUT, HVP_LAYOUT, LAPLACIAN_LAYOUT, build_hessian_model,
                                              build_hvp_model, build_laplacian_model, second_derivatives_vanish)
from nnpartials.onnx_reference import fd_hessian

B = 40
#: float64 graphs against float64 finite differences: the differences' own error (Richardson, ~1e-9) dominates
SECOND_ORDER_F64 = 1e-7
#: Second derivatives of trained-like networks are often far below 1 (a sigmoid network's: ~2e-3), where the
#: project tolerance (scaled by max(1, max|H|)) says little: also max|H - H_ref| <= this * max|H_ref|
OWN_SCALE_F32 = 1e-4


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def scaled(a, ref, mask=None):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        a, ref = a * mask, ref * mask
    return tolerances.scaled_error(a, ref)[1]


# ----- graphs ------------------------------------------------------------------------------------------------------
def op_graph(op, inputs, attrs=None, consts=None, opset=17, pre=None, post=None, node_inputs=None, n_outputs=1,
             dtype=np.float32, before=()):
    """One ``op`` node on graph inputs ``[(name, shape)]`` (each passed through ``pre``, e.g. "Sin", when given) and
    constants ``{name: array}``; each output passed through ``post`` when given. ``node_inputs`` overrides the
    node's input list (names of processed inputs are ``p_<name>``); ``before``: extra nodes ahead of the op.
    Output shapes come from ONNX shape inference."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = list(before)
    names = []
    for name, _ in inputs:
        if pre:
            nodes.append(helper.make_node(pre, [name], [f"p_{name}"]))
            names.append(f"p_{name}")
        else:
            names.append(name)
    inits = []
    for name, value in (consts or {}).items():
        v = np.asarray(value)
        inits.append(numpy_helper.from_array(v.astype(dtype) if v.dtype.kind == "f" else v, name))
    outs = [f"o{k}" for k in range(n_outputs)]
    ins = node_inputs if node_inputs is not None else names + list((consts or {}).keys())
    nodes.append(helper.make_node(op, ins, outs, name=f"{op}_node", **(attrs or {})))
    final = outs
    if post:
        final = [f"out{k}" for k in range(n_outputs)]
        nodes += [helper.make_node(post, [o], [f], name=f"post_{k}") for k, (o, f) in enumerate(zip(outs, final))]
    g = helper.make_graph(nodes, f"g_{op}", [helper.make_tensor_value_info(n, et, ["batch", *s]) for n, s in inputs],
                          [helper.make_tensor_value_info(f, et, None) for f in final], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset < 21 else 10
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    for o, io in zip(m.graph.output, inferred.graph.output):
        if io.type.tensor_type.HasField("shape"):
            o.CopyFrom(io)
        else:  # shape inference knows no shape for this op (GroupNormalization): the input's
            o.type.tensor_type.shape.dim.extend(m.graph.input[0].type.tensor_type.shape.dim)
        o.type.tensor_type.shape.dim[0].dim_param = "batch"
    return m


def points(rng, inputs, ranges, kinks=(), dtype=np.float32):
    feeds = {}
    for (name, shape), (lo, hi) in zip(inputs, ranges):
        x = rng.uniform(lo, hi, size=(B, *shape))
        for k in kinks:  # keep away from kinks of the first and second derivative
            close = np.abs(x - k) < 0.1
            x = np.where(close, k + np.sign(x - k + 1e-12) * 0.2, x)
        feeds[name] = x.astype(dtype)
    return feeds


def check_second_order(model, feeds, tol=tolerances.SECOND_ORDER_F32, expect_method=None, jac_modes=("auto",)):
    """The three graphs (and the Hessian over each inner mode in ``jac_modes``) against float64 central differences
    of the float64 Jacobian graph (built in forward mode, as a reference independent of the graphs under test)."""
    names = [i.name for i in model.graph.input]
    xs = [feeds[n] for n in names]
    ref_jac, _ = build_jacobian_model(model, mode="forward")
    H_ref, keep = fd_hessian(ref_jac, xs)
    assert keep.mean() > 0.9, "too many entries next to a kink: move the points"
    y_ref, *j_ref = run(ref_jac, feeds)
    J_ref = np.concatenate(j_ref, axis=2)
    n, n_out, n_in, _ = H_ref.shape
    dtype = xs[0].dtype
    for jm in jac_modes:
        hm, info = build_hessian_model(model, jac_mode=jm)
        assert info["n_in"] == n_in and info["n_out"] == n_out and info["layout"] == HESSIAN_LAYOUT
        y, J, H = run(hm, feeds)
        assert H.shape == (n, n_out, n_in, n_in) and H.dtype == dtype
        assert scaled(y, y_ref) <= tol and scaled(J, J_ref) <= tol
        err = scaled(H, H_ref, keep)
        assert err <= tol, f"Hessian ({info['method']}): max scaled error {err:.3g}"
    lm, linfo = build_laplacian_model(model)
    y, J, lap = run(lm, feeds)
    assert lap.shape == (n, n_out) and lap.dtype == dtype and linfo["layout"] == LAPLACIAN_LAYOUT
    assert scaled(J, J_ref) <= tol
    diag = np.einsum("bijj->bij", keep).all(axis=2)
    err = scaled(lap, np.einsum("bijj->bi", H_ref), diag)
    assert err <= tol, f"Laplacian ({linfo['laplacian_method']}): max scaled error {err:.3g}"
    if expect_method is not None:
        assert linfo["laplacian_method"] == expect_method, linfo["laplacian_fallback_reason"]
    vm, vinfo = build_hvp_model(model)
    v = np.random.default_rng(5).standard_normal((n, n_in)).astype(dtype)
    y, hv = run(vm, dict(feeds, **{vinfo["v_input"]: v}))
    assert hv.shape == (n, n_out, n_in) and vinfo["layout"] == HVP_LAYOUT
    err = scaled(hv, np.einsum("bijk,bk->bij", H_ref, v.astype(np.float64)), keep.all(axis=3))
    assert err <= tol, f"Hessian-vector product: max scaled error {err:.3g}"
    return H_ref, linfo


# ----- every rule with a nonzero second derivative, on its own ------------------------------------------------
RNG = np.random.default_rng(2024)
X3 = [("x", (3,))]
AB = [("a", (3,)), ("b", (3,))]

#: (id, op, inputs, attrs, consts, opset, ranges per input, kinks)
SMOOTH = [
    ("Tanh", "Tanh", X3, {}, {}, 17, [(-2, 2)], ()),
    ("Sigmoid", "Sigmoid", X3, {}, {}, 17, [(-4, 4)], ()),
    ("Exp", "Exp", X3, {}, {}, 17, [(-2, 2)], ()),
    ("Log", "Log", X3, {}, {}, 17, [(0.4, 3)], ()),
    ("Softplus", "Softplus", X3, {}, {}, 17, [(-4, 4)], ()),
    ("Softsign", "Softsign", X3, {}, {}, 17, [(-3, 3)], (0,)),
    ("Erf", "Erf", X3, {}, {}, 17, [(-2, 2)], ()),
    ("Gelu", "Gelu", X3, {}, {}, 20, [(-3, 3)], ()),
    ("Gelu-tanh", "Gelu", X3, {"approximate": "tanh"}, {}, 20, [(-3, 3)], ()),
    ("Elu", "Elu", X3, {"alpha": 0.7}, {}, 17, [(-3, 3)], (0,)),
    ("Selu", "Selu", X3, {}, {}, 17, [(-3, 3)], (0,)),
    ("Celu", "Celu", X3, {"alpha": 0.7}, {}, 17, [(-3, 3)], (0,)),
    ("Mish", "Mish", X3, {}, {}, 18, [(-3, 3)], ()),
    ("HardSwish", "HardSwish", X3, {}, {}, 17, [(-5, 5)], (-3, 3)),
    ("Sqrt", "Sqrt", X3, {}, {}, 17, [(0.4, 3)], ()),
    ("Reciprocal", "Reciprocal", X3, {}, {}, 17, [(0.6, 3)], ()),
    ("Sin", "Sin", X3, {}, {}, 17, [(-3, 3)], ()),
    ("Cos", "Cos", X3, {}, {}, 17, [(-3, 3)], ()),
    ("Tan", "Tan", X3, {}, {}, 17, [(-1.1, 1.1)], ()),
    ("Atan", "Atan", X3, {}, {}, 17, [(-3, 3)], ()),
    ("Asin", "Asin", X3, {}, {}, 17, [(-0.8, 0.8)], ()),
    ("Acos", "Acos", X3, {}, {}, 17, [(-0.8, 0.8)], ()),
    ("Sinh", "Sinh", X3, {}, {}, 17, [(-2, 2)], ()),
    ("Cosh", "Cosh", X3, {}, {}, 17, [(-2, 2)], ()),
    ("Asinh", "Asinh", X3, {}, {}, 17, [(-3, 3)], ()),
    ("Acosh", "Acosh", X3, {}, {}, 17, [(1.3, 3)], ()),
    ("Atanh", "Atanh", X3, {}, {}, 17, [(-0.8, 0.8)], ()),
    ("Pow-3", "Pow", X3, {}, {"p": np.array(3.0)}, 17, [(-2, 2)], ()),
    ("Pow-2", "Pow", X3, {}, {"p": np.array(2.0)}, 17, [(-2, 2)], ()),
    ("Pow-0.5", "Pow", X3, {}, {"p": np.array(0.5)}, 17, [(0.4, 3)], ()),
    ("Pow-variable-exponent", "Pow", AB, {}, {}, 17, [(0.5, 2), (-1.5, 1.5)], ()),
    ("Mul-two-variables", "Mul", AB, {}, {}, 17, [(-2, 2), (-2, 2)], ()),
    ("Div-two-variables", "Div", AB, {}, {}, 17, [(-2, 2), (0.6, 2)], ()),
    ("Div-variable-denominator", "Div", [("b", (3,))], {"_inputs": ["a", "b"]}, {"a": np.array([1.5, -0.5, 2.0])},
     17, [(0.6, 2)], ()),
    ("PRelu-variable-slope", "PRelu", [("x", (3,)), ("s", (3,))], {}, {}, 17, [(-2, 2), (0.1, 0.5)], (0,)),
    ("Pow-two-variables-broadcast", "Pow", [("a", (2, 3)), ("b", (1, 3))], {}, {}, 17, [(0.5, 2), (-1, 1)], ()),
    ("Mul-broadcast", "Mul", [("a", (1, 3)), ("b", (2, 3))], {}, {}, 17, [(-2, 2), (-2, 2)], ()),
    ("MatMul-two-variables", "MatMul", [("a", (2, 3)), ("b", (3, 4))], {}, {}, 17, [(-2, 2), (-2, 2)], ()),
    ("Einsum-two-variables", "Einsum", [("a", (2, 3)), ("b", (3, 4))], {"equation": "nij,njk->nik"}, {}, 17,
     [(-2, 2), (-2, 2)], ()),
    ("Softmax", "Softmax", [("x", (3, 4))], {"axis": -1}, {}, 17, [(-2, 2)], ()),
    ("LogSoftmax", "LogSoftmax", [("x", (3, 4))], {"axis": 1}, {}, 17, [(-2, 2)], ()),
    ("LayerNormalization", "LayerNormalization", [("x", (3, 4))], {"axis": -1, "epsilon": 1e-3},
     {"scale": RNG.uniform(0.5, 2, 4), "bias": RNG.normal(size=4)}, 17, [(-2, 2)], ()),
    ("InstanceNormalization", "InstanceNormalization", [("x", (2, 4))], {"epsilon": 1e-3},
     {"scale": RNG.uniform(0.5, 2, 2), "bias": RNG.normal(size=2)}, 17, [(-2, 2)], ()),
    ("GroupNormalization", "GroupNormalization", [("x", (4, 2))], {"epsilon": 1e-3, "num_groups": 2},
     {"scale": RNG.uniform(0.5, 2, 4), "bias": RNG.normal(size=4)}, 21, [(-2, 2)], ()),
    ("ReduceL2", "ReduceL2", [("x", (3, 4))], {"keepdims": 0, "axes": [2]}, {}, 17, [(-2, 2)], ()),
    ("ReduceSumSquare", "ReduceSumSquare", [("x", (3, 4))], {"keepdims": 1, "axes": [2]}, {}, 17, [(-2, 2)],
     ()),
    ("ReduceLogSumExp", "ReduceLogSumExp", [("x", (3, 4))], {"keepdims": 0, "axes": [2]}, {}, 17, [(-2, 2)],
     ()),
    ("ReduceLogSum", "ReduceLogSum", [("x", (3, 4))], {"keepdims": 1, "axes": [2]}, {}, 17, [(0.3, 2)], ()),
]


@pytest.mark.parametrize("case", SMOOTH, ids=[c[0] for c in SMOOTH])
def test_rule_with_nonzero_second_derivative(case):
    _, op, inputs, attrs, consts, opset, ranges, kinks = case
    attrs = dict(attrs)
    m = op_graph(op, inputs, attrs, consts, opset, node_inputs=attrs.pop("_inputs", None))
    feeds = points(np.random.default_rng(len(op)), inputs, ranges, kinks)
    H_ref, _ = check_second_order(m, feeds, expect_method="forward-laplacian", jac_modes=("reverse", "forward"))
    assert np.abs(H_ref).max() > 1e-3  # the case really has a second derivative
    assert second_derivatives_vanish(m)[0] is False


def test_float64_models_give_float64_second_derivatives():
    """float64 graphs, against the same differences with a tolerance only float64 arithmetic meets."""
    rng = np.random.default_rng(3)
    for op, inputs, attrs, consts, ranges in [
            ("Tanh", X3, {}, {}, [(-2, 2)]),
            ("Div", AB, {}, {}, [(-2, 2), (0.6, 2)]),
            ("Softmax", [("x", (3, 4))], {"axis": -1}, {}, [(-2, 2)]),
            ("LayerNormalization", [("x", (3, 4))], {"epsilon": 1e-3},
             {"scale": rng.uniform(0.5, 2, 4), "bias": rng.normal(size=4)}, [(-2, 2)])]:
        m = op_graph(op, inputs, attrs, consts, dtype=np.float64)
        check_second_order(m, points(rng, inputs, ranges, dtype=np.float64), tol=SECOND_ORDER_F64,
                           jac_modes=("reverse", "forward"))


# ----- linear and piecewise-linear rules between two nonlinearities -------------------------------------------
X23 = [("x", (2, 3))]
IMG = [("x", (1, 4, 4))]


def _conv_transpose_weights():
    return {"w": np.random.default_rng(1).normal(size=(2, 2, 3, 3))}


#: (id, op, inputs, attrs, consts, opset, node_inputs or None, outputs). Every input goes through Sin, every output
#: through Tanh: the Jacobian graph then applies the op's derivative (forward and adjoint) to input-dependent
#: tensors, which the second pass differentiates again.
SANDWICHED = [
    ("Identity", "Identity", X3, {}, {}, 17, None, 1),
    ("Dropout", "Dropout", X3, {}, {}, 17, None, 1),
    ("Cast", "Cast", X3, {"to": TensorProto.FLOAT}, {}, 17, None, 1),
    ("Add", "Add", AB, {}, {}, 17, None, 1),
    ("Sum", "Sum", AB + [("c", (3,))], {}, {}, 17, None, 1),
    ("Mean", "Mean", AB, {}, {}, 17, None, 1),
    ("Sub", "Sub", AB, {}, {}, 17, None, 1),
    ("Neg", "Neg", X3, {}, {}, 17, None, 1),
    ("Add-broadcast", "Add", [("a", (1, 3)), ("b", (2, 3))], {}, {}, 17, None, 1),
    ("BatchNormalization", "BatchNormalization", [("x", (3, 2))], {},
     {"s": [0.5, 1.5, 2.0], "bb": [0.1, -0.2, 0.3], "mu": [0.2, -0.1, 0.0], "var": [0.5, 1.0, 2.0]}, 17, None, 1),
    ("Reshape", "Reshape", X23, {}, {"shape": np.array([0, 3, 2], np.int64)}, 17, None, 1),
    ("Reshape-flat", "Reshape", X23, {}, {"shape": np.array([-1, 6], np.int64)}, 17, None, 1),
    ("Flatten", "Flatten", X23, {"axis": 1}, {}, 17, None, 1),
    ("Squeeze", "Squeeze", [("x", (1, 3))], {}, {"axes": np.array([1], np.int64)}, 17, None, 1),
    ("Unsqueeze", "Unsqueeze", X3, {}, {"axes": np.array([1], np.int64)}, 17, None, 1),
    ("Transpose", "Transpose", X23, {"perm": [0, 2, 1]}, {}, 17, None, 1),
    ("Concat", "Concat", AB, {"axis": 1}, {}, 17, None, 1),
    ("Slice", "Slice", [("x", (5,))], {}, {"s": np.array([1], np.int64), "e": np.array([4], np.int64),
                                         "ax": np.array([1], np.int64)}, 17, None, 1),
    ("Slice-steps", "Slice", [("x", (4, 5))], {}, {"s": np.array([0, 4], np.int64), "e": np.array([3, 0], np.int64),
                                                 "ax": np.array([1, 2], np.int64),
                                                 "st": np.array([2, -2], np.int64)}, 17, None, 1),
    ("Split", "Split", [("x", (5,))], {"axis": 1}, {"sp": np.array([2, 3], np.int64)}, 17, None, 2),
    ("ReduceSum", "ReduceSum", X23, {"keepdims": 0}, {"axes": np.array([2], np.int64)}, 17, None, 1),
    ("ReduceMean", "ReduceMean", X23, {"keepdims": 1, "axes": [1]}, {}, 17, None, 1),
    ("Gather", "Gather", [("x", (5,))], {"axis": 1}, {"i": np.array([4, 0, 4], np.int64)}, 17, None, 1),
    ("GatherElements", "GatherElements", [("x", (4,)), ("z", (3,))], {"axis": 1}, {}, 17, ["p_x", "i"], 1),
    ("Pad", "Pad", X3, {}, {"pads": np.array([0, 1, 0, 2], np.int64)}, 17, None, 1),
    ("Tile", "Tile", X23, {}, {"r": np.array([1, 2, 1], np.int64)}, 17, None, 1),
    ("Expand", "Expand", [("x", (1, 3))], {}, {"s": np.array([1, 4, 3], np.int64)}, 17, None, 1),
    ("Resize", "Resize", [("x", (1, 2, 3))], {"mode": "linear"}, {"scales": np.array([1, 1, 2, 2], np.float32)}, 17,
     ["p_x", "", "scales"], 1),
    ("Conv", "Conv", [("x", (2, 5))], {"pads": [1, 1], "strides": [2]},
     {"w": np.random.default_rng(0).normal(size=(3, 2, 3)), "bias": np.array([0.1, -0.2, 0.3])}, 17, None, 1),
    # stride 1 and two channels per group: the Jacobian graph's adjoint is a Conv with the flipped kernel
    ("Conv-stride1", "Conv", [("x", (2, 5, 4))], {"pads": [1, 0, 1, 1]},
     {"w": np.random.default_rng(3).normal(size=(3, 2, 3, 2)), "bias": np.array([0.1, -0.2, 0.3])}, 17, None, 1),
    ("ConvTranspose", "ConvTranspose", [("x", (2, 2, 2))], {"strides": [2, 2], "pads": [1, 0, 1, 1],
                                                             "output_padding": [1, 0]},
     _conv_transpose_weights(), 17, None, 1),
    ("AveragePool", "AveragePool", IMG, {"kernel_shape": [2, 2], "strides": [2, 2]}, {}, 17, None, 1),
    ("GlobalAveragePool", "GlobalAveragePool", IMG, {}, {}, 17, None, 1),
    ("MatMul-constant", "MatMul", X3, {}, {"w": np.random.default_rng(0).normal(size=(3, 4))}, 17, None, 1),
    ("Gemm", "Gemm", X3, {"transB": 1, "alpha": 0.5},
     {"w": np.random.default_rng(1).normal(size=(4, 3)), "c": np.array([0.1, 0.2, 0.3, 0.4])}, 17, None, 1),
    ("Einsum-constant", "Einsum", X3, {"equation": "ni,ij->nj"}, {"w": np.random.default_rng(2).normal(size=(3, 4))},
     17, None, 1),
    ("Relu", "Relu", X3, {}, {}, 17, None, 1),
    ("LeakyRelu", "LeakyRelu", X3, {"alpha": 0.2}, {}, 17, None, 1),
    ("LeakyRelu-large-slope", "LeakyRelu", X3, {"alpha": 1.5}, {}, 17, None, 1),
    ("PRelu", "PRelu", X3, {}, {"slope": np.array([0.1, 0.2, 0.3])}, 17, None, 1),
    ("Clip", "Clip", X3, {}, {"lo": np.array(-0.3), "hi": np.array(0.4)}, 17, None, 1),
    ("HardSigmoid", "HardSigmoid", X3, {"alpha": 1.0, "beta": 0.2}, {}, 17, None, 1),
    ("Max", "Max", AB, {}, {}, 17, None, 1),
    ("Min", "Min", AB, {}, {}, 17, None, 1),
    ("Abs", "Abs", X3, {}, {}, 17, None, 1),
    ("MaxPool", "MaxPool", IMG, {"kernel_shape": [2, 2], "strides": [2, 2]}, {}, 17, None, 1),
    # windows that leave the last row and column out (5 = 2 x 2 + 1): the adjoint spreads and pads, no scatter
    ("MaxPool-uncovered", "MaxPool", [("x", (2, 5, 5))], {"kernel_shape": [2, 2], "strides": [2, 2]}, {}, 17, None, 1),
    ("MaxPool-overlapping", "MaxPool", [("x", (1, 5, 5))], {"kernel_shape": [3, 3], "strides": [2, 2]}, {}, 17, None,
     1),
    ("GlobalMaxPool", "GlobalMaxPool", IMG, {}, {}, 17, None, 1),
    ("ReduceMax", "ReduceMax", X23, {"keepdims": 0, "axes": [2]}, {}, 17, None, 1),
    ("ReduceMin", "ReduceMin", X23, {"keepdims": 1, "axes": [2]}, {}, 17, None, 1),
    ("ReduceL1", "ReduceL1", X23, {"keepdims": 0, "axes": [2]}, {}, 17, None, 1),
    ("ThresholdedRelu", "ThresholdedRelu", X3, {"alpha": 0.3}, {}, 17, None, 1),
    ("Where", "Where", AB, {}, {}, 17, ["m", "p_a", "p_b"], 1),
]


@pytest.mark.parametrize("case", SANDWICHED, ids=[c[0] for c in SANDWICHED])
def test_linear_and_piecewise_linear_rules_between_nonlinearities(case):
    _, op, inputs, attrs, consts, opset, node_inputs, n_out = case
    before = []
    if op == "Where":  # the condition: a mask of the first input (piecewise constant)
        before = [helper.make_node("Sin", ["a"], ["sa"]), helper.make_node("Greater", ["sa", "thr"], ["m"])]
        consts = dict(consts, thr=np.array(0.1))
    if op == "GatherElements":  # indices per point from the signs of input z (piecewise constant): 0 or 2
        before = [helper.make_node("Sign", ["z"], ["sz"]), helper.make_node("Add", ["sz", "one"], ["sz1"]),
                  helper.make_node("Cast", ["sz1"], ["i"], to=TensorProto.INT64)]
        consts = dict(consts, one=np.array(1.0))
    m = op_graph(op, inputs, dict(attrs), consts, opset, pre="Sin", post="Tanh", node_inputs=node_inputs,
                 n_outputs=n_out, before=before)
    feeds = points(np.random.default_rng(len(op) + 7), inputs, [(-1.4, 1.4)] * len(inputs))
    check_second_order(m, feeds, jac_modes=("reverse", "forward"))
    # on its own (no nonlinearity around it) the op is linear or piecewise linear
    alone = op_graph(op, inputs, dict(attrs), consts, opset, n_outputs=n_out, before=before,
                     node_inputs=[i.removeprefix("p_") for i in node_inputs] if node_inputs else None)
    vanish, reason = second_derivatives_vanish(alone)
    assert vanish, reason


def test_piecewise_constant_ops_carry_no_second_derivative():
    """Sign, Floor, Ceil, Round, comparisons and ArgMax masks: y = tanh(x) * op(x) has y'' = tanh''(x) op(x)."""
    for op in ("Sign", "Floor", "Ceil", "Round"):
        nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node(op, ["x"], ["s"]),
                 helper.make_node("Mul", ["t", "s"], ["out"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        feeds = points(np.random.default_rng(0), X3, [(-2.8, 2.8)], kinks=(-2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5,
                                                                          2, 2.5))
        check_second_order(m, feeds, expect_method="forward-laplacian")
    nodes = [helper.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=1),
             helper.make_node("Equal", ["am", "one"], ["eq"]),
             helper.make_node("Cast", ["eq"], ["msk"], to=TensorProto.FLOAT),
             helper.make_node("Sin", ["x"], ["s"]),
             helper.make_node("Mul", ["s", "msk"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
                          [numpy_helper.from_array(np.array([1], np.int64), "one")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    check_second_order(m, points(np.random.default_rng(1), X3, [(-2, 2)]))


def test_every_rule_is_covered():
    """Keeps this file in step with the rule table: every rule with a nonzero second derivative has a single-node
    case, every linear or piecewise-linear one a case between nonlinearities, every piecewise-constant op (no
    derivative at all) is registered as such."""
    smooth = {c[1] for c in SMOOTH}
    sandwiched = {c[1] for c in SANDWICHED}
    uncovered = sorted(set(RULES) - smooth - sandwiched - ZERO_DERIVATIVE)
    assert not uncovered, f"rules without a second-order test: {uncovered}"


# ----- Keras models against nested GradientTape ------------------------------------------------------------------
N_POINTS = 200
SMOOTH_ACTIVATIONS = ["tanh", "sigmoid", "softplus", "swish", "gelu", "gelu_tanh", "elu", "selu", "exponential",
                      "softsign"]


def _keras_graphs(keras_model, seed=0, n=N_POINTS):
    from nnpartials.exporter.keras_export import load_model, to_onnx

    traced = load_model(keras_model)
    fwd = to_onnx(traced)
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-3, 3, size=(n, *s)).astype(np.float32) for s in traced.input_shapes]
    return traced, fwd, xs


def _check_against(fwd, traced, xs, y_ref, J_ref, H_ref, tol=tolerances.SECOND_ORDER_F32):
    feeds = dict(zip(traced.input_names, xs))
    n, n_out, n_in, _ = H_ref.shape
    hm, info = build_hessian_model(fwd)
    y, J, H = run(hm, feeds)
    assert H.shape == (n, n_out, n_in, n_in) and info["n_in"] == n_in and info["n_out"] == n_out
    for what, a, r in (("y", y, y_ref), ("dy_dx", J, J_ref), ("d2y_dx2", H, H_ref)):
        err = scaled(a, r)
        assert err <= tol, f"Hessian graph, {what}: max scaled error {err:.3g}"
    lm, linfo = build_laplacian_model(fwd)
    y, J, lap = run(lm, feeds)
    for what, a, r in (("y", y, y_ref), ("dy_dx", J, J_ref), ("laplacian", lap, np.einsum("bijj->bi", H_ref))):
        err = scaled(a, r)
        assert err <= tol, f"Laplacian graph ({linfo['laplacian_method']}), {what}: max scaled error {err:.3g}"
    vm, vinfo = build_hvp_model(fwd)
    v = np.random.default_rng(9).standard_normal((n, n_in)).astype(np.float32)
    y, hv = run(vm, dict(feeds, **{vinfo["v_input"]: v}))
    hv_ref = np.einsum("bijk,bk->bij", H_ref, v.astype(np.float64))
    err = scaled(hv, hv_ref)
    assert err <= tol, f"Hessian-vector product: max scaled error {err:.3g}"
    for what, a, r in (("d2y_dx2", H, H_ref), ("laplacian", lap, np.einsum("bijj->bi", H_ref)), ("hvp", hv, hv_ref)):
        own = float(np.abs(np.asarray(a, np.float64) - r).max() / np.abs(r).max())
        assert own <= OWN_SCALE_F32, f"{what}: max error {own:.3g} of max |reference|"
    return H, linfo


def _tape(traced, xs):
    from nnpartials.exporter.reference import tf_hessian

    return tf_hessian(traced, xs)


def _finite_differences(fwd, traced, xs):
    """(y, J, H) from the float64 Jacobian graph and its central differences, where TensorFlow has no usable second
    derivative."""
    jac, _ = build_jacobian_model(fwd, mode="forward")
    y, *js = run(jac, dict(zip(traced.input_names, xs)))
    H, keep = fd_hessian(jac, xs)
    assert keep.all()
    return y, np.concatenate(js, axis=2), H


@pytest.mark.parametrize("act", SMOOTH_ACTIVATIONS)
def test_dense_activation_matches_nested_gradient_tape(act):
    traced, fwd, xs = _keras_graphs(models.dense_model(act))
    if act == "softsign":  # tf: "No gradient defined for operation ... SoftsignGrad"
        y_ref, J_ref, H_ref = _finite_differences(fwd, traced, xs)
    else:
        y_ref, J_ref, H_ref = _tape(traced, xs)
    H, linfo = _check_against(fwd, traced, xs, y_ref, J_ref, H_ref)
    assert linfo["laplacian_method"] == "forward-laplacian"
    assert np.abs(H_ref).max() > 1e-4
    vanish, reason = second_derivatives_vanish(fwd)
    assert not vanish and "nonzero second derivative" in reason


@pytest.mark.parametrize("build", [models.multi_input_model, models.dense_rank3_model], ids=["multi", "rank3"])
def test_multi_input_multi_output_and_rank3_match_nested_gradient_tape(build):
    """Two inputs [batch, 2] and [batch, 3] with two output heads (n_in = 5 features over both inputs, n_out = 3),
    and an input [batch, 3, 4] with an output [batch, 3, 2] (n_in = 12, n_out = 6)."""
    traced, fwd, xs = _keras_graphs(build())
    y_ref, J_ref, H_ref = _tape(traced, xs)
    H, _ = _check_against(fwd, traced, xs, y_ref, J_ref, H_ref)
    assert np.allclose(H, np.swapaxes(H, 2, 3), atol=1e-6 * max(1.0, np.abs(H).max()))


@pytest.mark.parametrize("act,op", [("relu", "Relu"), ("leaky_relu", "LeakyRelu")])
def test_piecewise_linear_network_has_zero_second_derivatives(act, op):
    traced, fwd, xs = _keras_graphs(models.dense_model(act))
    feeds = dict(zip(traced.input_names, xs))
    y_ref, J_ref, H_ref = _tape(traced, xs)
    _, J, H = run(build_hessian_model(fwd)[0], feeds)
    assert not H.any() and not H_ref.any()
    assert scaled(J, J_ref) <= tolerances.JACOBIAN_F32
    _, _, lap = run(build_laplacian_model(fwd)[0], feeds)
    vm, vinfo = build_hvp_model(fwd)
    _, hv = run(vm, dict(feeds, v=np.ones((N_POINTS, 3), np.float32)))
    assert not lap.any() and not hv.any()
    vanish, reason = second_derivatives_vanish(fwd)
    assert vanish and op in reason and "piecewise linear" in reason
    tanh_vanish, tanh_reason = second_derivatives_vanish(_keras_graphs(models.dense_model("tanh"), n=1)[1])
    assert not tanh_vanish and "Tanh" in tanh_reason


# ----- structure -------------------------------------------------------------------------------------------------
def _per_point_sizes(model):
    """Values per point (static dims multiplied, the batch axis left out) of every tensor of the graph."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    sizes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        sizes[vi.name] = int(np.prod([d.dim_value for d in dims if d.HasField("dim_value")], dtype=np.int64))
    return sizes


def test_forward_laplacian_of_a_tanh_mlp_has_no_tensor_with_two_derivative_axes():
    """n_in = 5, widest layer 16: a tensor with one derivative axis holds at most 5 x 16 values per point; the
    Hessian graph's [n_in, n_out, batch, 16] tensors (two derivative axes) hold 5 x 2 x 16. All tensors together
    hold fewer values per point too (the memory traffic a point costs)."""
    traced, fwd, xs = _keras_graphs(models.dense_model("tanh", n_in=5, units=(16, 12), n_out=2), n=64)
    lm, info = build_laplacian_model(fwd)
    hm, _ = build_hessian_model(fwd)
    assert info["laplacian_method"] == "forward-laplacian" and info["laplacian_fallback_reason"] is None
    lap_sizes, hess_sizes = _per_point_sizes(lm), _per_point_sizes(hm)
    assert max(lap_sizes.values()) <= 5 * 16
    assert max(hess_sizes.values()) >= 5 * 2 * 16
    assert sum(lap_sizes.values()) < sum(hess_sizes.values())
    # and it computes the trace of the Hessian graph's Hessian
    feeds = dict(zip(traced.input_names, xs))
    H = run(hm, feeds)[2]
    assert scaled(run(lm, feeds)[2], np.einsum("bijj->bi", H)) <= tolerances.SECOND_ORDER_F32


@pytest.mark.parametrize("build", [models.softmax_model, models.layer_norm_model], ids=["softmax", "layer_norm"])
def test_softmax_and_layer_normalization_take_the_forward_laplacian(build):
    """Linear maps that depend on the input (softmax's, normalization's): their own derivative is paired with the
    tangents in the forward Laplacian, no Hessian needed. (Keras's LayerNormalization has a wrong second derivative
    under nested GradientTape: on this model it differs by 0.05 (max |H| 4.4) from plain second differences of the
    float64 forward graph, which the graphs here match to 2e-6, and by 0.13 from central differences of TensorFlow's
    own first-order Jacobian; so that model is compared with the float64 differences of the Jacobian graph.)"""
    traced, fwd, xs = _keras_graphs(build(), n=64)
    _, info = build_laplacian_model(fwd)
    assert info["laplacian_method"] == "forward-laplacian", info["laplacian_fallback_reason"]
    reference = _finite_differences if build is models.layer_norm_model else (lambda f, t, x: _tape(t, x))
    _check_against(fwd, traced, xs, *reference(fwd, traced, xs))


def test_laplacian_falls_back_to_the_hessian_trace_and_says_why(monkeypatch):
    """Where the forward Laplacian does not cover a node's derivative, the Laplacian graph is the trace of the
    Hessian graph, and info names the node."""
    import nnpartials.exporter.second_order as so

    def refuse(self, where, *args):
        raise so._Fallback(f"{where}: not covered (test)")

    monkeypatch.setattr(so._ForwardLaplacian, "_linear_correction", refuse)
    traced, fwd, xs = _keras_graphs(models.softmax_model(), n=64)
    model, info = build_laplacian_model(fwd)
    assert info["laplacian_method"] == "hessian-trace"
    assert "Softmax" in info["laplacian_fallback_reason"] and "not covered" in info["laplacian_fallback_reason"]
    assert [o.name for o in model.graph.output] == ["y", "dy_dx", "laplacian"]
    y_ref, J_ref, H_ref = _tape(traced, xs)
    _, linfo = _check_against(fwd, traced, xs, y_ref, J_ref, H_ref)
    assert linfo["laplacian_method"] == "hessian-trace"


def test_graphs_are_checked_and_keep_the_interface():
    fwd = op_graph("Mul", [("x", (2, 3)), ("v", (1, 3))], pre="Sin", post="Tanh")
    for build, outs in ((build_hessian_model, ["y", "dy_dx", "d2y_dx2"]), (build_laplacian_model,
                                                                          ["y", "dy_dx", "laplacian"])):
        m, info = build(fwd)
        onnx.checker.check_model(m, full_check=True)
        assert [o.name for o in m.graph.output] == outs == info["graph_outputs"]
        assert [i.name for i in m.graph.input] == ["x", "v"]
        assert info["n_in"] == 9 and info["n_out"] == 6
        assert info["inputs"] == [{"name": "x", "width": 6}, {"name": "v", "width": 3}]
    # the model already has an input called v: the direction gets another name
    m, info = build_hvp_model(fwd)
    assert info["v_input"] not in ("x", "v") and [i.name for i in m.graph.input] == ["x", "v", info["v_input"]]
    dims = [d.dim_value or d.dim_param for d in m.graph.input[2].type.tensor_type.shape.dim]
    assert dims == ["batch", 9]
    feeds = points(np.random.default_rng(4), [("x", (2, 3)), ("v", (1, 3))], [(-2, 2), (-2, 2)])
    check_second_order(fwd, feeds)


# ----- ONNX files from PyTorch's exporters -------------------------------------------------------------------------
TORCH_FIXTURES = ["mlp_tanh", "mlp_silu", "mlp_gelu", "mlp_gelu_opset18", "cnn", "transformer"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_pytorch_exports(name, exporter):
    """The committed PyTorch fixtures (tests/fixtures/torch/: MLPs, a CNN with ReLU and max-pooling, a
    TransformerEncoderLayer), as export loads them, at their stored points (kept away from kinks)."""
    from pathlib import Path

    from nnpartials.exporter.onnx_import import load_onnx

    folder = Path(__file__).parent / "fixtures" / "torch"
    om = load_onnx(folder / f"{name}_{exporter}.onnx")
    with np.load(folder / f"{name}.npz") as f:
        x = f["x"][:8]
    H_ref, _ = check_second_order(om.model, {om.input_names[0]: x})
    assert (np.abs(H_ref).max() == 0) == (name == "cnn")  # ReLU, max-pooling and linear layers only
    assert second_derivatives_vanish(om.model)[0] == (name == "cnn")


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_older_opsets(opset):
    """Reductions and Unsqueeze take their axes as attributes before opset 13 (ReduceSumSquare before 18); the
    second pass writes them so. y = [tanh(x W1 + b1) W2, sum(tanh(x W1 + b1)^2)]."""
    rng = np.random.default_rng(opset)
    consts = {"w1": rng.normal(size=(3, 5)), "b1": rng.normal(size=5), "w2": rng.normal(size=(5, 2))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["z"]), helper.make_node("Add", ["z", "b1"], ["zb"]),
             helper.make_node("Tanh", ["zb"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y1"]),
             helper.make_node("ReduceSumSquare", ["h"], ["y2"], axes=[1], keepdims=1)]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                          [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["batch", 2]),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    _, info = check_second_order(m, points(rng, X3, [(-2, 2)]), expect_method="forward-laplacian",
                                 jac_modes=("reverse", "forward"))
    assert info["n_out"] == 3


def test_gather_with_indices_computed_at_run_time():
    """Gather whose indices come from the graph (here the last position, from Shape), as MaxPool's argmax positions
    do in a Jacobian graph: both modes of the Jacobian graph and the second pass over each."""
    nodes = [helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Gather", ["shp", "one"], ["n"], axis=0),
             helper.make_node("Sub", ["n", "one"], ["last0"]), helper.make_node("Reshape", ["last0", "r1"], ["last"]),
             helper.make_node("Sin", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "last"], ["g"], axis=1),
             helper.make_node("Mul", ["g", "s"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
                          [numpy_helper.from_array(np.array(1, np.int64), "one"),
                           numpy_helper.from_array(np.array([1], np.int64), "r1")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    check_second_order(m, points(np.random.default_rng(6), [("x", (4,))], [(-2, 2)]), expect_method="forward-laplacian",
                       jac_modes=("reverse", "forward"))
