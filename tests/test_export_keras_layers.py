"""Keras layers beyond dense networks (convolutions, pooling, attention, recurrent layers, slicing, padding and
cropping, normalization, gelu), each exported through tf2onnx and checked in both Jacobian modes against
TensorFlow's GradientTape on 200 points: max |J - J_tf| <= JACOBIAN_F32 * max(1, max |J_tf|). Also: the clear
refusal of recurrent layers that run as a loop, and the explicit opt-in for .keras files with Lambda layers."""

import json

import pytest

import models
from nnpartials import tolerances
from nnpartials.errors import ExportError
from nnpartials.exporter.keras_export import load_model, to_onnx
from test_export_keras import check_against_tape

N = 200

LAYER_MODELS = {
    "conv1d_globalmaxpool1d": lambda: models.conv1d_model(),
    "conv2d_same_stride1_flatten": lambda: models.conv2d_model(padding="same", strides=1),
    "conv2d_valid_stride1_flatten": lambda: models.conv2d_model(padding="valid", strides=1),
    "conv2d_same_stride2_flatten": lambda: models.conv2d_model(padding="same", strides=2),
    "conv2d_valid_stride2_flatten": lambda: models.conv2d_model(padding="valid", strides=2),
    "maxpool2d_avgpool2d_globalavgpool2d": lambda: models.pooling2d_model(),
    "softmax_classifier": lambda: models.softmax_model(),
    "multi_head_attention_layer_norm": lambda: models.attention_model(),
    "dense_on_rank3_input": lambda: models.dense_rank3_model(),
    "lstm_unrolled": lambda: models.recurrent_model("LSTM"),
    "gru_unrolled": lambda: models.recurrent_model("GRU"),
    "slice_keras_ops": lambda: models.slicing_model(),
    "slice_lambda": lambda: models.slicing_model(use_lambda=True),
    "repeat_vector": lambda: models.repeat_vector_model(),
    "zero_padding1d_cropping1d": lambda: models.padding_cropping_1d_model(),
    "zero_padding2d_cropping2d": lambda: models.padding_cropping_2d_model(),
    "layer_normalization": lambda: models.layer_norm_model(),
    "gelu_exact": lambda: models.gelu_model(approximate=False),
    "gelu_tanh_approximate": lambda: models.gelu_model(approximate=True),
    # neighbours of the above
    "bidirectional_lstm_simplernn_unrolled": lambda: models.bidirectional_model(),
    "cross_attention_two_inputs": lambda: models.cross_attention_model(),
    "causal_self_attention": lambda: models.cross_attention_model(causal=True),
    "pooling1d_upsampling1d": lambda: models.pooling1d_model(),
    "dilated_depthwise_separable_conv2d": lambda: models.conv2d_variants_model(),
    "upsampling2d_conv2d_transpose": lambda: models.upsampling2d_model(),
}


@pytest.mark.parametrize("name", list(LAYER_MODELS))
def test_layer_matches_gradient_tape_in_both_modes(name):
    results = check_against_tape(LAYER_MODELS[name](), n_points=N)
    assert {mode for mode, _ in results} == {"forward", "reverse"}
    assert max(results.values()) <= tolerances.JACOBIAN_F32


def test_run_time_reshape_targets_become_constants():
    """Dense on [batch, 3, 4] and MultiHeadAttention: tf2onnx computes reshape targets from Shape at run time; the
    exported graph has constant targets instead, static sizes after the batch axis, and no shape arithmetic."""
    for build, out_dims in ((models.dense_rank3_model, [3, 2]), (models.attention_model, [3])):
        fwd = to_onnx(load_model(build()))
        ops = {n.op_type for n in fwd.graph.node}
        assert not ops & {"Shape", "Gather", "ReduceProd", "Concat"}, ops
        dims = fwd.graph.output[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == out_dims


def test_whole_time_reversal_becomes_a_slice():
    """The backward half of a Bidirectional layer reverses time with a ReverseSequence whose lengths tf2onnx computes
    from Shape: exported as a Slice with step -1."""
    fwd = to_onnx(load_model(models.bidirectional_model()))
    ops = [n.op_type for n in fwd.graph.node]
    assert "ReverseSequence" not in ops and "Slice" in ops


def test_export_writes_bundle_for_rank4_input(tmp_path):
    """nnpartials.export on a Conv2D model (input [batch, 6, 6, 2]): validated at export, servable."""
    import nnpartials

    b = nnpartials.export(models.pooling2d_model(), tmp_path / "b", n_validation=N)
    with open(tmp_path / "b" / "validation.json") as f:
        v = json.load(f)
    assert v["passed"] and v["points"] == N and v["max_rel"] <= tolerances.EXPORT_VALIDATION
    assert b.manifest["inputs"][0]["tensor_shape"] == ["batch", 6, 6, 2]
    assert b.n_in == 72 and b.n_out == 2


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "SimpleRNN"])
def test_recurrent_layer_without_unroll_is_a_clear_error(kind):
    m = models.recurrent_model(kind, unroll=False)
    with pytest.raises(ExportError, match="unroll=True") as err:
        to_onnx(load_model(m))
    assert f"{kind.lower()}_layer" in str(err.value) and kind in str(err.value)


def test_loop_ops_without_keras_layers_are_a_clear_error():
    """A traced function without its Keras model (as from a SavedModel): the TensorList ops tf2onnx leaves are
    recognised after conversion."""
    traced = load_model(models.recurrent_model("GRU", unroll=False))
    traced.keras_model = None
    with pytest.raises(ExportError, match="TensorList.*unroll=True"):
        to_onnx(traced)


def test_bidirectional_recurrent_layer_without_unroll_is_named(tmp_path):
    import keras

    import nnpartials

    keras.utils.set_random_seed(0)
    inp = keras.Input((3, 2), name="x")
    h = keras.layers.Bidirectional(keras.layers.GRU(3, name="inner_gru"))(inp)
    m = keras.Model(inp, keras.layers.Dense(1)(h))
    with pytest.raises(ExportError, match="unroll=True") as err:
        nnpartials.export(m, tmp_path / "b", n_validation=N)
    assert "GRU" in str(err.value)
    assert not (tmp_path / "b").exists()


def _lambda_file(tmp_path):
    path = tmp_path / "with_lambda.keras"
    models.slicing_model(use_lambda=True).save(path)
    return path


def test_keras_file_with_lambda_needs_explicit_opt_in(tmp_path):
    import nnpartials

    path = _lambda_file(tmp_path)
    with pytest.raises(ExportError) as err:
        nnpartials.export(path, tmp_path / "refused", n_validation=N)
    msg = str(err.value)
    assert "Lambda" in msg and "run" in msg  # why: loading runs code stored in the file
    assert "allow_unsafe_deserialization=True" in msg and "--allow-lambda" in msg
    assert not (tmp_path / "refused").exists()
    b = nnpartials.export(path, tmp_path / "ok", n_validation=N, allow_unsafe_deserialization=True)
    assert b.manifest["validation"]["passed"] and b.n_in == 5 and b.n_out == 2


def test_cli_allow_lambda_flag(tmp_path, capsys):
    from nnpartials.cli import main

    path = _lambda_file(tmp_path)
    assert main(["export", str(path), "-o", str(tmp_path / "refused"), "--n-points", str(N)]) == 1
    err = capsys.readouterr().err
    assert "--allow-lambda" in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists()
    assert main(["export", str(path), "-o", str(tmp_path / "ok"), "--n-points", str(N), "--allow-lambda"]) == 0
    assert (tmp_path / "ok" / "model.jac.onnx").exists()


def test_cli_help_says_allow_lambda_runs_code(capsys):
    from nnpartials.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--allow-lambda" in out and "RUNS the Python code stored in the file" in out

