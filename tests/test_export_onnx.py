"""ONNX files from any exporter go through the same derivative engine: graphs written with onnx.helper at opsets
11, 13, 17 and 20, a float64 model, a convolutional network, fixed batch sizes, reserved output names, and the
refusals. References are independent of the code under test: analytic Jacobians of the MLPs (numpy, float64),
and float64 central differences of the forward graph for the CNN."""

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import nnpartials
from nnpartials import tolerances
from nnpartials.cli import main
from nnpartials.errors import ExportError, UnsupportedOpError

N_POINTS = 200
RNG = np.random.default_rng(7)
ERF = np.vectorize(math.erf)


def _mlp(opset, act="Tanh", n_in=3, hidden=8, n_out=2, gemm=False, batch="batch", out_name="out",
         dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(n_in, hidden)) / np.sqrt(n_in), rng.normal(size=hidden) * 0.3
    w2, b2 = rng.normal(size=(hidden, n_out)) / np.sqrt(hidden), rng.normal(size=n_out) * 0.3
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(np.asarray(v, dtype), k) for k, v in
             {"w1": w1.T if gemm else w1, "b1": b1, "w2": w2.T if gemm else w2, "b2": b2}.items()]
    if gemm:  # PyTorch's Linear: Gemm with transB
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1)]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["hm"]), helper.make_node("Add", ["hm", "b1"], ["h"])]
    nodes.append(helper.make_node(act, ["h"], ["a"]))
    if gemm:
        nodes.append(helper.make_node("Gemm", ["a", "w2", "b2"], [out_name], transB=1))
    else:
        nodes += [helper.make_node("MatMul", ["a", "w2"], ["om"]), helper.make_node("Add", ["om", "b2"], [out_name])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", et, [batch, n_in])],
                          [helper.make_tensor_value_info(out_name, et, [batch, n_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx.helper")
    m.ir_version = 7 if opset < 15 else 8 if opset < 20 else 9
    return m, (w1, b1, w2, b2)


def _mlp_jacobian(params, act, x):
    """Analytic dy/dx = W2^T diag(act'(h)) W1^T per point, float64."""
    w1, b1, w2, b2 = params
    h = np.asarray(x, np.float64) @ w1 + b1
    if act == "Tanh":
        d = 1 - np.tanh(h) ** 2
    elif act == "Gelu":
        d = 0.5 * (1 + ERF(h / math.sqrt(2))) + h * np.exp(-h * h / 2) / math.sqrt(2 * math.pi)
    elif act == "Sigmoid":
        s = 1 / (1 + np.exp(-h))
        d = s * (1 - s)
    else:
        raise ValueError(act)
    return np.einsum("ih,bh,ho->boi", w1, d, w2)


def _check(bundle, params, act, n_in=3, atol_scale=tolerances.JACOBIAN_F32):
    p = nnpartials.Partials(bundle)
    x = RNG.uniform(-2, 2, (N_POINTS, n_in)).astype(p.dtype)
    _, J = p.jacobian(x)
    J_ref = _mlp_jacobian(params, act, x)
    _, rel, _ = tolerances.scaled_error(J, J_ref)
    assert rel <= atol_scale, rel
    return p


@pytest.mark.parametrize("opset,act", [(11, "Tanh"), (13, "Sigmoid"), (17, "Tanh"), (20, "Gelu")])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_helper_mlp_any_opset(tmp_path, opset, act, mode):
    m, params = _mlp(opset, act)
    b = nnpartials.export(m, tmp_path / "b", mode=mode, n_validation=250)
    man = b.manifest
    assert man["source"]["kind"] == "onnx" and man["jacobian"]["mode"] == mode
    assert man["validation"]["passed"] and man["validation"]["points"] == 250
    assert "float64 central differences" in man["validation"]["reference"]
    if opset < 13:
        assert man["source"]["upgraded_from_opset"] == opset and man["opset"] == 13
    jac = onnx.load_model_from_string(b.read("model.jac.onnx"))
    onnx.checker.check_model(jac, full_check=True)
    _check(b, params, act)


def test_pytorch_style_gemm_mlp_gets_the_c_core(tmp_path):
    """Gemm with transB (PyTorch's Linear) lowers to model.nnp: the C core, the embedded path and `check`."""
    m, params = _mlp(17, "Tanh", gemm=True)
    b = nnpartials.export(m, tmp_path / "b")
    assert b.manifest["c_core"]["available"], b.manifest["c_core"]["reason"]
    assert b.manifest["c_core"]["validation"]["passed"]
    x = RNG.uniform(-2, 2, (N_POINTS, 3)).astype(np.float32)
    _, J = nnpartials.Kernel(b).jacobian(x)
    assert tolerances.scaled_error(J, _mlp_jacobian(params, "Tanh", x))[1] <= tolerances.JACOBIAN_F32
    assert main(["check", str(b.path), "--n-points", "100"]) == 0


def test_onnx_file_through_the_cli_with_reserved_output_name_and_fixed_batch(tmp_path):
    """An .onnx path on the command line; the output named "y" is renamed; a batch fixed at 1 becomes symbolic."""
    m, params = _mlp(17, "Tanh", batch=1, out_name="y")
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    assert main(["export", str(path), "-o", str(tmp_path / "b"), "--n-points", "200"]) == 0
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert man["outputs"][0]["name"] == "out_y" and man["source"]["renamed_outputs"] == {"y": "out_y"}
    _check(str(tmp_path / "b"), params, "Tanh")


def test_float64_model_is_served_in_float64(tmp_path):
    m, params = _mlp(17, "Tanh", dtype=np.float64)
    b = nnpartials.export(m, tmp_path / "b")
    assert b.manifest["inputs"][0]["dtype"] == "float64" and not b.manifest["c_core"]["available"]
    assert "float64" in b.manifest["c_core"]["reason"]
    p = nnpartials.Partials(b)
    x = RNG.uniform(-2, 2, (N_POINTS, 3))
    y, J = p.jacobian(x)
    assert y.dtype == J.dtype == np.float64
    np.testing.assert_allclose(J, _mlp_jacobian(params, "Tanh", x), rtol=1e-12, atol=1e-13)


def _cnn(seed=0):
    """[batch, 1, 8, 8] -> Conv 4x3x3 (pad 1) -> Relu -> MaxPool 2x2 -> Flatten -> Gemm 64->10 -> Softmax."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32) * 0.5, "wc"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32) * 0.1, "bc"),
             numpy_helper.from_array(rng.normal(size=(10, 64)).astype(np.float32) * 0.2, "wd"),
             numpy_helper.from_array(rng.normal(size=10).astype(np.float32) * 0.1, "bd")]
    nodes = [helper.make_node("Conv", ["x", "wc", "bc"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "wd", "bd"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_cnn_with_image_input_and_shaped_results(tmp_path):
    from nnpartials.onnx_reference import Float64Graph

    m = _cnn()
    b = nnpartials.export(m, tmp_path / "cnn", n_validation=N_POINTS)
    man = b.manifest
    assert man["inputs"][0]["shape"] == ["batch", 64] and man["inputs"][0]["tensor_shape"] == ["batch", 1, 8, 8]
    assert not man["c_core"]["available"] and man["c_core"]["reason"]
    p = nnpartials.Partials(b)
    x = RNG.uniform(-1, 1, (N_POINTS, 1, 8, 8)).astype(np.float32)
    y, J = p.jacobian(x)                      # given in the input's own shape
    assert y.shape == (N_POINTS, 10) and J.shape == (N_POINTS, 10, 64)
    ys, Js = p.jacobian(x, shaped=True)
    assert ys.shape == (N_POINTS, 10) and Js.shape == (N_POINTS, 10, 1, 8, 8)
    np.testing.assert_array_equal(Js.reshape(N_POINTS, 10, 64), J)
    np.testing.assert_array_equal(p.jacobian(x.reshape(N_POINTS, 64))[1], J)  # flattened features, same result
    fd, err = Float64Graph(m).fd_jacobian([x.astype(np.float64)])
    keep = err <= tolerances.CHECK_FD_KINK * max(1.0, float(np.abs(fd).max()))
    assert keep.mean() > 0.95
    _, rel, _ = tolerances.scaled_error(J * keep, fd * keep)
    assert rel <= tolerances.JACOBIAN_F32
    np.testing.assert_allclose(J.sum(axis=1), 0.0, atol=1e-6)  # softmax outputs sum to 1: derivatives sum to 0


def _if_model():
    """out = If(c > 0) then x * 2 else x * 3 (c a constant): both branches read x from the outer graph."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    three = helper.make_tensor("three", TensorProto.FLOAT, [], [3.0])
    then_g = helper.make_graph([helper.make_node("Constant", [], ["c2"], value=two),
                                helper.make_node("Mul", ["x", "c2"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 3])])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["c3"], value=three),
                                helper.make_node("Mul", ["x", "c3"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", 3])])
    nodes = [helper.make_node("Greater", ["c", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g, name="branch")]
    g = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
                          [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                           numpy_helper.from_array(np.array(1.0, np.float32), "c")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_refusals_name_the_node(tmp_path):
    # control flow whose body reads an input-dependent tensor (before: an all-zero Jacobian)
    with pytest.raises(UnsupportedOpError, match="'branch'.*reads the input-dependent tensor 'x'"):
        nnpartials.export(_if_model(), tmp_path / "if")
    # a graph that mixes the points of a batch
    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
                           helper.make_node("Sub", ["x", "m"], ["out"])], "mix",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(ExportError, match="mixes the points"):
        nnpartials.export(m, tmp_path / "mix")
    # an op without a rule
    g = helper.make_graph([helper.make_node("CumSum", ["x", "ax"], ["out"], name="cs")], "cs",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
                          [numpy_helper.from_array(np.array(1, np.int64), "ax")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(UnsupportedOpError, match="no derivative rule for ONNX op 'CumSum' \\(node 'cs'\\)"):
        nnpartials.export(m, tmp_path / "cs")
    # opset older than 9, external data
    old, _ = _mlp(17)
    old.opset_import[0].version = 8
    with pytest.raises(ExportError, match="opset 8"):
        nnpartials.export(old, tmp_path / "old")
    ext, _ = _mlp(17)
    t = ext.graph.initializer[0]
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="weights.bin")
    with pytest.raises(ExportError, match="external data"):
        nnpartials.export(ext, tmp_path / "ext")
    assert not any(p.exists() for p in (tmp_path / "if", tmp_path / "mix", tmp_path / "cs", tmp_path / "old",
                                         tmp_path / "ext"))


def test_validation_runs_in_chunks_that_fit_memory(tmp_path, monkeypatch):
    """Forward mode on a CNN: the companion graph's derivative tensors are [784, batch, ...]; validation splits the
    points so the largest stays within VALIDATION_CHUNK_BYTES (here made small to force several calls)."""
    import onnxruntime as ort

    from nnpartials.exporter import bundle as writer

    monkeypatch.setattr(writer, "VALIDATION_CHUNK_BYTES", 1024 * 1024)
    calls = []
    real_run = ort.InferenceSession.run

    def counting_run(self, names, feeds, *a, **k):
        calls.append(next(iter(feeds.values())).shape[0])
        return real_run(self, names, feeds, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "run", counting_run)
    b = nnpartials.export(_cnn(), tmp_path / "cnn", mode="forward", n_validation=60)
    assert b.manifest["validation"]["passed"] and b.manifest["validation"]["points"] == 60
    jac = onnx.load_model_from_string(b.read("model.jac.onnx"))
    rows = writer.validation_rows(jac)
    assert 1 <= rows < 60 and max(calls) <= 60  # the validation calls held at most `rows` points each
    assert sum(1 for c in calls if c == rows) >= 60 // rows
    assert "conv" in b.manifest["c_core"]["reason"].lower()  # the reason names the layers, not the input rank
