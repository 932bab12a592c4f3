"""Keras -> ONNX -> companion Jacobian graph, checked against TensorFlow's GradientTape on 1,000 points per
model, in both modes: max |J - J_tf| <= JACOBIAN_F32 * max(1, max |J_tf|)."""

import numpy as np
import onnxruntime as ort
import pytest

import models
from nnpartials import tolerances
from nnpartials.exporter.jacobian import build_jacobian_model
from nnpartials.exporter.keras_export import load_model, to_onnx
from nnpartials.exporter.reference import tf_jacobian

N_POINTS = 1000


def check_against_tape(keras_model, low=-3.0, high=3.0, seed=0, n_points=N_POINTS):
    """Both modes against GradientTape on ``n_points`` uniform points; inputs of any rank ([B, *shape])."""
    traced = load_model(keras_model)
    fwd = to_onnx(traced)
    # exactly the model's inputs: no frozen statistic became a graph input
    assert [i.name for i in fwd.graph.input] == traced.input_names
    assert len(fwd.graph.input) == len(keras_model.inputs)
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(low, high, size=(n_points, *s)).astype(np.float32) for s in traced.input_shapes]
    y_ref, j_ref = tf_jacobian(traced, xs)
    results = {}
    for mode in ("forward", "reverse"):
        jm, info = build_jacobian_model(fwd, mode=mode)
        sess = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(None, dict(zip(traced.input_names, xs)))
        _, yrel, _ = tolerances.scaled_error(outs[0], y_ref)
        assert yrel <= tolerances.FORWARD_F32, f"{mode}: y differs from Keras by {yrel:.3g}"
        for name, j, jr in zip(traced.input_names, outs[1:], j_ref):
            assert j.shape == jr.shape == (n_points, info["n_out"], jr.shape[2])
            _, rel, _ = tolerances.scaled_error(j, jr)
            assert rel <= tolerances.JACOBIAN_F32, f"{mode} mode, input {name}: max scaled error {rel:.3g}"
            results[(mode, name)] = rel
    return results


@pytest.mark.parametrize("act", models.ACTIVATIONS)
def test_dense_activation_matches_gradient_tape(act):
    check_against_tape(models.dense_model(act))


def test_seed_network_matches_gradient_tape():
    check_against_tape(models.seed_model(), low=0.0, high=6 * np.pi * 1.5)


def test_layers_batchnorm_dropout_prelu_match_gradient_tape():
    check_against_tape(models.layers_model())


def test_multi_input_concat_residual_multi_output_match_gradient_tape():
    check_against_tape(models.multi_input_model())


def test_residual_add_matches_gradient_tape():
    check_against_tape(models.residual_model())


def test_normalization_statistics_are_constants_not_inputs():
    """The known tf2onnx trap: captured Normalization mean/variance must not become graph inputs."""
    m = models.dense_model("tanh", n_in=3)
    fwd = to_onnx(load_model(m))
    assert [i.name for i in fwd.graph.input] == ["x"]
    dims = fwd.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 3
    assert {n.op_type for n in fwd.graph.node} >= {"MatMul"}
    assert not any(n.op_type == "Erfc" for n in fwd.graph.node)


def test_gelu_erfc_is_legalized():
    fwd = to_onnx(load_model(models.dense_model("gelu")))
    ops = {n.op_type for n in fwd.graph.node}
    assert "Erfc" not in ops and "Erf" in ops


def test_auto_mode_picks_cheaper_side():
    fwd = to_onnx(load_model(models.dense_model("tanh", n_in=5, n_out=1)))
    assert build_jacobian_model(fwd)[1]["mode"] == "reverse"
    fwd = to_onnx(load_model(models.dense_model("tanh", n_in=2, n_out=4)))
    assert build_jacobian_model(fwd)[1]["mode"] == "forward"


def test_c_core_jacobian_is_validated_at_export(tmp_path):
    """The C core's Jacobian, both modes, is compared with GradientTape on the validation points at export."""
    import json

    import nnpartials
    from nnpartials import ccore

    b = nnpartials.export(models.dense_model("tanh"), tmp_path / "ok", n_validation=200)
    with open(tmp_path / "ok" / "validation.json") as f:
        v = json.load(f)
    assert v["c_core"]["points"] == 200 and v["c_core"]["passed"]
    for mode in ("forward", "reverse"):
        assert v["c_core"][mode]["jacobian"]["max_rel"] <= tolerances.EXPORT_VALIDATION
    assert b.manifest["c_core"]["validation"]["passed"] is True


def test_wrong_c_core_jacobian_fails_export(tmp_path, monkeypatch):
    """A C Jacobian that is off in one entry (forward values right) makes export fail and write nothing."""
    import nnpartials
    from nnpartials import ccore
    from nnpartials.errors import ValidationError

    real = ccore.jacobian

    def off_by_a_little(nnp_bytes, x, mode=0):
        y, J = real(nnp_bytes, x, mode)
        J[7, 0, 1] += 1e-3 * max(1.0, float(np.abs(J).max()))
        return y, J

    monkeypatch.setattr(ccore, "jacobian", off_by_a_little)
    with pytest.raises(ValidationError, match="C core"):
        nnpartials.export(models.dense_model("tanh"), tmp_path / "bad", n_validation=50)
    assert not (tmp_path / "bad").exists()
    assert not any(p.name.startswith(".nnp-export") for p in tmp_path.iterdir())


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_validation_count_is_a_clear_error(tmp_path, n):
    import nnpartials
    from nnpartials.errors import ExportError

    with pytest.raises(ExportError, match="n_validation must be a positive integer"):
        nnpartials.export(models.dense_model("tanh"), tmp_path / "b", n_validation=n)
    assert not (tmp_path / "b").exists()
