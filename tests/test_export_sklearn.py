"""scikit-learn networks converted by skl2onnx go through export and serve the Jacobian of sklearn's own
``predict`` / ``predict_proba``. The reference is independent of the code under test: float64 central differences
through sklearn itself (which computes in float64), at 200 points of the training box.

Tolerance. skl2onnx writes the weights in float32 and the graph computes in float32, so the served Jacobian is
that of a network whose weights are sklearn's rounded to float32 (relative 2**-24 each), evaluated in float32:
a product of three layers' slopes summed over 16 units, off by a few 1e-7 relative to max|J| (measured: at most
3e-7 here). The float64 central differences (step 1e-5) are off by h**2/6 * |f'''| + eps*|f|/h, below 1e-9. So
tolerances.JACOBIAN_F32 (1e-5, scaled by max(1, max|J|)), the bound the project holds every float32 Jacobian to,
leaves a margin of 30; the forward values are held to tolerances.FORWARD_F32 alike.

Kinks. For ReLU networks a central difference whose step straddles a kink is not a derivative: every entry is
differenced with two steps (1e-5 and 5e-6), which agree to ~1e-10 where the function is smooth, and entries where
they differ by more than tolerances.CHECK_FD_KINK (scaled) are left out; at most 1 % may be.

Two things of skl2onnx 1.20 the helpers work around (both reported): the MLPRegressor converter reshapes the
prediction to [-1, 1] whatever the number of targets, so a 2-target model outputs [2N, 1] for N points (export
refuses that graph, see test_multi_target_regressor_as_converted); and the classifier's graph has an int64
``label`` output next to ``probabilities``, which export leaves out (it differentiates float outputs only) and
lists in the manifest's source.dropped_outputs."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import nnpartials
from nnpartials import tolerances
from nnpartials.errors import ExportError

import skl2onnx  # noqa: E402  (the [test] extra installs it and scikit-learn: a missing one fails, never skips)
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402
from skl2onnx.common.data_types import FloatTensorType  # noqa: E402

N_POINTS = 200
N_VALIDATION = 200
BOX = 2.0
STEPS = (1e-5, 5e-6)
#: Largest share of Jacobian entries whose two central differences disagree (a step straddles a ReLU kink).
MAX_KINK_SHARE = 0.01


def _data(seed=0, n=400):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-BOX, BOX, (n, 3))
    Y = np.c_[np.sin(X[:, 0]) + X[:, 1] * X[:, 2], np.cos(X[:, 1]) - 0.5 * X[:, 0]]
    labels = np.argmax(np.c_[X[:, 0] + X[:, 1], X[:, 1] - X[:, 2] ** 2, 0.3 - X[:, 0]], axis=1)
    return X, Y, labels


def _fit(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


@pytest.fixture(scope="module")
def fitted():
    X, Y, labels = _data()
    reg = {act: _fit(MLPRegressor(hidden_layer_sizes=(16, 16), activation=act, max_iter=1000, random_state=0), X, Y)
           for act in ("tanh", "relu")}
    clf = _fit(MLPClassifier(hidden_layer_sizes=(16,), max_iter=1000, random_state=0), X, labels)
    assert all(r.score(X, Y) > 0.8 for r in reg.values()) and clf.score(X, labels) > 0.9  # trained, not random
    return reg, clf


@pytest.fixture(scope="module")
def points():
    return np.random.default_rng(1).uniform(-BOX, BOX, (N_POINTS, 3))


def _convert(est, **options):
    return skl2onnx.convert_sklearn(est, initial_types=[("x", FloatTensorType([None, 3]))],
                                    options={id(est): options} if options else None)


def _fix_target_reshape(model, n_targets):
    """skl2onnx 1.20's MLPRegressor converter ends in Reshape(pred, [-1, 1]) whatever the number of targets; make it
    [-1, n_targets] (and the declared output width), which is what sklearn's predict returns."""
    out = model.graph.output[0]
    node = next(n for n in model.graph.node if out.name in n.output)
    assert node.op_type == "Reshape"
    shape = next(t for t in model.graph.initializer if t.name == node.input[1])
    shape.CopyFrom(numpy_helper.from_array(np.array([-1, n_targets], np.int64), shape.name))
    out.type.tensor_type.shape.dim[1].dim_value = n_targets
    return model


def _central_differences(f, x):
    """float64 central differences of f (sklearn, float64) with each of STEPS; [N, n_out, n_in] each."""
    out = []
    for h in STEPS:
        cols = []
        for j in range(x.shape[1]):
            e = np.zeros(x.shape[1])
            e[j] = h
            cols.append((f(x + e) - f(x - e)) / (2 * h))
        out.append(np.stack(cols, axis=-1))
    return out


def _reference(f, x):
    """(J_fd, keep): the float64 finite-difference Jacobian and the entries whose two steps agree (no kink)."""
    J1, J2 = _central_differences(f, x)
    keep = np.abs(J1 - J2) <= tolerances.CHECK_FD_KINK * max(1.0, float(np.abs(J1).max()))
    assert 1 - keep.mean() <= MAX_KINK_SHARE, 1 - keep.mean()
    return J1, keep


def _compare(y, J, y_ref, J_ref, keep):
    assert J.shape == J_ref.shape and y.shape == y_ref.shape
    assert tolerances.scaled_error(y, y_ref)[1] <= tolerances.FORWARD_F32
    _, rel, _ = tolerances.scaled_error(J * keep, J_ref * keep)
    assert rel <= tolerances.JACOBIAN_F32, rel


def _export(tmp_path, model, mode="auto", name="b"):
    b = nnpartials.export(model, tmp_path / name, mode=mode, n_validation=N_VALIDATION)
    man = b.manifest
    assert man["source"]["kind"] == "onnx" and man["source"]["producer"].startswith("skl2onnx")
    assert man["validation"]["passed"]
    return b


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_mlp_regressor_jacobian_matches_sklearn(tmp_path, fitted, points, act, mode):
    reg = fitted[0][act]
    b = _export(tmp_path, _fix_target_reshape(_convert(reg), 2), mode)
    assert b.manifest["jacobian"]["mode"] == mode and b.manifest["y"]["shape"] == ["batch", 2]
    y, J = nnpartials.Partials(b).jacobian(points.astype(np.float32))
    J_ref, keep = _reference(reg.predict, points)
    _compare(y, J, reg.predict(points), J_ref, keep)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_mlp_regressor_gets_the_c_core(tmp_path, fitted, points, act):
    """skl2onnx's MatMul + Add + activation chain (with its input Cast and final Reshape) lowers to model.nnp."""
    reg = fitted[0][act]
    b = _export(tmp_path, _fix_target_reshape(_convert(reg), 2))
    c = b.manifest["c_core"]
    assert c["available"], c["reason"]
    assert c["validation"]["passed"]
    y, J = nnpartials.Kernel(b).jacobian(points.astype(np.float32))
    J_ref, keep = _reference(reg.predict, points)
    _compare(y, J, reg.predict(points), J_ref, keep)


def test_multi_target_regressor_as_converted(tmp_path, fitted, points):
    """The converter's own graph: while skl2onnx reshapes a 2-target prediction to [2N, 1], export refuses it
    (nothing written); once skl2onnx writes [N, 2], it exports as it is and this test checks its Jacobian."""
    reg = fitted[0]["tanh"]
    model = _convert(reg)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = sess.run(None, {"x": points[:4].astype(np.float32)})[0].shape
    if rows == (8, 1):  # skl2onnx's Reshape(pred, [-1, 1])
        with pytest.raises(ExportError, match="'variable' has 6 rows for a batch of 3 points.*not the batch axis"):
            nnpartials.export(model, tmp_path / "b", n_validation=N_VALIDATION)
        assert not (tmp_path / "b").exists()
    else:
        assert rows == (4, 2)
        b = _export(tmp_path, model)
        y, J = nnpartials.Partials(b).jacobian(points.astype(np.float32))
        J_ref, keep = _reference(reg.predict, points)
        _compare(y, J, reg.predict(points), J_ref, keep)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_mlp_classifier_probabilities_jacobian_matches_sklearn(tmp_path, fitted, points, mode):
    """MLPClassifier (3 classes, ReLU, softmax output), converted with zipmap=False: the Jacobian of
    predict_proba. The graph as converted is refused by name for its int64 label output."""
    clf = fitted[1]
    model = _convert(clf, zipmap=False)
    assert [o.name for o in model.graph.output] == ["label", "probabilities"]
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    b = _export(tmp_path, model, mode)  # the int64 label has no derivative: left out, and said so
    man = b.manifest
    assert man["source"]["dropped_outputs"] == ["label"]
    assert [o["name"] for o in man["outputs"]] == ["probabilities"] and man["y"]["shape"] == ["batch", 3]
    assert not man["c_core"]["available"] and "Softmax" in man["c_core"]["reason"]
    y, J = nnpartials.Partials(b).jacobian(points.astype(np.float32))
    J_ref, keep = _reference(clf.predict_proba, points)
    _compare(y, J, clf.predict_proba(points), J_ref, keep)
    np.testing.assert_allclose(J.sum(axis=1), 0.0, atol=1e-6)  # probabilities sum to 1: their derivatives to 0
