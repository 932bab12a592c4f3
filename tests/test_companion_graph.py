"""How many nodes the companion graph of a dense network costs onnxruntime, per hidden layer, after onnxruntime's own
graph optimisation (ORT_ENABLE_ALL): a regression guard on the elementwise passes the derivative rules emit.

The networks are built as tf2onnx writes Keras Dense stacks (MatMul, Add, then the activation's nodes), one per
activation the benchmarks use: LeakyReLU (the seed network), tanh (physics) and exact gelu (wide, tf2onnx's
0.5 x erfc(-x / sqrt 2) form). Each companion graph is also checked against a float64 numpy Jacobian, so a graph
made smaller by dropping work fails. The bounds are what the rules achieve, counted per layer in the comments; raise
one only with a reason, and lower it when a change does better.
"""

from __future__ import annotations

import collections
import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnpartials import tolerances
from nnpartials.exporter.jacobian import build_jacobian_model

ALPHA = 0.3  # LeakyReLU slope, as the seed network
_erf = np.vectorize(math.erf)
#: nodes that move no data through an elementwise pass (onnxruntime fuses or folds them, or they are views)
_NOT_ELEMENTWISE = {"MatMul", "Gemm", "FusedGemm", "FusedMatMul", "Reshape", "Transpose", "Identity"}


def _mlp(act: str, n_in: int, widths: list, n_out: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, v):
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name))
        return name

    prev, fan_in = "x", n_in
    for i, w in enumerate(widths + [n_out]):
        W = const(f"W{i}", rng.normal(size=(fan_in, w)) / np.sqrt(fan_in))
        b = const(f"b{i}", rng.normal(size=w) * 0.1)
        nodes += [helper.make_node("MatMul", [prev, W], [f"mm{i}"]), helper.make_node("Add", [f"mm{i}", b], [f"z{i}"])]
        z = f"z{i}"
        if i == len(widths):
            nodes[-1].output[0] = "out"
            break
        if act == "leaky_relu":
            nodes.append(helper.make_node("LeakyRelu", [z], [f"h{i}"], alpha=ALPHA))
        elif act == "tanh":
            nodes.append(helper.make_node("Tanh", [z], [f"h{i}"]))
        elif act == "gelu":  # tf2onnx: 0.5 * z * (1 - erf(-z / sqrt(2)))
            nodes += [helper.make_node("Mul", [const(f"half{i}", 0.5), z], [f"m{i}"]),
                      helper.make_node("Neg", [z], [f"n{i}"]),
                      helper.make_node("Mul", [f"n{i}", const(f"rs{i}", 1 / np.sqrt(2))], [f"t{i}"]),
                      helper.make_node("Erf", [f"t{i}"], [f"e{i}"]),
                      helper.make_node("Sub", [const(f"one{i}", 1.0), f"e{i}"], [f"c{i}"]),
                      helper.make_node("Mul", [f"m{i}", f"c{i}"], [f"h{i}"])]
        prev, fan_in = f"h{i}", w
    graph = helper.make_graph(nodes, f"mlp_{act}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", n_out])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _reference(model, x):
    """y and dy/dx in float64 (forward-mode through the same weights)."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    n = sum(1 for k in w if k.startswith("W"))
    h, J = x.astype(np.float64), np.broadcast_to(np.eye(x.shape[1]), (len(x), x.shape[1], x.shape[1]))
    act = model.graph.name.removeprefix("mlp_")
    for i in range(n):
        z = h @ w[f"W{i}"] + w[f"b{i}"]
        J = np.einsum("bij,ik->bkj", J, w[f"W{i}"])
        if i == n - 1:
            return z, J
        if act == "leaky_relu":
            h, d = np.where(z > 0, z, ALPHA * z), np.where(z > 0, 1.0, ALPHA)
        elif act == "tanh":
            h = np.tanh(z)
            d = 1 - h ** 2
        else:
            phi = 0.5 * (1 + _erf(z / np.sqrt(2)))
            h, d = z * phi, phi + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
        J = J * d[:, :, None]


def _optimised_counts(model, tmp_path, name):
    path = os.path.join(tmp_path, f"{name}.opt.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = path
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def _elementwise(counts):
    return sum(v for k, v in counts.items() if k not in _NOT_ELEMENTWISE)


# (activation, n_in, hidden widths, n_out, nodes per hidden layer, elementwise nodes per hidden layer, nodes once,
#  elementwise nodes once), each beyond the forward graph's after optimisation
CASES = [
    # seed-like, reverse mode (K = 1): per hidden layer a MatMul with W^T, the mask as two HardSigmoid passes (a step
    # of y: exactly 1 or alpha) and its Mul with the cotangent: 4 nodes, 3 elementwise. Once: the Reshape of dy/dx to
    # [batch, 1, n_in], and one Mul fewer: the seed times the last W^T is a constant row, folded into the next W^T.
    ("leaky_relu", 2, [64, 64, 32, 32, 16, 16, 8], 1, 4, 3, 0, -1),
    # physics-like, reverse mode (K = 2): per layer 1 - y^2 (Mul, Sub), its Mul with the [2, batch, n] cotangents
    # and the MatMul: 4 nodes, 3 elementwise. Once: the Transpose to [batch, 2, n_in] (two cotangent rows: nothing
    # to fold into W^T).
    ("tanh", 3, [32, 32, 32, 32], 2, 4, 3, 1, 0),
    # wide-like, reverse mode (K = 1): per layer the MatMul and gelu' = 0.5 erfc + c * (0.5 x) exp(-t^2) (t = -x /
    # sqrt 2; the numbers of both paths folded into one coefficient and W^T): exp(-t^2) (-t^2 as the forward's
    # Neg(x) times its 0.5 x: one Mul; then Exp), its Mul with 0.5 x, erfc times a number, the Add, and one Mul with
    # the cotangent: 7 nodes, 6 elementwise. Once: the Reshape, and the first Mul with the cotangent folded into W^T
    # as for the seed network.
    ("gelu", 16, [32, 32], 1, 7, 6, 0, -1),
]


@pytest.mark.parametrize("act,n_in,widths,n_out,per_layer,per_layer_elementwise,once,once_elementwise", CASES,
                         ids=[c[0] for c in CASES])
def test_companion_graph_node_count(tmp_path, act, n_in, widths, n_out, per_layer, per_layer_elementwise, once,
                                    once_elementwise):
    model = _mlp(act, n_in, widths, n_out)
    jm, info = build_jacobian_model(model, mode="auto")
    assert info["mode"] == "reverse"
    _, fwd = _optimised_counts(model, tmp_path, "forward")
    sess, comp = _optimised_counts(jm, tmp_path, "companion")

    x = np.random.default_rng(1).normal(size=(257, n_in)).astype(np.float32)
    y, J = sess.run(None, {"x": x})
    y_ref, J_ref = _reference(model, x)
    assert tolerances.scaled_error(y, y_ref)[1] <= tolerances.FORWARD_F32
    assert tolerances.scaled_error(J, J_ref)[1] <= tolerances.JACOBIAN_F32

    L = len(widths)
    total, extra_elementwise = sum(comp.values()), _elementwise(comp) - _elementwise(fwd)
    assert total <= sum(fwd.values()) + per_layer * L + once, (fwd, comp)
    assert extra_elementwise <= per_layer_elementwise * L + once_elementwise, (fwd, comp)


@pytest.mark.parametrize("k,shares", [(np.float32(1 / math.sqrt(2)), True), (np.float32(0.7), False)],
                         ids=["k-squared-is-the-half", "other-k"])
def test_erf_derivative_reuses_the_forward_half_only_where_it_is_k_squared(k, shares):
    """y = erf(Neg(x) k) + 0.5 x: Erf's derivative needs -(k x)^2. With k = 1/sqrt 2 (gelu's), k^2 is the graph's
    own 0.5 to float32 precision, and -(k x)^2 is Neg(x) times that 0.5 x, with no Neg of its own; with k = 0.7 it is
    not, and the derivative keeps Neg(t * t). Both against the analytic derivative in float64."""
    nodes = [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Mul", ["n", "k"], ["t"]),
             helper.make_node("Erf", ["t"], ["e"]), helper.make_node("Mul", ["half", "x"], ["h"]),
             helper.make_node("Add", ["e", "h"], ["out"])]
    inits = [numpy_helper.from_array(np.array(k, np.float32), "k"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    g = helper.make_graph(nodes, "erf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    jm, info = build_jacobian_model(model, mode="reverse")
    new_negs = sum(n.op_type == "Neg" for n in jm.graph.node) - 1
    assert new_negs == (0 if shares else 1), [n.op_type for n in jm.graph.node]
    x = np.linspace(-6, 6, 241, dtype=np.float32).reshape(-1, 1)
    sess = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"])
    _, J = sess.run(None, {"x": x})
    xd, kd = x.astype(np.float64), float(k)
    want = -kd * 2 / math.sqrt(math.pi) * np.exp(-(kd * xd) ** 2) + 0.5
    assert np.abs(J.reshape(-1) - want.reshape(-1)).max() <= 1e-6


def _small_cnn(seed=0):
    """[batch, 1, 9, 9] -> Conv 1->4 3x3 (pad 1) -> Relu -> MaxPool 2 (9 -> 4: the last row and column in no window)
    -> Conv 4->6 3x3 (pad 1) -> Relu -> MaxPool 2 -> Flatten -> Gemm 24->3."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * k, n) for n, s, k in
             [("w1", (4, 1, 3, 3), 0.5), ("b1", (4,), 0.1), ("w2", (6, 4, 3, 3), 0.3), ("b2", (6,), 0.1),
              ("wd", (3, 24), 0.3), ("bd", (3,), 0.1)]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p2"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "wd", "bd"], ["out"], transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 9, 9])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_cnn_companion_graph_passes():
    """Reverse mode through convolutions and max-pooling: the adjoint of the 4-channel convolution is a Conv (the
    1-channel one keeps ConvTranspose), the pooling adjoints scatter nothing, and each relu mask is multiplied with
    its pooling's argmax mask on the forward side so the cotangent [K, batch, ...] takes one product per
    relu + pooling pair, not two. Values against float64 finite differences."""
    from nnpartials.onnx_reference import Float64Graph

    model = _small_cnn()
    jm, info = build_jacobian_model(model, mode="auto")
    assert info["mode"] == "reverse"
    ops = collections.Counter(n.op_type for n in jm.graph.node)
    assert ops["ScatterElements"] == 0 and ops["ConvTranspose"] == 1 and ops["Conv"] == 3, ops
    # the nodes on the cotangent's path: everything downstream of the seed constants
    on_path = {i.name for i in jm.graph.initializer if "seed" in i.name}
    muls = 0
    for n in jm.graph.node:
        if any(i in on_path for i in n.input):
            on_path.update(n.output)
            muls += n.op_type == "Mul"
    assert muls == 2, [n.op_type for n in jm.graph.node]

    x = np.random.default_rng(2).uniform(-1, 1, (64, 1, 9, 9)).astype(np.float32)
    sess = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"])
    _, J = sess.run(None, {"x": x})
    fd, err = Float64Graph(model).fd_jacobian([x.astype(np.float64)])
    J = J.reshape(fd.shape)
    keep = err <= tolerances.CHECK_FD_KINK * max(1.0, float(np.abs(fd).max()))
    assert keep.mean() > 0.95
    assert tolerances.scaled_error(J * keep, fd * keep)[1] <= tolerances.JACOBIAN_F32


@pytest.mark.parametrize("name", ["y", "dy_dx"])
def test_a_value_named_like_a_companion_output_is_refused_with_the_fix(name):
    """build_jacobian_model on a graph that already has a value called "y" or "dy_dx" (the companion graph's own
    outputs) says so and how to fix it, instead of failing onnx.checker with a duplicate name."""
    from nnpartials.errors import ExportError

    model = _mlp("tanh", 3, [4], 1)
    for node in model.graph.node:
        node.output[:] = [name if o == "z0" else o for o in node.output]
        node.input[:] = [name if i == "z0" else i for i in node.input]
    onnx.checker.check_model(model)
    with pytest.raises(ExportError, match=rf"already has a value named '{name}'.*rename it"):
        build_jacobian_model(model, mode="auto")
