"""Derivatives exactly at the kinks of every piecewise op, against TensorFlow's GradientTape.

Export validates on random points, where kinks have measure zero; these tests put points exactly on them.

* Keras models: ``Dense(kernel=identity, bias=0.5)`` with the activation (or an activation layer), then a linear
  ``Dense`` with small integer weights, so that every pre-activation of the first row of points is exactly a kink
  (``x = kink - 0.5``, exactly representable) and the other rows lie a quarter on either side. Checked: the
  bundle's companion graph through ``nnpartials.Partials`` (and the other mode built from the bundle's forward
  graph), and the C core through ``nnpartials.Kernel`` on one point at a time (the single-point path) and on a
  batch (the blocked path and its pattern cache), in both modes.
* ONNX ops that Keras models do not produce on their own (Abs, Max/Min with ties, Clip with other bounds,
  HardSigmoid, HardSwish, PRelu, ...): a single-node graph through the companion-graph engine in both modes,
  against the GradientTape of the TensorFlow op it stands for; and the C core too where the node lowers.
* Activations whose values are those of a C activation but whose derivative at the kink is another (Keras's
  PReLU, relu(x) - a * relu(-x), slope 0 at 0 where leaky_relu(a) has a; Abs, 0 at 0 where leaky_relu(-1) has -1):
  the lowering checks the graph's derivative at the kinks and refuses them, so the bundle has no C core and its
  manifest says why; Max(x, 0), 1 at 0, is lowered to selu(alpha=0, scale=1), which has the values of relu and
  its z >= 0 branch at 0.

The conventions (TensorFlow's; see the docstring of :mod:`nnpartials.exporter.rules`): relu'(0) = 0,
leaky_relu'(0) = alpha, elu'(0) = alpha, selu'(0) = scale, relu6' = 0 at 0 and 6 (so Clip, HardSigmoid and Keras 3's
hard_sigmoid are flat at both ends), hard_silu'(-3) = 0 and hard_silu'(3) = 1, abs'(0) = 0, and max/min ties send
the derivative to the first operand (tf.maximum / tf.minimum; tf.clip_by_value is Min then Max, so it is 1 at its
bounds).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from nnpartials import tolerances  # noqa: E402
from nnpartials.errors import NotLowerableError  # noqa: E402

import keras  # noqa: E402  (hard dependencies: a missing one fails, never skips)
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402

from onnx import helper, numpy_helper  # noqa: E402

import nnpartials  # noqa: E402
from nnpartials.exporter.jacobian import build_jacobian_model  # noqa: E402

BIAS = 0.5
OFFSET = 0.25  # rows 2 and 3: every pre-activation a quarter below / above its kink


def _has_c_core():
    try:
        import nnpartials._core  # noqa: F401
    except ImportError:
        return False
    return True


needs_c = pytest.mark.skipif(not _has_c_core(), reason="the C extension is not built")


def assert_close(J, J_ref, what, points):
    """Named project tolerance (scaled by max(1, max |J_ref|)); kink mismatches are O(0.1) and more."""
    J, J_ref = np.asarray(J, np.float64), np.asarray(J_ref, np.float64)
    assert J.shape == J_ref.shape, f"{what}: shape {J.shape}, want {J_ref.shape}"
    _, rel, _ = tolerances.scaled_error(J, J_ref)
    if rel > tolerances.JACOBIAN_F32:
        bad = np.argwhere(np.abs(J - J_ref) > tolerances.JACOBIAN_F32 * max(1.0, np.abs(J_ref).max()))
        rows = sorted({int(b[0]) for b in bad})[:4]
        detail = "; ".join(f"x={points[r].tolist()}: got {J[r].tolist()}, TensorFlow {J_ref[r].tolist()}"
                           for r in rows)
        pytest.fail(f"{what}: max scaled error {rel:.3g} at {len(bad)} entries; {detail}")


# ----- Keras models: the exported bundle (companion graph and C core) ------------------------------------------
def _act(name):
    if name == "leaky_relu_neg":  # a negative slope: the Keras activation function allows it (the layer does not)
        return lambda t: keras.activations.leaky_relu(t, negative_slope=-0.5)
    if name == "maximum(x, 0)":  # tf.maximum: a tie goes to the first operand, so 1 at 0 (relu: 0)
        return lambda t: keras.ops.maximum(t, 0.0)
    if name == "maximum(0, x)":  # ... and 0 at 0 here
        return lambda t: keras.ops.maximum(0.0, t)
    return name


# name -> (activation name for Dense, or a factory of an activation layer; kinks; the C core must take it)
KERAS_CASES = {
    "relu": ("relu", [0.0], True),
    "leaky_relu": ("leaky_relu", [0.0], True),  # Keras 3: negative_slope 0.2
    "leaky_relu_neg": ("leaky_relu_neg", [0.0], True),
    "elu": ("elu", [0.0], True),
    "selu": ("selu", [0.0], True),
    "relu6": ("relu6", [0.0, 6.0], True),
    "hard_sigmoid": ("hard_sigmoid", [-3.0, 3.0], True),  # Keras 3: relu6(x + 3) / 6 (Keras 2: clip(0.2x + 0.5))
    "hard_silu": ("hard_silu", [-3.0, 3.0], False),
    "LeakyReLU(0.3)": (lambda: keras.layers.LeakyReLU(negative_slope=0.3), [0.0], True),
    "LeakyReLU(1.5)": (lambda: keras.layers.LeakyReLU(negative_slope=1.5), [0.0], True),
    "LeakyReLU(0)": (lambda: keras.layers.LeakyReLU(negative_slope=0.0), [0.0], True),
    "ELU(0.5)": (lambda: keras.layers.ELU(alpha=0.5), [0.0], True),
    "ReLU(max_value=6)": (lambda: keras.layers.ReLU(max_value=6.0), [0.0, 6.0], True),
    "ReLU(max_value=4)": (lambda: keras.layers.ReLU(max_value=4.0), [0.0, 4.0], False),
    "ReLU(negative_slope=0.1)": (lambda: keras.layers.ReLU(negative_slope=0.1), [0.0], True),
    "ReLU(threshold=1)": (lambda: keras.layers.ReLU(threshold=1.0), [0.0, 1.0], False),
    "ReLU(max_value=4, negative_slope=0.05)": (lambda: keras.layers.ReLU(max_value=4.0, negative_slope=0.05),
                                               [0.0, 4.0], False),
    "ReLU(max_value=6, threshold=1, negative_slope=0.1)": (
        lambda: keras.layers.ReLU(max_value=6.0, threshold=1.0, negative_slope=0.1), [0.0, 1.0, 6.0], False),
    "PReLU": (lambda: keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25)), [0.0], False),
    "maximum(x, 0)": ("maximum(x, 0)", [0.0], True),
    "maximum(0, x)": ("maximum(0, x)", [0.0], True),
}

# Regions with the values of a C activation but another derivative at its kink, which the lowering refuses (no C
# activation has the graph's convention there): case -> what the manifest's c_core.reason must say.
KINK_REFUSED = {
    "PReLU": ["kink", "slope 0 at", "leaky_relu(alpha=0.25)", "has slope 0.25"],
}
# ... and the ones it lowers to another C activation with the graph's convention: case -> (activation, p0, p1)
KINK_RELOWERED = {
    "maximum(x, 0)": ("selu", 0.0, 1.0),
    "maximum(0, x)": ("relu", 0.0, 0.0),
}


def kink_model(case):
    act, kinks, _ = KERAS_CASES[case]
    n = len(kinks) + 1  # one more unit, away from every kink (kinks[0] + 0.625, and a quarter on either side)
    keras.utils.set_random_seed(0)
    inp = keras.Input((n,), name="x")
    kw = dict(kernel_initializer="identity", bias_initializer=keras.initializers.Constant(BIAS))
    if isinstance(act, str):
        h = keras.layers.Dense(n, activation=_act(act), **kw)(inp)
    else:
        h = act()(keras.layers.Dense(n, **kw)(inp))
    head = keras.layers.Dense(2)
    model = keras.Model(inp, head(h), name="kinks")
    w2 = np.array([[1.0 + j, 2.0 - 3.0 * j] for j in range(n)], np.float32)  # small integers: exact products
    head.set_weights([w2, np.zeros(2, np.float32)])
    z = np.array(kinks + [kinks[0] + 0.625], np.float32)
    x = np.stack([z - BIAS, z - BIAS - OFFSET, z - BIAS + OFFSET]).astype(np.float32)
    return model, x


def tape_jacobian(model, x):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt, training=False)
    return tape.batch_jacobian(y, xt).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (bundle folder, points, GradientTape Jacobian); each case exported once per module."""
    _BUNDLES = {}

    def get(case):
        if case not in _BUNDLES:
            model, x = kink_model(case)
            J_ref = tape_jacobian(model, x)
            # the kink points really are kinks: TensorFlow's one-sided derivatives differ there
            assert not np.array_equal(J_ref[1], J_ref[2]), case
            out = tmp_path_factory.mktemp("kinks") / "bundle"
            nnpartials.export(model, out, n_validation=200)
            _BUNDLES[case] = (str(out), x, J_ref)
        return _BUNDLES[case]

    return get


def check_c_core(case, path, x, J_ref):
    k = nnpartials.Kernel(path)
    reps = 40  # a batch: the blocked path and, for piecewise-linear networks, its pattern cache
    xb = np.tile(x, (reps, 1))
    for mode in ("forward", "reverse"):
        J1 = np.concatenate([k.jacobian(x[i:i + 1], mode=mode)[1] for i in range(len(x))])  # single points
        assert_close(J1, J_ref, f"{case}: C core, single point, {mode} mode", x)
        _, Jb = k.jacobian(xb, mode=mode)
        assert_close(Jb, np.tile(J_ref, (reps, 1, 1)), f"{case}: C core, batch, {mode} mode", xb)
    _, Jp = nnpartials.Partials(path, backend="c").jacobian(x)
    assert_close(Jp, J_ref, f"{case}: Partials(backend='c')", x)


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_keras_kinks_companion_graph(exported, case):
    path, x, J_ref = exported(case)
    p = nnpartials.Partials(path)
    _, J = p.jacobian(x)
    assert_close(J, J_ref, f"{case}: companion graph ({p.mode} mode)", x)
    # the other mode, built from the bundle's forward graph
    other = "forward" if p.mode == "reverse" else "reverse"
    jm, _ = build_jacobian_model(onnx.load(os.path.join(path, "model.onnx")), mode=other)
    sess = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"])
    _, J2 = sess.run(None, {sess.get_inputs()[0].name: x})
    assert_close(J2, J_ref, f"{case}: companion graph ({other} mode)", x)
    # a model outside today's C-core subset that a later lowering takes: its C core is held to the same
    if not KERAS_CASES[case][2] and os.path.exists(os.path.join(path, "model.nnp")) and _has_c_core():
        check_c_core(case, path, x, J_ref)


@needs_c
@pytest.mark.parametrize("case", [c for c in KERAS_CASES if KERAS_CASES[c][2]])
def test_keras_kinks_c_core(exported, case):
    path, x, J_ref = exported(case)
    assert os.path.exists(os.path.join(path, "model.nnp")), f"{case}: a Dense chain must lower to the C core"
    check_c_core(case, path, x, J_ref)
    if case in KINK_RELOWERED:
        from nnpartials.exporter.nnp import read_nnp

        with open(os.path.join(path, "model.nnp"), "rb") as fh:
            layers = read_nnp(fh.read())
        assert (layers[0].activation, layers[0].p0, layers[0].p1) == KINK_RELOWERED[case], case


@pytest.mark.parametrize("case", list(KINK_REFUSED))
def test_keras_kink_mismatch_refuses_the_c_core(exported, case):
    """Never a silent wrong number: a region whose values are a C activation's but whose derivative at the kink is
    not is refused by the lowering; the bundle then has no model.nnp, the manifest says why, and onnxruntime (the
    companion graph, checked at the kinks by test_keras_kinks_companion_graph) still serves the model."""
    import json

    path, x, J_ref = exported(case)
    assert not os.path.exists(os.path.join(path, "model.nnp")), f"{case}: the C core must not be written"
    with open(os.path.join(path, "manifest.json")) as fh:
        c_core = json.load(fh)["c_core"]
    assert c_core["available"] is False and c_core["file"] is None, c_core
    for part in KINK_REFUSED[case]:
        assert part in (c_core["reason"] or ""), f"{case}: {part!r} not in c_core.reason {c_core['reason']!r}"
    _, J = nnpartials.Partials(path).jacobian(x)
    assert_close(J, J_ref, f"{case}: companion graph", x)


# ----- single ONNX nodes: the companion-graph engine (and the C core where the node lowers) ----------------------
def single_node(op, inputs, width, attrs=None, consts=None, opset=17, const_first=False):
    """A graph of one node: float32 inputs [batch, w] (name, w), constants (initializers), output [batch, width]."""
    g_in = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", w]) for n, w in inputs]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in (consts or {}).items()]
    names = [n for n, _ in inputs]
    node_inputs = ([*(consts or {})] + names) if const_first else (names + [*(consts or {})])
    node = helper.make_node(op, node_inputs, ["out"], name=f"{op}_node", **(attrs or {}))
    y = helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", width])
    m = helper.make_model(helper.make_graph([node], f"kink_{op}", g_in, [y], inits),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def tf_reference(fn, xs):
    """GradientTape of fn(*xs): y [B, n] and one Jacobian [B, n, w_k] per input."""
    ts = [tf.constant(x) for x in xs]
    with tf.GradientTape(persistent=True) as tape:
        for t in ts:
            tape.watch(t)
        y = fn(*ts)
    return y.numpy(), [tape.batch_jacobian(y, t).numpy() for t in ts]


def check_single_node(model, fn, xs, what, c_refused=None):
    """The companion graph in both modes against TensorFlow; then the C core where the node lowers. c_refused: the
    lowering must refuse the node with a reason that contains these strings (a kink it cannot take)."""
    y_ref, J_refs = tf_reference(fn, xs)
    feeds = {i.name: x for i, x in zip(model.graph.input, xs)}
    for mode in ("forward", "reverse"):
        jm, _ = build_jacobian_model(model, mode=mode)
        sess = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(None, feeds)
        assert tolerances.scaled_error(outs[0], y_ref)[1] <= tolerances.FORWARD_F32, f"{what}: y"
        for k, (J, J_ref) in enumerate(zip(outs[1:], J_refs)):
            assert_close(J, J_ref, f"{what}: companion graph, {mode} mode, input {k}",
                         np.concatenate(xs, axis=1))
    if len(xs) != 1:
        return
    from nnpartials.exporter.lower import lower_onnx

    if c_refused:
        with pytest.raises(NotLowerableError) as ei:
            lower_onnx(model)
        for part in c_refused:
            assert part in str(ei.value), f"{what}: {part!r} not in the reason {str(ei.value)!r}"
        return
    if not _has_c_core():
        return
    try:
        data = lower_onnx(model)
    except NotLowerableError:
        return
    k = nnpartials.Kernel(data)
    for mode in ("forward", "reverse"):
        _, J = k.jacobian(xs[0], mode=mode)
        assert_close(J, J_refs[0], f"{what}: C core (lowered), {mode} mode", xs[0])


def row(*v):
    return np.array([v], np.float32)


ZEROS = row(0.0, -0.0, 1.0, -1.0, 2.5, -2.5)


@pytest.mark.parametrize("alpha", [0.01, 0.3, 1.0, 1.5, -0.4, 0.0])
def test_leaky_relu_node(alpha):
    check_single_node(single_node("LeakyRelu", [("x", 6)], 6, {"alpha": alpha}),
                      lambda x: tf.nn.leaky_relu(x, alpha=alpha), [ZEROS], f"LeakyRelu(alpha={alpha})")


def test_relu_node():
    check_single_node(single_node("Relu", [("x", 6)], 6), tf.nn.relu, [ZEROS], "Relu")


def test_selu_node():
    # tf.nn.selu's gradient: scale where the output is >= 0 (so at 0 and -0), scale * alpha * exp(x) below
    check_single_node(single_node("Selu", [("x", 6)], 6), tf.nn.selu, [ZEROS], "Selu")


@pytest.mark.parametrize("alpha", [1.0, 0.7, 2.0])
def test_elu_node(alpha):
    # tf.nn.elu for alpha 1; Keras's elu(x, alpha) = where(x > 0, elu(x), alpha * elu(x)) otherwise: alpha at 0
    fn = tf.nn.elu if alpha == 1.0 else (lambda x: keras.activations.elu(x, alpha=alpha))
    check_single_node(single_node("Elu", [("x", 6)], 6, {"alpha": alpha}), fn, [ZEROS], f"Elu(alpha={alpha})")


def test_abs_node():
    # |x| has the values of leaky_relu(-1), which has slope -1 at 0 where the graph (and TensorFlow) have 0: refused
    check_single_node(single_node("Abs", [("x", 6)], 6), tf.abs, [ZEROS], "Abs",
                      c_refused=["kink", "slope 0 at", "leaky_relu(alpha=-1)", "has slope -1"])


def test_clip_relu6_node():
    # tf2onnx writes tf.nn.relu6 (Keras relu6, ReLU(max_value=6), hard_sigmoid) as Clip(0, 6): 0 at both bounds
    x = row(0.0, -0.0, 6.0, 3.0, -1.0, 7.0)
    check_single_node(single_node("Clip", [("x", 6)], 6, consts={"lo": 0.0, "hi": 6.0}), tf.nn.relu6, [x],
                      "Clip(0, 6)")


def test_clip_other_bounds_node():
    # other bounds follow relu6: Clip(x, -1.5, 4.5) = relu6(x + 1.5) - 1.5, Clip(x, 0) = relu(x)
    x = row(-1.5, 4.5, 0.0, -2.0, 5.0, 1.0)
    check_single_node(single_node("Clip", [("x", 6)], 6, consts={"lo": -1.5, "hi": 4.5}),
                      lambda t: tf.nn.relu6(t + 1.5) - 1.5, [x], "Clip(-1.5, 4.5)")
    check_single_node(single_node("Clip", [("x", 6)], 6, consts={"lo": 0.0}), tf.nn.relu, [ZEROS], "Clip(0)")


def test_hard_sigmoid_node():
    # Keras 3's hard_sigmoid, relu6(x + 3) / 6, is HardSigmoid(alpha=1/6, beta=1/2); other alpha and beta follow
    # it: relu6(6 (alpha x + beta)) / 6 (0.2, 0.5: the Keras 2 slope, kinks at -2.5 and 2.5)
    x = row(-3.0, 3.0, 0.0, -2.5, 2.5, 4.0)
    check_single_node(single_node("HardSigmoid", [("x", 6)], 6, {"alpha": 1.0 / 6.0, "beta": 0.5}),
                      keras.activations.hard_sigmoid, [x], "HardSigmoid(1/6, 1/2)")
    check_single_node(single_node("HardSigmoid", [("x", 6)], 6, {"alpha": 0.2, "beta": 0.5}),
                      lambda t: tf.nn.relu6(6.0 * (0.2 * t + 0.5)) / 6.0, [x], "HardSigmoid(0.2, 0.5)")


def test_hard_swish_node():
    # HardSwish = x * relu6(x + 3) / 6 = Keras's hard_silu: 0 at -3, 1 at 3
    x = row(-3.0, 3.0, 0.0, -4.0, 4.0, 1.5)
    check_single_node(single_node("HardSwish", [("x", 6)], 6), keras.activations.hard_silu, [x],
                      "HardSwish")


def test_prelu_node():
    # PRelu is a per-channel LeakyRelu: tf.nn.leaky_relu's convention, the slope at 0. (tf2onnx writes Keras's
    # PReLU layer as relu(x) - a * relu(-x), not as PRelu: that one is 0 at 0, through the Relu rule.)
    slope = np.array([0.25, 1.5, -0.5, 0.0, 0.25, 0.25], np.float32)
    x = row(0.0, 0.0, -0.0, 0.0, 1.0, -1.0)

    def ref(t):
        return tf.stack([tf.nn.leaky_relu(t[:, j], alpha=float(slope[j])) for j in range(6)], axis=1)

    check_single_node(single_node("PRelu", [("x", 6)], 6, consts={"slope": slope}), ref, [x], "PRelu")


TIES_A = row(0.0, 1.0, -2.0, 3.0, 0.0, 5.0)
TIES_B = row(0.0, 1.0, -2.0, 4.0, -0.0, 4.0)  # tied in columns 0, 1, 2, 4 (0 == -0)
TIES_C = row(0.0, 2.0, -2.0, 3.0, 0.0, 5.0)


@pytest.mark.parametrize("op,tf_op", [("Max", tf.maximum), ("Min", tf.minimum)])
def test_max_min_ties(op, tf_op):
    """Ties send the whole derivative to the first tied operand, as tf.maximum(a, b) / tf.minimum(a, b) do; for
    more operands, as the nesting tf.maximum(tf.maximum(a, b), c)."""
    check_single_node(single_node(op, [("a", 6), ("b", 6)], 6), tf_op, [TIES_A, TIES_B], f"{op}(a, b)")
    check_single_node(single_node(op, [("b", 6), ("a", 6)], 6), tf_op, [TIES_B, TIES_A], f"{op}(b, a)")
    check_single_node(single_node(op, [("a", 6), ("b", 6), ("c", 6)], 6), lambda a, b, c: tf_op(tf_op(a, b), c),
                      [TIES_A, TIES_B, TIES_C], f"{op}(a, b, c)")
    # a broadcast operand [batch, 1], tied with some of the features (the reverse mode sums over them)
    b1 = row(3.0)
    a = row(3.0, 1.0, 3.0, 5.0, -3.0, 3.0)
    check_single_node(single_node(op, [("a", 6), ("b", 1)], 6), tf_op, [a, b1], f"{op}(a, b[batch, 1])")
    check_single_node(single_node(op, [("b", 1), ("a", 6)], 6), tf_op, [b1, a], f"{op}(b[batch, 1], a)")


@pytest.mark.parametrize("op,tf_op", [("Max", tf.maximum), ("Min", tf.minimum)])
def test_max_min_tied_with_a_constant(op, tf_op):
    c = np.array([0.0, 1.0, -2.0, 3.0, 0.0, 5.0], np.float32)
    x = TIES_B
    check_single_node(single_node(op, [("x", 6)], 6, consts={"c": c}), lambda t: tf_op(t, c), [x], f"{op}(x, c)")
    check_single_node(single_node(op, [("x", 6)], 6, consts={"c": c}, const_first=True), lambda t: tf_op(c, t), [x],
                      f"{op}(c, x)")


def test_max_with_zero_is_not_relu_at_the_tie():
    """tf.maximum(x, 0) is 1 at 0 (the tie goes to x), tf.maximum(0, x) is 0 there, as relu."""
    zero = np.zeros(6, np.float32)
    check_single_node(single_node("Max", [("x", 6)], 6, consts={"c": zero}, const_first=True),
                      lambda t: tf.maximum(zero, t), [ZEROS], "Max(0, x)")
    check_single_node(single_node("Max", [("x", 6)], 6, consts={"c": zero}), lambda t: tf.maximum(t, zero), [ZEROS],
                      "Max(x, 0)")


# ----- the lowering's check of the derivative at the kinks ---------------------------------------------------------
def prelu_pattern(alpha, width=4):
    """What tf2onnx writes for Keras's PReLU: relu(x) - a * relu(-x), as Relu, Neg, Relu, Mul(-a), Add."""
    nodes = [helper.make_node("Relu", ["x"], ["pos"], name="relu_pos"),
             helper.make_node("Neg", ["x"], ["negx"], name="neg"),
             helper.make_node("Relu", ["negx"], ["rneg"], name="relu_neg"),
             helper.make_node("Mul", ["rneg", "minus_a"], ["scaled"], name="mul"),
             helper.make_node("Add", ["pos", "scaled"], ["out"], name="add")]
    inits = [numpy_helper.from_array(np.full(width, -alpha, np.float32), "minus_a")]
    m = helper.make_model(helper.make_graph(
        nodes, "prelu_pattern", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", width])], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("alpha", [0.25, 1e-3, -0.5])
def test_prelu_pattern_is_refused_at_its_kink(alpha):
    """relu(x) - a * relu(-x) has the values of leaky_relu(a) everywhere, but slope 0 at 0 (the Relu rule, and
    TensorFlow's GradientTape) where the C activation has a: without the kink check it would lower, silently wrong
    at 0 (also for a slope as small as 1e-3)."""
    m = prelu_pattern(alpha)
    check_single_node(m, lambda t: tf.nn.relu(t) - alpha * tf.nn.relu(-t), [row(0.0, -0.0, 1.0, -1.0)],
                      f"relu(x) - {alpha} relu(-x)",
                      c_refused=["kink", "slope 0 at", f"leaky_relu(alpha={alpha:g})", f"has slope {alpha:g}"])


def test_max_with_zero_lowers_with_the_tie_convention():
    """Max(x, 0) (slope 1 at 0) lowers to selu(alpha=0, scale=1), Max(0, x) (slope 0 at 0) to relu; the C core's
    derivative at 0 is the graph's. Without the kink check both would be relu."""
    from nnpartials.exporter.lower import lower_layers

    zero = np.zeros(6, np.float32)
    got = {}
    for name, first in (("Max(x, 0)", False), ("Max(0, x)", True)):
        layers, _ = lower_layers(single_node("Max", [("x", 6)], 6, consts={"c": zero}, const_first=first))
        got[name] = (layers[0].activation, layers[0].p0, layers[0].p1)
    assert got == {"Max(x, 0)": ("selu", 0.0, 1.0), "Max(0, x)": ("relu", 0.0, 0.0)}, got


def test_single_node_activations_are_checked_too(monkeypatch):
    """The activations mapped by their attributes (Relu, LeakyRelu, Clip, ...) go through the same check: were the
    C core's relu 1 at 0, a Relu node (0 at 0 in the graph) would be refused."""
    import nnpartials.exporter.lower as lower

    real = lower._c_slope

    def fake(act, p0, p1, v, *args):
        d = real(act, p0, p1, v, *args)
        return np.where(np.asarray(v) == 0, 1.0, d) if act == "relu" else d

    monkeypatch.setattr(lower, "_c_slope", fake)
    monkeypatch.setattr(lower, "_EQUIVALENT", {})
    with pytest.raises(NotLowerableError, match=r"Relu node .Relu_node. has slope 0 at z = 0 .*slope 1 there.*kink"):
        lower.lower_onnx(single_node("Relu", [("x", 6)], 6))


def test_clip_whose_rescaled_bounds_round_off_its_own_is_refused():
    """Clip(lo, hi) lowers to lo + (hi - lo) * hard_sigmoid(z / (hi - lo) - lo / (hi - lo)); for Clip(0.1, 0.7) the
    rescaling puts the C core's kink beside 0.1 in float32, so at z = 0.1 the C core would be inside (slope 1) where
    the graph (and tf.nn.relu6's convention) is at its bound (slope 0). The check looks at the Clip's own bounds."""
    from nnpartials.exporter.lower import lower_onnx

    with pytest.raises(NotLowerableError, match=r"Clip node .* slope 0 at z = 0.100000001 .*slope 1 there.*kink"):
        lower_onnx(single_node("Clip", [("x", 6)], 6, consts={"lo": 0.1, "hi": 0.7}))


@pytest.mark.parametrize("op,attrs,consts,points", [
    ("Relu", {}, None, [0.0]), ("LeakyRelu", {"alpha": 0.3}, None, [0.0]), ("Elu", {"alpha": 0.7}, None, [0.0]),
    ("Selu", {}, None, [0.0]), ("Clip", {}, {"lo": 0.0, "hi": 6.0}, [0.0, 6.0]),
    ("Clip", {}, {"lo": -1.5, "hi": 4.5}, [-1.5, 4.5]), ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, None, [-2.5, 2.5]),
    ("HardSigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}, None, [-3.0, 3.0]),
])
def test_agreeing_kinks_still_lower(op, attrs, consts, points):
    """The check keeps every activation whose kink convention the C core has: the same slope as the companion graph
    exactly at the kinks."""
    from nnpartials.exporter.lower import lower_onnx

    m = single_node(op, [("x", 6)], 6, attrs, consts)
    data = lower_onnx(m)
    if not _has_c_core():
        return
    x = np.array([points + [points[0] - 0.25, points[-1] + 0.25] + [0.5] * (4 - len(points))], np.float32)
    jm, _ = build_jacobian_model(m, mode="forward")
    J_ref = ort.InferenceSession(jm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[1]
    for mode in ("forward", "reverse"):
        assert_close(nnpartials.Kernel(data).jacobian(x, mode=mode)[1], J_ref, f"{op}{attrs}: C core, {mode}", x)
