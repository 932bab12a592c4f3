"""Second derivatives of the C core through Kernel: hessian, laplacian, hvp (float32, analytic) and fd_hessian (float64
finite differences), against references that do not use the code under test:

* float64 central differences of an analytic float64 Jacobian written here in numpy (forward mode, its own
  activation derivatives);
* TensorFlow's nested GradientTape in float64 on the same layers written with TensorFlow/Keras ops, and in float32
  on Keras models lowered to model.nnp by the exporter (as tests/test_lower_keras.py does for the Jacobian);
* for each activation's second derivative alone, float64 central differences of its first derivative.

The Laplacian is checked against the trace of the reference Hessian and Hessian-vector products against the
reference Hessian times v. Also: kink conventions, piecewise-linear networks (exactly 0), both Hessian routes of the C
core (forward over forward when n_out >= n_in (n_in + 1) / 2, forward then reverse otherwise), batch 0 and 1, thread
splits, and input validation."""

import math
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from nnpartials import tolerances  # noqa: E402
from nnpartials.errors import InputError, InputTypeError, NNPartialsError  # noqa: E402
from nnpartials.exporter.nnp import SELU_ALPHA, SELU_SCALE, Layer, activation_ref, forward_ref, write_nnp  # noqa: E402

import keras  # noqa: E402  (hard dependencies: a missing one fails, never skips)
import tensorflow as tf  # noqa: E402

import nnpartials._core  # noqa: E402,F401  (built by pip install: a missing build fails, never skips)
import nnpartials.runtime.kernel as kernel_mod  # noqa: E402

Kernel = kernel_mod.Kernel

#: float32 second derivatives against a float64 reference: |a - b| <= SECOND_F32 * max(1, max|b|)
SECOND_F32 = tolerances.SECOND_ORDER_F32
#: float32 second derivatives of the C core against TensorFlow's float32 nested GradientTape on a lowered Keras model
#: (both sides round in float32; twice the tolerance of either against an exact reference)
SECOND_F32_TAPE = 2 * tolerances.SECOND_ORDER_F32
#: the numpy reference (float64 central differences of a float64 Jacobian, step H_REF) is good to ~1e-9 here
H_REF = 1e-5
#: points per model (the brief asks for at least 200)
N_POINTS = 240

PARAMS = {"leaky_relu": (0.2, 0.0), "elu": (0.7, 0.0), "selu": (SELU_ALPHA, SELU_SCALE), "hard_sigmoid": (1 / 6, 0.5)}
SMOOTH = ["elu", "selu", "tanh", "sigmoid", "softplus", "softsign", "swish", "gelu", "gelu_tanh", "exponential"]
PIECEWISE = ["linear", "relu", "leaky_relu", "hard_sigmoid", "relu6"]
ALL = SMOOTH + PIECEWISE


def test_every_activation_code_is_covered():
    from nnpartials import ccore

    assert sorted(ALL) == sorted(ccore.ACTIVATIONS)


# ----- models and points ------------------------------------------------------------------------------------------
def make_layers(acts, n_in=3, widths=(9, 7), n_out=2, seed=0, out_act="linear"):
    """Dense layers n_in -> widths -> n_out; hidden activation acts (a name, or one per hidden layer)."""
    rng = np.random.default_rng(seed)
    dims = [n_in, *widths, n_out]
    if isinstance(acts, str):
        acts = [acts] * len(widths)
    names = list(acts) + [out_act]
    layers = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        p0, p1 = (float(np.float32(p)) for p in PARAMS.get(names[k], (0.0, 0.0)))  # as stored in the file
        layers.append(Layer(rng.uniform(-1, 1, (a, b)) / np.sqrt(a) * 1.5, rng.uniform(-0.3, 0.3, b), names[k], p0, p1))
    return layers


def points(n, n_in=3, seed=1, scale=2.0):
    return np.random.default_rng(seed).uniform(-scale, scale, (n, n_in)).astype(np.float32)


def scale_for(act):
    return 1.0 if act == "exponential" else 2.0


# ----- independent references -------------------------------------------------------------------------------------
_erf = np.vectorize(math.erf, otypes=[np.float64])


def dact(name, z, p0=0.0, p1=0.0):
    """float64 first derivative of an activation, with TensorFlow's values at the kinks."""
    z = np.asarray(z, np.float64)
    if name == "linear":
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, p0)
    if name == "elu":
        return np.where(z > 0, 1.0, p0 * np.exp(np.minimum(z, 0.0)))
    if name == "selu":
        return np.where(z >= 0, p1, p1 * p0 * np.exp(np.minimum(z, 0.0)))
    if name == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if name == "sigmoid":
        s = 0.5 * (1.0 + np.tanh(0.5 * z))
        return s * (1.0 - s)
    if name == "hard_sigmoid":
        t = p0 * z + p1
        return np.where((t > 0) & (t < 1), p0, 0.0)
    if name == "softplus":
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    if name == "softsign":
        return 1.0 / (1.0 + np.abs(z)) ** 2
    if name == "swish":
        s = 0.5 * (1.0 + np.tanh(0.5 * z))
        return s + z * s * (1.0 - s)
    if name == "gelu":
        return 0.5 * (1.0 + _erf(z / np.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)
    if name == "gelu_tanh":
        c = np.sqrt(2.0 / np.pi)
        t = np.tanh(c * (z + 0.044715 * z ** 3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z)
    if name == "relu6":
        return ((z > 0) & (z < 6)).astype(np.float64)
    if name == "exponential":
        return np.exp(z)
    raise ValueError(name)


def jacobian_ref(layers, x):
    """float64 (y [B, n_out], J [B, n_out, n_in]): forward mode with the derivatives above."""
    a = np.asarray(x, np.float64)
    T = np.broadcast_to(np.eye(a.shape[1]), (a.shape[0], a.shape[1], a.shape[1])).copy()  # [B, direction, unit]
    for L in layers:
        W = L.W.astype(np.float64)
        z = a @ W + L.b.astype(np.float64)
        T = (T @ W) * dact(L.activation, z, L.p0, L.p1)[:, None, :]
        a = activation_ref(L.activation, z, L.p0, L.p1)
    return a, np.swapaxes(T, 1, 2)


def hessian_ref(layers, x, h=H_REF):
    """float64 [B, n_out, n_in, n_in]: central differences of jacobian_ref, column k along x_k."""
    x = np.asarray(x, np.float64)
    cols = []
    for k in range(x.shape[1]):
        e = np.zeros(x.shape[1])
        e[k] = h
        cols.append((jacobian_ref(layers, x + e)[1] - jacobian_ref(layers, x - e)[1]) / (2 * h))
    return np.stack(cols, axis=3)


def kink_distance2(layers, x):
    """Smallest distance of a pre-activation to a point where the first derivative of its activation is not smooth
    (the kinks of the piecewise ones, 0 for elu, selu and softsign), per point: finite differences of J straddle it."""
    a = np.asarray(x, np.float64)
    d = np.full(a.shape[0], np.inf)
    for L in layers:
        z = a @ L.W.astype(np.float64) + L.b
        if L.activation in ("relu", "leaky_relu", "elu", "selu", "softsign"):
            d = np.minimum(d, np.abs(z).min(axis=1))
        elif L.activation == "relu6":
            d = np.minimum(d, np.minimum(np.abs(z), np.abs(z - 6)).min(axis=1))
        elif L.activation == "hard_sigmoid":
            t = L.p0 * z + L.p1
            d = np.minimum(d, np.minimum(np.abs(t), np.abs(t - 1)).min(axis=1) / abs(L.p0))
        a = activation_ref(L.activation, z, L.p0, L.p1)
    return d


def tf_activation(name, z, p0, p1):
    """The activation with TensorFlow/Keras ops (what a Keras model computes). softsign: z / (1 + |z|), because
    TensorFlow has no second derivative of tf.nn.softsign (no gradient registered for SoftsignGrad)."""
    if name == "linear":
        return z
    if name == "relu":
        return tf.nn.relu(z)
    if name == "leaky_relu":
        return tf.nn.leaky_relu(z, alpha=p0)
    if name == "elu":
        return keras.activations.elu(z, alpha=p0)
    if name == "selu":
        return tf.nn.selu(z)
    if name == "tanh":
        return tf.tanh(z)
    if name == "sigmoid":
        return tf.sigmoid(z)
    if name == "hard_sigmoid":
        return tf.clip_by_value(p0 * z + p1, 0.0, 1.0)
    if name == "softplus":
        return tf.nn.softplus(z)
    if name == "softsign":
        return z / (1.0 + tf.abs(z))
    if name == "swish":
        return tf.nn.silu(z)
    if name == "gelu":
        return tf.nn.gelu(z, approximate=False)
    if name == "gelu_tanh":
        return tf.nn.gelu(z, approximate=True)
    if name == "relu6":
        return tf.nn.relu6(z)
    if name == "exponential":
        return tf.exp(z)
    raise ValueError(name)


def tape_second(fn, x, v=None):
    """Nested GradientTape: (y, J [B, n_out, n_in], H [B, n_out, n_in, n_in]) of fn at x, in x's dtype."""
    xt = tf.constant(x)
    with tf.GradientTape() as outer:
        outer.watch(xt)
        with tf.GradientTape() as inner:
            inner.watch(xt)
            y = fn(xt)
        J = inner.batch_jacobian(y, xt, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    H = outer.batch_jacobian(J, xt, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return y.numpy(), J.numpy(), H.numpy()


def tf_layers_fn(layers):
    def fn(x):
        a = x
        for L in layers:
            z = tf.matmul(a, tf.constant(L.W, dtype=x.dtype)) + tf.constant(L.b, dtype=x.dtype)
            a = tf_activation(L.activation, z, L.p0, L.p1)
        return a
    return fn


def assert_close(got, want, tol, what):
    max_abs, rel, scale = tolerances.scaled_error(got, want)
    assert rel <= tol, f"{what}: |error| {max_abs:.3g} (scale {scale:.3g}), relative {rel:.3g} > {tol:.3g}"


# ----- each activation's second derivative --------------------------------------------------------------------------
@pytest.mark.parametrize("act", ALL)
def test_activation_second_derivative_against_fd_of_first(act):
    """One unit, z = x: the Hessian is f''(x); against float64 central differences of f' (away from kinks)."""
    p0, p1 = (float(np.float32(p)) for p in PARAMS.get(act, (0.0, 0.0)))
    k = Kernel(write_nnp([Layer(np.eye(1), np.zeros(1), act, p0, p1)]))
    x = np.linspace(-4.0, 4.0 if act != "exponential" else 2.0, 401, dtype=np.float32).reshape(-1, 1)
    z = x[:, 0].astype(np.float64)
    kinks = {"relu6": (0.0, 6.0), "hard_sigmoid": (-3.0, 3.0)}.get(act, (0.0,))
    far = np.min(np.abs(z[:, None] - np.array(kinks)[None, :]), axis=1) > 1e-3
    h = 1e-6
    want = (dact(act, z + h, p0, p1) - dact(act, z - h, p0, p1)) / (2 * h)
    y, J, H = k.hessian(x)
    assert_close(H[far, 0, 0, 0], want[far], SECOND_F32, f"{act}''")
    if act in PIECEWISE:
        assert np.all(H == 0)  # exactly, kinks included
    assert_close(J[:, 0, 0], dact(act, z, p0, p1), SECOND_F32, f"{act}'")
    assert_close(y[:, 0], activation_ref(act, z, p0, p1), tolerances.FORWARD_F32, act)
    _, _, lap = k.laplacian(x)
    np.testing.assert_array_equal(lap[:, 0], H[:, 0, 0, 0])
    v = np.full_like(x, -1.5)
    _, hv = k.hvp(x, v)
    assert_close(hv[:, 0, 0], -1.5 * H[:, 0, 0, 0].astype(np.float64), SECOND_F32, f"{act}'' v")


@pytest.mark.parametrize("act,z0,want", [
    ("relu", 0.0, 0.0), ("leaky_relu", 0.0, 0.0), ("relu6", 0.0, 0.0), ("relu6", 6.0, 0.0),
    ("hard_sigmoid", -3.0, 0.0), ("hard_sigmoid", 3.0, 0.0), ("linear", 0.0, 0.0),
    # elu and selu at 0: the z > 0 branch, 0 (for elu not the branch of elu'(0) = alpha); softsign: 0
    ("elu", 0.0, 0.0), ("selu", 0.0, 0.0), ("softsign", 0.0, 0.0),
])
def test_second_derivative_at_kinks_follows_nested_gradient_tape(act, z0, want):
    p0, p1 = (float(np.float32(p)) for p in PARAMS.get(act, (0.0, 0.0)))
    k = Kernel(write_nnp([Layer(np.eye(1), np.zeros(1), act, p0, p1)]))
    x = np.array([[z0], [-z0]], np.float32)  # -0.0 too
    for dtype in (np.float32, np.float64):
        _, _, H_tape = tape_second(lambda t: tf_activation(act, t, p0, p1), x.astype(dtype))
        np.testing.assert_array_equal(H_tape[:, 0, 0, 0], [want, want], err_msg=f"TensorFlow's {act}''({z0})")
    _, _, H = k.hessian(x)
    np.testing.assert_array_equal(H[:, 0, 0, 0], [want, want])
    _, _, lap = k.laplacian(x)
    np.testing.assert_array_equal(lap[:, 0], [want, want])


# ----- networks against the numpy reference -------------------------------------------------------------------------
SHAPES = [
    dict(n_in=3, widths=(9, 7), n_out=2),     # 2 outputs < 6 pairs: forward then reverse
    dict(n_in=2, widths=(13, 5), n_out=4),    # 4 outputs >= 3 pairs: forward over forward
    dict(n_in=1, widths=(11,), n_out=3),      # one input: forward over forward
    dict(n_in=5, widths=(17, 3, 10), n_out=1),
    dict(n_in=4, widths=(), n_out=3, out_act="same"),  # one layer, wider input than output, act on the outputs
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, (s["n_in"], *s["widths"], s["n_out"]))))
@pytest.mark.parametrize("act", ALL)
def test_second_derivatives_against_numpy_fd(act, shape):
    shape = dict(shape)
    if shape.get("out_act") == "same":
        shape["out_act"] = act
    layers = make_layers(act, seed=ALL.index(act), **shape)
    k = Kernel(write_nnp(layers))
    n_in = shape["n_in"]
    x = points(N_POINTS, n_in, seed=2, scale=scale_for(act))
    v = points(N_POINTS, n_in, seed=3, scale=1.0)
    far = kink_distance2(layers, x) > 1e-3
    assert far.sum() >= 200
    y_ref, J_ref = jacobian_ref(layers, x)
    H_ref = hessian_ref(layers, x[far])
    y, J, H = k.hessian(x)
    assert H.dtype == np.float32 and H.shape == (N_POINTS, shape["n_out"], n_in, n_in)
    assert_close(y, y_ref, tolerances.FORWARD_F32, "y")
    assert_close(J, J_ref, tolerances.JACOBIAN_F32, "dy_dx")
    assert_close(H[far], H_ref, SECOND_F32, "hessian")
    np.testing.assert_array_equal(H, np.swapaxes(H, 2, 3))  # symmetric, exactly
    y2, J2, lap = k.laplacian(x)
    assert_close(lap[far], np.trace(H_ref, axis1=2, axis2=3), SECOND_F32, "laplacian")
    assert_close(lap, np.trace(H, axis1=2, axis2=3), SECOND_F32, "laplacian vs trace of the C Hessian")
    assert_close(y2, y_ref, tolerances.FORWARD_F32, "laplacian's y")
    assert_close(J2, J_ref, tolerances.JACOBIAN_F32, "laplacian's dy_dx")
    y3, hv = k.hvp(x, v)
    assert_close(hv[far], np.einsum("bijk,bk->bij", H_ref, v[far].astype(np.float64)), SECOND_F32, "hvp")
    assert_close(y3, y_ref, tolerances.FORWARD_F32, "hvp's y")
    if act in PIECEWISE:  # no second derivatives anywhere: exactly 0, kinks included
        assert not H.any() and not lap.any() and not hv.any()
    else:
        assert np.abs(H_ref).max() > 1e-3  # a test of something
    if act in SMOOTH:  # the float64 finite differences of the C core, within their error estimates
        _, fd, err = k.fd_hessian(x[far][:50])
        assert np.all(np.abs(fd - H_ref[:50]) <= err + 1e-8 * max(1.0, float(np.abs(H_ref).max())))


@pytest.mark.parametrize("n_out", [1, 2, 7])  # reverse, reverse, forward over forward (3 inputs: 6 pairs)
def test_mixed_activations(n_out):
    """Piecewise-linear and smooth layers in one network (the piecewise ones contribute nothing themselves, but pass
    the others' second derivatives on), with a smooth output activation."""
    layers = make_layers(["relu", "tanh", "leaky_relu", "gelu", "hard_sigmoid", "elu"], n_in=3,
                         widths=(12, 9, 8, 11, 10, 6), n_out=n_out, seed=11, out_act="sigmoid")
    k = Kernel(write_nnp(layers))
    x = points(N_POINTS, 3, seed=5)
    v = points(N_POINTS, 3, seed=6)
    far = kink_distance2(layers, x) > 1e-3
    assert far.sum() >= 200
    H_ref = hessian_ref(layers, x[far])
    assert np.abs(H_ref).max() > 1e-3  # not trivially zero
    _, _, H = k.hessian(x)
    assert_close(H[far], H_ref, SECOND_F32, "hessian")
    _, _, lap = k.laplacian(x)
    assert_close(lap[far], np.trace(H_ref, axis1=2, axis2=3), SECOND_F32, "laplacian")
    _, hv = k.hvp(x, v)
    assert_close(hv[far], np.einsum("bijk,bk->bij", H_ref, v[far].astype(np.float64)), SECOND_F32, "hvp")


@pytest.mark.parametrize("n_in,n_out", [(3, 1), (3, 2), (4, 5)])
def test_wide_layers(n_in, n_out):
    """Layers of at least 16384 weights: the reverse pass of the Hessian takes its dot products with the rows of W
    (so_rev_dot in nnp_second.c; smaller layers the transposed weights through nnpi_gemm), in tiles of 3, 2 and 1
    adjoint rows; widths that are not multiples of 8. Against the numpy reference, and a point alone gives bit for bit
    its row of the batch (which goes in blocks of many points)."""
    layers = make_layers(["tanh", "gelu", "softplus"], n_in=n_in, widths=(131, 130, 129), n_out=n_out, seed=13)
    assert min(L.W.size for L in layers[1:-1]) >= 16384
    k = Kernel(write_nnp(layers))
    x = points(60, n_in, seed=14)
    v = points(60, n_in, seed=15, scale=1.0)
    H_ref = hessian_ref(layers, x)
    assert np.abs(H_ref).max() > 1e-3
    y, J, H = k.hessian(x)
    assert_close(H, H_ref, SECOND_F32, "hessian")
    np.testing.assert_array_equal(H, np.swapaxes(H, 2, 3))
    _, _, lap = k.laplacian(x)
    assert_close(lap, np.trace(H_ref, axis1=2, axis2=3), SECOND_F32, "laplacian")
    _, hv = k.hvp(x, v)
    assert_close(hv, np.einsum("bijk,bk->bij", H_ref, v.astype(np.float64)), SECOND_F32, "hvp")
    for i in (0, 1, 2, 31, 59):
        for got, want in zip(k.hessian(x[i:i + 1]), (y, J, H)):
            np.testing.assert_array_equal(got, want[i:i + 1])
        np.testing.assert_array_equal(k.hvp(x[i:i + 1], v[i:i + 1])[1], hv[i:i + 1])


# ----- against TensorFlow's nested GradientTape ---------------------------------------------------------------------
@pytest.mark.parametrize("act", ALL)
def test_against_nested_gradient_tape_float64(act):
    """The same layers in TensorFlow/Keras ops, float64; two outputs of three inputs (the reverse route) and five
    outputs of two inputs (forward over forward)."""
    for shape in (dict(n_in=3, widths=(10, 8), n_out=2), dict(n_in=2, widths=(9, 6), n_out=5)):
        layers = make_layers(act, seed=7, **shape)
        k = Kernel(write_nnp(layers))
        x = points(N_POINTS, shape["n_in"], seed=8, scale=scale_for(act))
        v = points(N_POINTS, shape["n_in"], seed=9, scale=1.0)
        # away from elu's kink at 0, where the tape and the C core agree (tested above) but a float32 pre-activation
        # may land on the other side of it than the float64 one
        far = kink_distance2(layers, x) > 1e-4
        y_ref, J_ref, H_ref = tape_second(tf_layers_fn(layers), x.astype(np.float64))
        y, J, H = k.hessian(x)
        assert_close(y, y_ref, tolerances.FORWARD_F32, "y")
        assert_close(J[far], J_ref[far], tolerances.JACOBIAN_F32, "dy_dx")
        assert_close(H[far], H_ref[far], SECOND_F32, f"hessian {shape}")
        _, _, lap = k.laplacian(x)
        assert_close(lap[far], np.trace(H_ref[far], axis1=2, axis2=3), SECOND_F32, "laplacian")
        _, hv = k.hvp(x, v)
        assert_close(hv[far], np.einsum("bijk,bk->bij", H_ref[far], v[far].astype(np.float64)), SECOND_F32, "hvp")


@pytest.fixture(scope="module")
def lowering():
    from nnpartials.exporter.keras_export import keras_to_onnx
    from nnpartials.exporter.lower import lower_onnx

    return lambda model: lower_onnx(keras_to_onnx(model))


@pytest.mark.parametrize("act", ["tanh", "elu", "selu", "gelu", "swish", "sigmoid", "softplus", "relu"])
def test_lowered_keras_model_against_nested_gradient_tape(act, lowering):
    """A Keras model (Normalization + Dense layers, as tests/test_lower_keras.py) lowered to model.nnp by the exporter;
    the nested float32 GradientTape of the Keras model itself is the reference."""
    import models

    m = models.dense_model(act, seed=3)
    k = Kernel(lowering(m))
    x = np.random.default_rng(4).normal(1.0, 2.0, (N_POINTS, k.n_in)).astype(np.float32)
    y_ref, J_ref, H_ref = tape_second(lambda t: m(t, training=False), x)
    y, J, H = k.hessian(x)
    assert_close(y, y_ref, tolerances.FORWARD_F32, "y")
    assert_close(H, H_ref, SECOND_F32_TAPE, f"{act} hessian")
    if act == "relu":
        assert not H.any() and not H_ref.any()
    else:  # these Hessians are small (|H| < 1): also relative to their own size
        assert np.abs(H - H_ref).max() <= SECOND_F32_TAPE * np.abs(H_ref).max(), act
    _, _, lap = k.laplacian(x)
    assert_close(lap, np.trace(H_ref, axis1=2, axis2=3), SECOND_F32_TAPE, f"{act} laplacian")
    v = np.random.default_rng(5).normal(0.0, 1.0, x.shape).astype(np.float32)
    _, hv = k.hvp(x, v)
    assert_close(hv, np.einsum("bijk,bk->bij", H_ref, v), SECOND_F32_TAPE, f"{act} hvp")


# ----- the float64 finite-difference Hessian ------------------------------------------------------------------------
@pytest.mark.parametrize("act", SMOOTH)
def test_fd_hessian_within_its_error_estimate(act):
    layers = make_layers(act, seed=12)
    k = Kernel(write_nnp(layers))
    x = points(N_POINTS, 3, seed=13, scale=scale_for(act))
    far = kink_distance2(layers, x) > 1e-3
    y, fd, err = k.fd_hessian(x)
    assert fd.dtype == np.float64 and fd.shape == err.shape == (N_POINTS, 2, 3, 3) and y.shape == (N_POINTS, 2)
    np.testing.assert_allclose(y, forward_ref(layers, x), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(fd, np.swapaxes(fd, 2, 3))
    np.testing.assert_array_equal(err, np.swapaxes(err, 2, 3))
    assert np.all(err > 0)
    H_ref = hessian_ref(layers, x[far])
    scale = max(1.0, float(np.abs(H_ref).max()))
    # the float64 estimate against the float64 reference (good to ~1e-9): within the estimate, which is small
    assert np.all(np.abs(fd[far] - H_ref) <= err[far] + 1e-8 * scale)
    assert float(err[far].max()) < 1e-6 * scale
    # the analytic float32 Hessian within the estimate plus float32 rounding
    _, _, H = k.hessian(x)
    assert np.all(np.abs(H[far] - fd[far]) <= err[far] + SECOND_F32 * scale)


def test_fd_hessian_error_estimate_flags_a_kink():
    # softplus(relu(x)) at x = 1e-7: the steps straddle relu's kink, J jumps there
    k = Kernel(write_nnp([Layer(np.eye(1), np.zeros(1), "relu"), Layer(np.eye(1), np.zeros(1), "softplus")]))
    _, fd, err = k.fd_hessian(np.array([[1e-7]]))
    assert abs(fd[0, 0, 0, 0] - 0.25) > 0.01 and err[0, 0, 0, 0] > 0.01
    _, fd, err = k.fd_hessian(np.array([[0.5]]))
    s = 1 / (1 + math.exp(-0.5))
    assert abs(fd[0, 0, 0, 0] - s * (1 - s)) < 1e-8 and err[0, 0, 0, 0] < 1e-7


# ----- batches, threads, shapes -------------------------------------------------------------------------------------
def test_empty_batch_and_single_points():
    layers = make_layers("tanh", n_in=3, widths=(13, 5), n_out=2)
    k = Kernel(write_nnp(layers))
    x0 = np.zeros((0, 3), np.float32)
    y, J, H = k.hessian(x0)
    assert y.shape == (0, 2) and J.shape == (0, 2, 3) and H.shape == (0, 2, 3, 3)
    y, J, lap = k.laplacian(x0)
    assert lap.shape == (0, 2)
    y, hv = k.hvp(x0, x0)
    assert hv.shape == (0, 2, 3)
    y, fd, err = k.fd_hessian(x0)
    assert fd.shape == err.shape == (0, 2, 3, 3) and y.shape == (0, 2)
    # a single point (also given 1-D) gives bit for bit the row of the batch
    x = points(9)
    v = points(9, seed=4)
    full = k.hessian(x), k.laplacian(x), k.hvp(x, v)
    for i in (0, 4, 8):
        one = k.hessian(x[i]), k.laplacian(x[i:i + 1]), k.hvp(x[i], v[i])
        for got, want in zip(one, full):
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b[i:i + 1])


@pytest.mark.parametrize("act", ["swish", "relu"])
def test_thread_split_equals_single_thread(act):
    layers = make_layers(act, n_in=3, widths=(16, 8), n_out=2)
    k = Kernel(write_nnp(layers), threads=4)
    x = points(2 * kernel_mod.PARALLEL_MIN_BATCH // 3 + 17, 3)
    v = points(x.shape[0], 3, seed=9)
    for name, call in [("hessian", lambda t: k.hessian(x, threads=t)), ("laplacian", lambda t: k.laplacian(x, threads=t)),
                       ("hvp", lambda t: k.hvp(x, v, threads=t)), ("fd_hessian", lambda t: k.fd_hessian(x[:300], threads=t))]:
        n = 300 if name == "fd_hessian" else x.shape[0]
        assert k._split(n, 4, k._so_min_batch({"fd_hessian": "fd_hessian_f64"}.get(name, name))), name  # really split
        for a, b in zip(call(1), call(4)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    with pytest.raises(InputError, match="threads"):
        k.hessian(x, threads=0)


def test_second_order_thread_split_by_work():
    """Second derivatives of wide layers are split across threads from the counted work (as forward and
    jacobian), narrow ones from PARALLEL_MIN_BATCH / rows; the split gives the one-thread results."""
    narrow = Kernel(write_nnp(make_layers("tanh", n_in=3, widths=(16, 8), n_out=2)), threads=2)
    wide = Kernel(write_nnp(make_layers("tanh", n_in=3, widths=(256, 256), n_out=2)), threads=2)
    flops = 2 * (3 * 256 + 256 * 256 + 256 * 2)
    rows = {"hessian": 1 + 3 + 2, "laplacian": 2 + 3, "hvp": 2 + 6}
    for op, r in rows.items():
        by_work = max(kernel_mod.PARALLEL_FLOOR, -(-kernel_mod.PARALLEL_MIN_FLOPS // (r * flops)))
        assert wide._so_min_batch(op) == by_work < kernel_mod.PARALLEL_MIN_BATCH // r, op
        assert narrow._so_min_batch(op) == kernel_mod.PARALLEL_MIN_BATCH // r, op
    n = 150  # below every op's former threshold (PARALLEL_MIN_BATCH / rows), above the work-based one
    x, v = points(n, 3), points(n, 3, seed=5)
    for name, call in [("hessian", lambda t: wide.hessian(x, threads=t)),
                       ("laplacian", lambda t: wide.laplacian(x, threads=t)),
                       ("hvp", lambda t: wide.hvp(x, v, threads=t))]:
        assert wide._split(n, None, wide._so_min_batch(name)) is not None, name
        for a, b in zip(call(1), call(None)):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_input_validation():
    k = Kernel(write_nnp(make_layers("tanh")))
    good = points(4)
    for call in (k.hessian, k.laplacian, k.fd_hessian, lambda x, **kw: k.hvp(x, good[: len(x)], **kw)):
        with pytest.raises(InputError, match="3 features"):
            call(np.zeros((2, 4), np.float32))
        with pytest.raises(InputError, match="rank 3"):
            call(np.zeros((2, 3, 1), np.float32))
        with pytest.raises(InputTypeError):
            call(np.zeros((1, 3), np.complex64))
        with pytest.raises(InputError, match="finite"):
            call(np.array([[0.0, np.nan, 1.0]], np.float32))
        with pytest.raises(InputError, match="finite"):
            call(np.array([[0.0, np.inf, 1.0]]))
        with pytest.raises(InputError, match="nan_policy"):
            call(good, nan_policy="ignore")
    # v: validated like x, and one direction per point
    with pytest.raises(InputError, match="v: expected 3 features"):
        k.hvp(good, np.zeros((4, 2), np.float32))
    with pytest.raises(InputError, match=r"v: expected one direction per point, the shape of x \(4, 3\), got shape \(3, 3\)"):
        k.hvp(good, good[:3])
    with pytest.raises(InputError, match="v: expected finite values"):
        k.hvp(good, np.where(np.eye(4, 3) > 0, np.nan, 1.0))
    with pytest.raises(InputTypeError, match="v"):
        k.hvp(good, np.array([["a", "b", "c"]] * 4))
    # lists, float64, ints and non-contiguous arrays are converted as for x
    y, H = k.hvp(good.tolist(), good.astype(np.float64)[:, ::1])
    np.testing.assert_array_equal(H, k.hvp(good, good)[1])
    np.testing.assert_array_equal(k.hessian(np.asfortranarray(good))[2], k.hessian(good)[2])


def test_nan_policy_propagate():
    k = Kernel(write_nnp(make_layers("relu")))  # piecewise: finite derivatives would hide a NaN input
    x = points(4)
    v = points(4, seed=3)
    x[1, 0] = np.nan
    x[2, 2] = np.inf
    v[3, 1] = np.nan
    for y, *ds in (k.hessian(x, nan_policy="propagate"), k.laplacian(x, nan_policy="propagate")):
        assert np.isnan(y[1]).all() and np.isfinite(y[[0, 3]]).all()
        for d in ds:
            assert np.isnan(d[1]).all() and np.isnan(d[2]).all() and np.isfinite(d[[0, 3]]).all()
    assert not np.isfinite(y[2]).all()  # the infinite input overflows the network
    y, hv = k.hvp(x, v, nan_policy="propagate")
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 3]]).all()
    assert np.isnan(hv[[1, 2, 3]]).all() and np.isfinite(hv[0]).all()  # row 3: its direction is NaN


def test_ccore_one_shot_second_derivatives():
    """nnpartials.ccore's one-shot calls (export-time checks of a weight file) give Kernel's results."""
    from nnpartials import ccore

    data = write_nnp(make_layers("gelu"))
    x = points(20)
    v = points(20, seed=5)
    assert ccore.has_second_order()
    k = Kernel(data)
    np.testing.assert_array_equal(ccore.hessian(data, x), k.hessian(x)[2])
    np.testing.assert_array_equal(ccore.laplacian(data, x), k.laplacian(x)[2])
    np.testing.assert_array_equal(ccore.hvp(data, x, v), k.hvp(x, v)[1])
    assert ccore.hessian(data, x[:0]).shape == (0, 2, 3, 3)
    assert ccore.laplacian(data, x[:0]).shape == (0, 2) and ccore.hvp(data, x[:0], v[:0]).shape == (0, 2, 3)
    with pytest.raises(NNPartialsError, match="v must have the shape of x"):
        ccore.hvp(data, x, v[:3])
    assert {"hessian", "laplacian", "hvp", "fd_hessian_f64"} <= set(ccore.WORKSPACES)
