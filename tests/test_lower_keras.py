"""Keras -> ONNX -> C weight file -> C core, against independent references: onnxruntime on the forward graph,
TensorFlow's GradientTape for the Jacobian, and the C core's own float64 finite differences for the analytic
Jacobian. Also: what lowers, what does not, and why."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import models  # noqa: E402  (tests/models.py)
from models import kink_distance  # noqa: E402

from nnpartials import tolerances  # noqa: E402
from nnpartials.errors import NotLowerableError  # noqa: E402

import keras  # noqa: E402  (hard dependencies: a missing one fails, never skips)
import onnxruntime as ort  # noqa: E402

import nnpartials._core  # noqa: E402,F401

from nnpartials.exporter.keras_export import keras_to_onnx, load_model  # noqa: E402
from nnpartials.exporter.lower import lower_layers, lower_onnx  # noqa: E402
from nnpartials.exporter.nnp import read_nnp  # noqa: E402
from nnpartials.exporter.reference import tf_jacobian  # noqa: E402
from nnpartials.runtime.kernel import Kernel  # noqa: E402

N_POINTS = 1000
SMOOTH = {"linear", "elu", "selu", "tanh", "sigmoid", "softplus", "softsign", "swish", "silu", "gelu", "gelu_tanh",
          "exponential"}
EXPECTED_CODE = {"silu": "swish", "hard_sigmoid": "relu6"}  # what the lowering maps them to


def ort_forward(model, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    return np.concatenate([o.reshape(x.shape[0], -1) for o in outs], axis=1)


def tape_jacobian(keras_model, x):
    y, js = tf_jacobian(load_model(keras_model), [x])
    return y, js[0]


def sample(n_in, n=N_POINTS, seed=0):
    # the models normalize with statistics of N(1, 2) data
    return np.random.default_rng(seed).normal(1.0, 2.0, (n, n_in)).astype(np.float32)


@pytest.fixture(scope="module", params=models.ACTIVATIONS)
def lowered(request):
    act = request.param
    m = models.dense_model(act, seed=3)
    onnx_model = keras_to_onnx(m)
    data = lower_onnx(onnx_model)
    return act, m, onnx_model, data


def test_lowered_activation_code(lowered):
    act, _, _, data = lowered
    layers = read_nnp(data)
    if act == "linear":  # a purely affine network folds into one layer
        assert [L.activation for L in layers] == ["linear"]
        return
    want = EXPECTED_CODE.get(act, act)
    hidden = {L.activation for L in layers[:-1]}
    assert hidden == {want}, hidden
    assert layers[-1].activation == "linear"


def test_forward_matches_onnxruntime(lowered):
    act, _, onnx_model, data = lowered
    k = Kernel(data)
    x = sample(k.n_in)
    y_ref = ort_forward(onnx_model, x)
    y = k.forward(x)
    max_abs, rel, scale = tolerances.scaled_error(y, y_ref)
    assert rel <= tolerances.FORWARD_F32, f"{act}: |dy| {max_abs:.3g} (scale {scale:.3g})"


def test_jacobian_matches_gradient_tape(lowered):
    act, m, _, data = lowered
    k = Kernel(data)
    x = sample(k.n_in, seed=1)
    y_ref, J_ref = tape_jacobian(m, x)
    for mode in ("auto", "forward", "reverse"):
        y, J = k.jacobian(x, mode=mode)
        assert tolerances.scaled_error(y, y_ref)[1] <= tolerances.FORWARD_F32
        max_abs, rel, scale = tolerances.scaled_error(J, J_ref)
        assert rel <= tolerances.JACOBIAN_F32, f"{act} {mode}: |dJ| {max_abs:.3g} (scale {scale:.3g})"


def test_fd_float64_matches_analytic(lowered):
    act, _, _, data = lowered
    k = Kernel(data)
    x = sample(k.n_in, n=300, seed=2)
    if act not in SMOOTH:  # piecewise: keep points whose pre-activations are away from every kink
        x = x[kink_distance(read_nnp(data), x) > 1e-3]
        assert len(x) > 100
    fd, err = k.fd_jacobian(x)
    _, J = k.jacobian(x)
    max_abs, rel, scale = tolerances.scaled_error(fd, J)
    assert rel <= tolerances.FD_F64_REL, f"{act}: |fd - J| {max_abs:.3g} (scale {scale:.3g})"
    assert float(np.max(err)) < tolerances.FD_F64_REL * scale


def _unit_model(act_layer):
    """x -> Dense(1, w=1, b=0) -> activation: the pre-activation equals x."""
    inp = keras.Input((1,), name="x")
    d = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")
    out = act_layer(d(inp)) if not isinstance(act_layer, str) else keras.layers.Activation(act_layer)(d(inp))
    return keras.Model(inp, out)


@pytest.mark.parametrize("act,points", [
    ("relu", [0.0]), ("leaky_relu", [0.0]), ("elu", [0.0]), ("selu", [0.0]), ("relu6", [0.0, 6.0]),
    ("hard_sigmoid", [-3.0, 3.0]),
])
def test_kinks_agree_with_gradient_tape(act, points):
    m = _unit_model(act)
    k = Kernel(lower_onnx(keras_to_onnx(m)))
    x = np.array(points, np.float32).reshape(-1, 1)
    _, J_ref = tape_jacobian(m, x)
    for mode in ("forward", "reverse"):
        _, J = k.jacobian(x, mode=mode)
        np.testing.assert_allclose(J, J_ref, rtol=1e-6, atol=1e-7, err_msg=f"{act} {mode}")


def test_layers_fold_normalization_batchnorm_dropout():
    keras.utils.set_random_seed(5)
    inp = keras.Input((4,), name="x")
    norm = keras.layers.Normalization()
    norm.adapt(np.random.default_rng(0).normal(3.0, 0.5, (200, 4)))
    h = keras.layers.Dense(12)(norm(inp))
    bn = keras.layers.BatchNormalization()
    h = keras.layers.Activation("tanh")(bn(h))
    h = keras.layers.Dropout(0.3)(h)
    h = keras.layers.LeakyReLU(negative_slope=0.15)(keras.layers.Dense(10)(h))
    h = keras.layers.ELU(alpha=0.5)(keras.layers.Dense(10)(h))
    h = keras.layers.ReLU(max_value=6.0)(keras.layers.Dense(9)(h))
    bn2 = keras.layers.BatchNormalization()
    out = keras.layers.Dense(2)(bn2(h))
    m = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    for layer in (bn, bn2):
        g, b, mu, var = layer.get_weights()
        layer.set_weights([rng.uniform(0.5, 2, g.shape), rng.normal(size=b.shape), rng.normal(size=mu.shape),
                           rng.uniform(0.5, 2, var.shape)])
    onnx_model = keras_to_onnx(m)
    data = lower_onnx(onnx_model)
    layers = read_nnp(data)
    assert [L.activation for L in layers] == ["tanh", "leaky_relu", "elu", "relu6", "linear"]
    assert layers[1].p0 == pytest.approx(0.15) and layers[2].p0 == pytest.approx(0.5)
    k = Kernel(data)
    x = np.random.default_rng(2).normal(3.0, 0.5, (N_POINTS, 4)).astype(np.float32)
    assert tolerances.scaled_error(k.forward(x), ort_forward(onnx_model, x))[1] <= tolerances.FORWARD_F32
    _, J_ref = tape_jacobian(m, x)
    assert tolerances.scaled_error(k.jacobian(x)[1], J_ref)[1] <= tolerances.JACOBIAN_F32


def test_several_heads_on_one_layer_are_concatenated():
    keras.utils.set_random_seed(6)
    inp = keras.Input((3,), name="x")
    h = keras.layers.Dense(8, activation="tanh", bias_initializer="random_normal")(inp)
    m = keras.Model(inp, [keras.layers.Dense(2)(h), keras.layers.Dense(1)(h)])
    onnx_model = keras_to_onnx(m)
    k = Kernel(lower_onnx(onnx_model))
    assert k.n_out == 3
    x = sample(3)
    assert tolerances.scaled_error(k.forward(x), ort_forward(onnx_model, x))[1] <= tolerances.FORWARD_F32
    _, J_ref = tape_jacobian(m, x)
    assert tolerances.scaled_error(k.jacobian(x)[1], J_ref)[1] <= tolerances.JACOBIAN_F32


def test_seed_network_lowers_to_eight_layers():
    m = models.seed_model()
    layers, n_in = lower_layers(keras_to_onnx(m))
    assert n_in == 2
    assert [L.W.shape for L in layers] == [(2, 64), (64, 64), (64, 32), (32, 32), (32, 16), (16, 16), (16, 8),
                                           (8, 1)]
    assert [L.activation for L in layers] == ["leaky_relu"] * 7 + ["linear"]


@pytest.mark.parametrize("build,reason", [
    (lambda: models.multi_input_model(), "inputs"),
    (lambda: models.residual_model(), "skip/residual"),
    (lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="softmax"),
                               keras.layers.Dense(1)]), "Softmax"),
    (lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="mish"), keras.layers.Dense(1)]),
     "not an activation the C core knows"),
    (lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                               keras.layers.PReLU(alpha_initializer=keras.initializers.RandomUniform(0.05, 0.3)),
                               keras.layers.Dense(1)]), "differs between units"),
    (lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.LayerNormalization(),
                               keras.layers.Dense(1)]), "not"),
    (lambda: models.layers_model(), "not"),
], ids=["two-inputs", "residual", "softmax", "mish", "prelu", "layernorm", "relu-max4-leaky"])
def test_not_lowerable_with_reason(build, reason):
    keras.utils.set_random_seed(0)
    with pytest.raises(NotLowerableError, match="not in the C-core subset") as ei:
        lower_onnx(keras_to_onnx(build()))
    assert reason in str(ei.value)


def test_lower_rejects_non_models():
    with pytest.raises(TypeError):
        lower_onnx(b"not a model")


def test_prelu_with_one_slope_is_refused_at_its_kink():
    """Keras's PReLU with the same slope in every unit has the values of leaky_relu(a), but tf2onnx writes it as
    relu(x) - a * relu(-x), whose derivative at 0 is 0 (GradientTape's, and the companion graph's) where
    leaky_relu(a) has a: the lowering refuses it rather than give another number there."""
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                          keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.2)),
                          keras.layers.Dense(1)])
    with pytest.raises(NotLowerableError, match="not in the C-core subset") as ei:
        lower_onnx(keras_to_onnx(m))
    msg = str(ei.value)
    assert "kink" in msg and "leaky_relu(alpha=0.2)" in msg and "slope 0 at" in msg, msg


def test_maximum_with_zero_keeps_the_c_core_with_its_tie():
    """keras.ops.maximum(x, 0) is 1 at 0 (the tie goes to x), relu 0: it lowers to selu(alpha=0, scale=1), the
    values of relu with slope 1 at 0, and the C core agrees with GradientTape exactly at the kink."""
    inp = keras.Input((2,), name="x")
    h = keras.layers.Dense(2, activation=lambda t: keras.ops.maximum(t, 0.0), kernel_initializer="identity")(inp)
    m = keras.Model(inp, keras.layers.Dense(1, kernel_initializer="ones")(h))
    data = lower_onnx(keras_to_onnx(m))
    assert [(L.activation, L.p0, L.p1) for L in read_nnp(data)] == [("selu", 0.0, 1.0), ("linear", 0.0, 0.0)]
    x = np.array([[0.0, 0.0], [0.0, -1.0], [1.0, 0.0]], np.float32)
    _, J_ref = tape_jacobian(m, x)
    for mode in ("forward", "reverse"):
        _, J = Kernel(data).jacobian(x, mode=mode)
        np.testing.assert_allclose(J, J_ref, rtol=1e-6, atol=1e-7, err_msg=mode)
