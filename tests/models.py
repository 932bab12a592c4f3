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


# ----- layers beyond dense networks (tests/test_export_keras_layers.py) -------------------------------------------
def _seeded(seed):
    import keras

    keras.utils.set_random_seed(seed)
    return keras


def conv1d_model(seed=0):
    """Conv1D ('same', then 'valid' with stride 2) on [batch, 8, 2], GlobalMaxPooling1D, Dense."""
    keras = _seeded(seed)
    inp = keras.Input((8, 2), name="x")
    h = keras.layers.Conv1D(3, 3, padding="same", activation="tanh", bias_initializer="random_normal")(inp)
    h = keras.layers.Conv1D(4, 2, strides=2, padding="valid", activation="tanh")(h)
    h = keras.layers.GlobalMaxPooling1D()(h)
    return keras.Model(inp, keras.layers.Dense(2)(h), name="conv1d")


def conv2d_model(seed=0, padding="same", strides=1):
    """Conv2D (channels_last) with the given padding and strides on [batch, 6, 6, 2], Flatten, Dense."""
    keras = _seeded(seed)
    inp = keras.Input((6, 6, 2), name="x")
    h = keras.layers.Conv2D(3, 3, strides=strides, padding=padding, activation="tanh",
                            bias_initializer="random_normal")(inp)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(2)(h), name=f"conv2d_{padding}_{strides}")


def pooling2d_model(seed=0):
    """Conv2D, MaxPooling2D, AveragePooling2D ('same' with strides), GlobalAveragePooling2D, Dense."""
    keras = _seeded(seed)
    inp = keras.Input((6, 6, 2), name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", bias_initializer="random_normal")(inp)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.AveragePooling2D(2, strides=1, padding="same")(h)
    h = keras.layers.Conv2D(4, 2, activation="tanh")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(2)(h), name="pooling2d")


def softmax_model(seed=0):
    """A classifier: Dense(tanh) then Dense(3, softmax)."""
    keras = _seeded(seed)
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(8, activation="tanh")(inp)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax")(h), name="softmax")


def attention_model(seed=0):
    """MultiHeadAttention (2 heads) self-attention on [batch, 4, 8], residual, LayerNormalization, Dense."""
    keras = _seeded(seed)
    inp = keras.Input((4, 8), name="x")
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inp, inp)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([inp, a]))
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(3)(h), name="attention")


def dense_rank3_model(seed=0):
    """Dense layers applied to a [batch, 3, 4] input (per time step), the output kept [batch, 3, 2]."""
    keras = _seeded(seed)
    inp = keras.Input((3, 4), name="x")
    h = keras.layers.Dense(5, activation="tanh", bias_initializer="random_normal")(inp)
    return keras.Model(inp, keras.layers.Dense(2)(h), name="dense_rank3")


def recurrent_model(kind="LSTM", seed=0, unroll=True):
    """An LSTM / GRU / SimpleRNN (4 units) over [batch, 3, 2], then Dense."""
    keras = _seeded(seed)
    inp = keras.Input((3, 2), name="x")
    h = getattr(keras.layers, kind)(4, unroll=unroll, name=f"{kind.lower()}_layer")(inp)
    return keras.Model(inp, keras.layers.Dense(2)(h), name=kind.lower())


def slicing_model(seed=0, use_lambda=False):
    """x[:, 1:3] taken from a [batch, 5] input (through keras.ops, or a Lambda layer), then Dense."""
    keras = _seeded(seed)
    inp = keras.Input((5,), name="x")
    if use_lambda:
        s = keras.layers.Lambda(lambda t: t[:, 1:3], name="take_1_3")(inp)
    else:
        s = inp[:, 1:3]
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([s, keras.ops.tanh(inp)]))
    return keras.Model(inp, keras.layers.Dense(2)(h), name="slicing")


def repeat_vector_model(seed=0):
    """Dense -> RepeatVector(3) -> Dense per step -> Flatten."""
    keras = _seeded(seed)
    inp = keras.Input((3,), name="x")
    h = keras.layers.Dense(4, activation="tanh")(inp)
    h = keras.layers.RepeatVector(3)(h)
    h = keras.layers.Dense(2, activation="tanh")(h)
    return keras.Model(inp, keras.layers.Flatten()(h), name="repeat_vector")


def padding_cropping_1d_model(seed=0):
    """ZeroPadding1D and Cropping1D around a Conv1D on [batch, 6, 2]."""
    keras = _seeded(seed)
    inp = keras.Input((6, 2), name="x")
    h = keras.layers.ZeroPadding1D((1, 2))(inp)
    h = keras.layers.Conv1D(3, 3, activation="tanh")(h)
    h = keras.layers.Cropping1D((1, 1))(h)
    return keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(h)), name="pad_crop_1d")


def padding_cropping_2d_model(seed=0):
    """ZeroPadding2D and Cropping2D around a Conv2D on [batch, 4, 5, 2]."""
    keras = _seeded(seed)
    inp = keras.Input((4, 5, 2), name="x")
    h = keras.layers.ZeroPadding2D(((1, 0), (2, 1)))(inp)
    h = keras.layers.Conv2D(3, 2, activation="tanh")(h)
    h = keras.layers.Cropping2D(((1, 0), (0, 2)))(h)
    return keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(h)), name="pad_crop_2d")


def layer_norm_model(seed=0):
    """Dense -> LayerNormalization -> Dense."""
    keras = _seeded(seed)
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, bias_initializer="random_normal")(inp)
    ln = keras.layers.LayerNormalization()
    h = ln(h)
    m = keras.Model(inp, keras.layers.Dense(3, activation="tanh")(h), name="layer_norm")
    rng = np.random.default_rng(seed)
    ln.set_weights([rng.uniform(0.5, 2.0, 6), rng.normal(size=6)])
    return m


def gelu_model(approximate=False, seed=0):
    """Dense layers with exact or tanh-approximate gelu, as Activation layers, on a [batch, 3, 2] input."""
    keras = _seeded(seed)
    inp = keras.Input((3, 2), name="x")
    h = keras.layers.Dense(6)(inp)
    h = keras.layers.Activation(lambda t: keras.activations.gelu(t, approximate=approximate))(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(2)(h), name="gelu_tanh" if approximate else "gelu")


def bidirectional_model(seed=0):
    """Bidirectional LSTM (unrolled, whole sequences; its backward half reverses time) then an unrolled SimpleRNN."""
    keras = _seeded(seed)
    inp = keras.Input((3, 2), name="x")
    h = keras.layers.Bidirectional(keras.layers.LSTM(3, unroll=True, return_sequences=True))(inp)
    return keras.Model(inp, keras.layers.SimpleRNN(2, unroll=True)(h), name="bidirectional")


def cross_attention_model(seed=0, causal=False):
    """MultiHeadAttention of a [batch, 3, 8] query over a [batch, 4, 6] value (two inputs); with ``causal``,
    causal self-attention on the query instead."""
    keras = _seeded(seed)
    q = keras.Input((3, 8), name="q")
    if causal:
        a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(q, q, use_causal_mask=True)
        return keras.Model(q, keras.layers.Flatten()(a), name="causal_attention")
    v = keras.Input((4, 6), name="v")
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(q, v)
    return keras.Model([q, v], keras.layers.GlobalAveragePooling1D()(a), name="cross_attention")


def pooling1d_model(seed=0):
    """Conv1D ('same', stride 2, gelu), MaxPooling1D, AveragePooling1D ('same'), UpSampling1D, Flatten."""
    keras = _seeded(seed)
    inp = keras.Input((9, 2), name="x")
    h = keras.layers.Conv1D(3, 3, strides=2, padding="same", activation="gelu")(inp)
    h = keras.layers.MaxPooling1D(2)(h)
    h = keras.layers.AveragePooling1D(2, padding="same")(h)
    h = keras.layers.UpSampling1D(2)(h)
    return keras.Model(inp, keras.layers.Flatten()(h), name="pooling1d")


def conv2d_variants_model(seed=0):
    """Dilated Conv2D, DepthwiseConv2D, SeparableConv2D, MaxPooling2D ('same'), GlobalMaxPooling2D."""
    keras = _seeded(seed)
    inp = keras.Input((7, 7, 1), name="x")
    h = keras.layers.Conv2D(2, 3, dilation_rate=2, activation="tanh")(inp)
    h = keras.layers.DepthwiseConv2D(2, activation="tanh")(h)
    h = keras.layers.SeparableConv2D(3, 2, padding="same")(h)
    h = keras.layers.MaxPooling2D(2, padding="same")(h)
    return keras.Model(inp, keras.layers.GlobalMaxPooling2D()(h), name="conv2d_variants")


def upsampling2d_model(seed=0):
    """UpSampling2D then a strided Conv2DTranspose, GlobalAveragePooling2D."""
    keras = _seeded(seed)
    inp = keras.Input((3, 3, 2), name="x")
    h = keras.layers.UpSampling2D(2)(inp)
    h = keras.layers.Conv2DTranspose(2, 2, strides=2, activation="tanh")(h)
    return keras.Model(inp, keras.layers.GlobalAveragePooling2D()(h), name="upsampling2d")
