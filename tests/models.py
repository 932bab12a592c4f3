"""Small deterministic Keras models shared by the tests (built on demand, fixed seeds)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

SEED_UNITS = (64, 64, 32, 32, 16, 16, 8)

ACTIVATIONS = ["linear", "relu", "leaky_relu", "elu", "selu", "tanh", "sigmoid", "hard_sigmoid", "softplus",
               "softsign", "swish", "silu", "gelu", "gelu_tanh", "exponential", "relu6"]


def activation(name):
    import keras

    if name == "gelu_tanh":
        return lambda t: keras.activations.gelu(t, approximate=True)
    return name


def dense_model(act, n_in=3, units=(16, 8), n_out=2, seed=0, data=None, normalize=True):
    """Normalization (adapted on ``data``) + Dense layers with ``act`` + a linear output layer."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((n_in,), name="x")
    h = inp
    if normalize:
        norm = keras.layers.Normalization()
        norm.adapt(data if data is not None else np.random.default_rng(seed).normal(1.0, 2.0, (256, n_in)))
        h = norm(inp)
    for k in units:
        h = keras.layers.Dense(k, activation=activation(act), bias_initializer="random_normal")(h)
    out = keras.layers.Dense(n_out, bias_initializer="random_normal")(h)
    return keras.Model(inp, out, name=f"dense_{act}")


def seed_model(seed=0, data=None):
    """The seed network: Normalization + Dense 64, 64, 32, 32, 16, 16, 8 with LeakyReLU, linear output, 2 inputs."""
    import keras

    keras.utils.set_random_seed(seed)
    if data is None:
        t = np.linspace(0, 6 * np.pi, 2000)
        data = np.stack([t, 1.5 * t], axis=1).astype(np.float32)
    inp = keras.Input((2,), name="x")
    norm = keras.layers.Normalization()
    norm.adapt(data)
    h = norm(inp)
    for k in SEED_UNITS:
        h = keras.layers.Dense(k, bias_initializer="random_normal")(h)
        h = keras.layers.LeakyReLU()(h)
    return keras.Model(inp, keras.layers.Dense(1)(h), name="seed")


def layers_model(seed=0):
    """BatchNormalization (inference), Dropout, Activation, LeakyReLU/ReLU/PReLU layers."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(12)(inp)
    bn = keras.layers.BatchNormalization()
    h = bn(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.Dropout(0.3)(h)
    h = keras.layers.Dense(10)(h)
    h = keras.layers.LeakyReLU(negative_slope=0.15)(h)
    h = keras.layers.Dense(10)(h)
    h = keras.layers.ReLU(max_value=4.0, negative_slope=0.05)(h)
    h = keras.layers.Dense(8)(h)
    h = keras.layers.PReLU(alpha_initializer=keras.initializers.RandomUniform(0.05, 0.3))(h)
    m = keras.Model(inp, keras.layers.Dense(3)(h), name="layers")
    # give BatchNormalization non-trivial moving statistics
    rng = np.random.default_rng(seed)
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([rng.uniform(0.5, 2, gamma.shape), rng.normal(size=beta.shape), rng.normal(size=mean.shape),
                    rng.uniform(0.5, 2, var.shape)])
    return m


def multi_input_model(seed=0):
    """Two inputs joined by Concatenate, a residual Add, two output heads."""
    import keras

    keras.utils.set_random_seed(seed)
    a = keras.Input((2,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(8, activation="tanh")(h)
    r = keras.layers.Dense(8, activation="swish")(h)
    h = keras.layers.Add()([h, r])
    o1 = keras.layers.Dense(2, name="head1")(h)
    o2 = keras.layers.Dense(1, activation="sigmoid", name="head2")(h)
    return keras.Model([a, b], [o1, o2], name="multi")


def residual_model(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((3,), name="x")
    h = keras.layers.Dense(8, activation="elu")(inp)
    for _ in range(2):
        r = keras.layers.Dense(8, activation="gelu")(h)
        h = keras.layers.Add()([h, r])
    return keras.Model(inp, keras.layers.Dense(4)(h), name="residual")


def kink_distance(layers, x):
    """Smallest distance of a pre-activation to a kink of a piecewise activation, per point (float64)."""
    from nnpartials.exporter.nnp import activation_ref

    a = np.asarray(x, np.float64)
    d = np.full(a.shape[0], np.inf)
    for L in layers:
        z = a @ L.W.astype(np.float64) + L.b
        if L.activation in ("relu", "leaky_relu", "elu", "selu"):
            d = np.minimum(d, np.abs(z).min(axis=1))
        elif L.activation == "relu6":
            d = np.minimum(d, np.minimum(np.abs(z), np.abs(z - 6)).min(axis=1))
        elif L.activation == "hard_sigmoid":
            t = L.p0 * z + L.p1
            d = np.minimum(d, np.minimum(np.abs(t), np.abs(t - 1)).min(axis=1) / abs(L.p0))
        a = activation_ref(L.activation, z, L.p0, L.p1)
    return d
