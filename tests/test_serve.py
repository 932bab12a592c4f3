"""Partials: shapes, input validation, batching, threads, providers."""

import concurrent.futures as cf

import numpy as np
import onnxruntime as ort
import pytest

import nnpartials
from nnpartials import tolerances
from nnpartials.errors import InputError, InputTypeError, NNPartialsError


@pytest.fixture(scope="module")
def p(seed_bundle):
    return nnpartials.Partials(seed_bundle)


def points(n, seed=0):
    return np.random.default_rng(seed).uniform([0, 0], [6 * np.pi, 9 * np.pi], size=(n, 2)).astype(np.float32)


def test_shapes_and_forward_consistency(p):
    x = points(100)
    y, J = p.jacobian(x)
    assert y.shape == (100, 1) and J.shape == (100, 1, 2)
    assert y.dtype == J.dtype == np.float32
    np.testing.assert_allclose(p.forward(x), y, rtol=1e-6, atol=1e-6)


def test_matches_gradient_tape_on_seed_network(p):
    import models

    from nnpartials.exporter.keras_export import load_model
    from nnpartials.exporter.reference import tf_jacobian

    x = points(1000, seed=5)
    _, (j_ref,) = tf_jacobian(load_model(models.seed_model()), [x])
    _, J = p.jacobian(x)
    assert tolerances.scaled_error(J, j_ref)[1] <= tolerances.JACOBIAN_F32


def test_single_point_list_and_dataframe(p):
    import pandas as pd

    x = points(3)
    _, J = p.jacobian(x)
    _, J1 = p.jacobian(list(map(float, x[1])))  # one point as a flat list
    np.testing.assert_allclose(J1[0], J[1], rtol=1e-6)
    _, Jdf = p.jacobian(pd.DataFrame(x, columns=["x1", "x2"]))
    np.testing.assert_allclose(Jdf, J, rtol=1e-6)


def test_dataframe_columns_are_matched_by_name(seed_bundle, p):
    """A DataFrame with the model's columns in another order is reordered by name, never used by position."""
    import pandas as pd

    x = points(7)
    _, J = p.jacobian(x)
    swapped = pd.DataFrame({"x2": x[:, 1], "x1": x[:, 0]})
    for q in (p, nnpartials.Partials(seed_bundle, backend="c"), nnpartials.Kernel(seed_bundle)):
        np.testing.assert_allclose(q.jacobian(swapped)[1], J, rtol=2e-5, atol=1e-6)
        extra = pd.DataFrame({"id": np.arange(7), "x2": x[:, 1], "x1": x[:, 0]})
        np.testing.assert_allclose(q.jacobian(extra)[1], J, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(q.jacobian(pd.DataFrame(x))[1], J, rtol=2e-5, atol=1e-6)  # default labels
        with pytest.raises(InputError, match=r"lack the model's columns \['x1'\]"):
            q.jacobian(pd.DataFrame({"a": x[:, 0], "x2": x[:, 1]}))
        with pytest.raises(InputError, match="duplicate"):
            q.jacobian(pd.DataFrame(x, columns=["x1", "x1"]))


def test_single_input_by_name(p):
    x = points(4)
    np.testing.assert_array_equal(p.jacobian({"x": x})[1], p.jacobian(x)[1])
    with pytest.raises(InputError, match=r"expected the keys \['x'\]"):
        p.jacobian({"z": x})


def test_multi_input_dataframe_by_name(multi_bundle):
    import pandas as pd

    q = nnpartials.Partials(multi_bundle)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    cols = q.input_columns
    shuffled = pd.DataFrame({c: x[:, k] for k, c in reversed(list(enumerate(cols)))})
    np.testing.assert_allclose(q.jacobian(shuffled)[1], q.jacobian(x)[1], rtol=1e-6)
    a_cols = [c for c in cols if c.startswith("a")]
    frame_a = pd.DataFrame({c: x[:, cols.index(c)] for c in reversed(a_cols)})
    np.testing.assert_allclose(q.jacobian({"a": frame_a, "b": x[:, 2:]})[1], q.jacobian(x)[1], rtol=1e-6)


def test_float64_and_int_inputs_are_converted(p):
    x = points(10)
    _, J32 = p.jacobian(x)
    _, J64 = p.jacobian(x.astype(np.float64))
    np.testing.assert_array_equal(J32, J64)
    _, Ji = p.jacobian(np.array([[1, 2], [3, 4]]))
    _, Jf = p.jacobian(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    np.testing.assert_array_equal(Ji, Jf)


@pytest.mark.parametrize("bad,err,msg", [
    (np.zeros((4, 3), np.float32), InputError, "expected 2 features"),
    (np.zeros((2, 2, 2), np.float32), InputError, "rank 3"),
    (np.zeros(5, np.float32), InputError, "length 5"),
    (np.array([["a", "b"]]), InputTypeError, "dtype"),
    (np.zeros((2, 2), np.complex64), InputTypeError, "dtype"),
    ([[1.0, 2.0], [3.0]], InputTypeError, "could not convert"),
    (np.array([[1.0, np.nan]], np.float32), InputError, "finite"),
    (np.array([[np.inf, 1.0]]), InputError, "finite"),
    (np.array([[1e300, 1.0]]), InputError, "overflows"),
])
def test_bad_input_is_refused_clearly(p, bad, err, msg):
    with pytest.raises(err, match=msg):
        p.jacobian(bad)
    with pytest.raises(err):
        p.forward(bad)


def test_errors_are_value_or_type_errors_of_one_base():
    assert issubclass(InputError, ValueError) and issubclass(InputError, NNPartialsError)
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, NNPartialsError)


def test_nan_propagate(seed_bundle):
    q = nnpartials.Partials(seed_bundle, nan_policy="propagate")
    x = points(3)
    x[1, 0] = np.nan
    y, J = q.jacobian(x)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
    assert np.isfinite(J[[0, 2]]).all()


def test_nan_propagate_same_on_c_core(seed_bundle):
    """nan_policy="propagate": the C core gives NaN partials where onnxruntime does, never finite ones."""
    for b in (seed_bundle,):
        ort_p = nnpartials.Partials(b, nan_policy="propagate")
        n_in = ort_p.n_in
        x = np.random.default_rng(2).normal(size=(6, n_in)).astype(np.float32)
        x[1, 0], x[2, n_in - 1], x[3, 0], x[4, 0] = np.nan, np.nan, np.inf, -np.inf
        y0, J0 = ort_p.jacobian(x)
        for q in (nnpartials.Partials(b, backend="c", nan_policy="propagate"), nnpartials.Kernel(b)):
            kw = {"nan_policy": "propagate"} if isinstance(q, nnpartials.Kernel) else {}
            for xx in (x, x[1:2], np.repeat(x, 800, axis=0)):  # one point, a small batch, the threaded path
                y, J = q.jacobian(xx, **kw)
                yr, Jr = ort_p.jacobian(xx)
                np.testing.assert_array_equal(np.isnan(y), np.isnan(yr))
                rows_nan = np.isnan(Jr).reshape(len(xx), -1).any(axis=1)
                assert np.isnan(J[rows_nan]).all(), "a point with NaN partials in onnxruntime is finite here"
                assert np.isfinite(J[~rows_nan]).all()
                assert np.array_equal(np.isnan(y).any(axis=1), np.isnan(q.forward(xx, **kw)).any(axis=1))
        assert np.isnan(J0[[1, 2]]).all() and np.isfinite(J0[[0, 5]]).all()


def test_empty_batch(p):
    y, J = p.jacobian(np.zeros((0, 2), np.float32))
    assert y.shape == (0, 1) and J.shape == (0, 1, 2)


def test_max_batch_split_equals_one_call(seed_bundle, p):
    x = points(1003)
    small = nnpartials.Partials(seed_bundle, max_batch=100)
    y1, J1 = p.jacobian(x)
    y2, J2 = small.jacobian(x)
    np.testing.assert_allclose(J1, J2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(small.forward(x), y1, rtol=1e-6, atol=1e-7)
    with pytest.raises(InputError):
        nnpartials.Partials(seed_bundle, max_batch=0)


def _dense_tanh_graph(width, dim_name="batch"):
    """x [batch, 3] -> MatMul (W [3, width]) -> Tanh -> y: per point, width floats after MatMul and width after
    Tanh, so 2 * width * 4 bytes of batch-sized tensors."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, width), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Tanh", ["z"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim_name, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim_name, width])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_graph_bytes_per_point_counts_the_batch_sized_tensors():
    from nnpartials.runtime.serve import graph_bytes_per_point

    assert graph_bytes_per_point(_dense_tanh_graph(256)) == 2 * 256 * 4
    assert graph_bytes_per_point(_dense_tanh_graph(256).SerializeToString()) == 2 * 256 * 4
    assert graph_bytes_per_point(b"not an onnx graph") is None


def test_default_call_size_is_chosen_from_the_graph():
    from nnpartials.runtime.serve import (AUTO_BATCH_STEP, CALL_BYTES_BUDGET, DEFAULT_MAX_BATCH, auto_max_batch)

    assert auto_max_batch(None) == DEFAULT_MAX_BATCH
    assert auto_max_batch(1) == DEFAULT_MAX_BATCH  # capped
    assert auto_max_batch(10 ** 9) == AUTO_BATCH_STEP  # at least one step
    n = auto_max_batch(2 * 256 * 4)
    assert n % AUTO_BATCH_STEP == 0 and n * 2048 <= CALL_BYTES_BUDGET < (n + AUTO_BATCH_STEP) * 2048


def test_default_split_follows_the_graph_and_equals_one_call(seed_bundle, p):
    from nnpartials.runtime.serve import DEFAULT_MAX_BATCH, auto_max_batch, graph_bytes_per_point

    assert p.max_batch is None
    lim = p.batch_limit("jacobian")
    assert lim == auto_max_batch(graph_bytes_per_point(p.bundle.read("model.jac.onnx")))
    assert 1024 <= lim < DEFAULT_MAX_BATCH  # the seed network's Jacobian graph holds kilobytes per point
    assert p.batch_limit("forward") >= lim  # the forward graph holds less per point
    x = points(2 * lim + 5, seed=3)
    one = nnpartials.Partials(seed_bundle, max_batch=len(x))
    assert one.batch_limit("jacobian") == len(x)
    y1, J1 = one.jacobian(x)
    y2, J2 = p.jacobian(x)
    np.testing.assert_allclose(J2, J1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y2, y1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p.forward(x), one.forward(x), rtol=1e-6, atol=1e-7)
    # the split is what the limit says: rows of each call equal that call made alone, bit for bit
    ys, Js = p.jacobian(x[lim:2 * lim])
    np.testing.assert_array_equal(J2[lim:2 * lim], Js)
    with pytest.raises(InputError, match="max_batch"):
        nnpartials.Partials(seed_bundle, max_batch=True)


def test_concurrent_calls_match_sequential(p):
    chunks = [points(257, seed=s) for s in range(16)]
    seq = [p.jacobian(c)[1] for c in chunks]
    with cf.ThreadPoolExecutor(8) as ex:
        par = list(ex.map(lambda c: p.jacobian(c)[1], chunks))
    for a, b in zip(seq, par):
        np.testing.assert_array_equal(a, b)


def test_multi_input_forms(multi_bundle):
    q = nnpartials.Partials(multi_bundle)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 2)).astype(np.float32), rng.normal(size=(20, 3)).astype(np.float32)
    y1, J1 = q.jacobian(np.concatenate([a, b], axis=1))
    y2, J2 = q.jacobian([a, b])
    y3, J3 = q.jacobian({"a": a, "b": b})
    assert J1.shape == (20, 3, 5)
    np.testing.assert_array_equal(J1, J2)
    np.testing.assert_array_equal(J1, J3)
    _, parts = q.jacobian_by_input({"a": a, "b": b})
    np.testing.assert_array_equal(parts["b"], J1[:, :, 2:])
    with pytest.raises(InputError, match="missing"):
        q.jacobian({"a": a})


def test_unavailable_provider_is_a_clear_error(seed_bundle):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here; the refusal path cannot be exercised")
    with pytest.raises(NNPartialsError, match=r"not available.*\[cuda\]"):
        nnpartials.Partials(seed_bundle, providers="cuda")


def test_cuda_provider_without_tf32_unless_asked(monkeypatch):
    """onnxruntime-gpu multiplies float32 matrices in TF32 by default on recent GPUs (the seed network's Jacobian came
    out 4 % off on an H200): every way of asking for the CUDA provider gets use_tf32 = 0, unless the caller's own
    options set it; other providers and options pass through unchanged."""
    from nnpartials.runtime import serve

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    no_tf32 = ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert serve.resolve_providers("cuda") == [no_tf32, "CPUExecutionProvider"]
    assert serve.resolve_providers("CUDAExecutionProvider") == [no_tf32]
    assert serve.resolve_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [no_tf32,
                                                                                          "CPUExecutionProvider"]
    assert serve.resolve_providers([("CUDAExecutionProvider", {"device_id": 1})]) == [
        ("CUDAExecutionProvider", {"device_id": 1, "use_tf32": "0"})]
    assert serve.resolve_providers([("CUDAExecutionProvider", {"use_tf32": "1"})]) == [
        ("CUDAExecutionProvider", {"use_tf32": "1"})]
    assert serve.resolve_providers(None) == ["CPUExecutionProvider"]
    assert serve.resolve_providers([("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]) == [
        ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="onnxruntime-gpu with a CUDA device is not installed")
def test_cuda_provider_matches_cpu(seed_bundle, p):  # pragma: no cover - needs a GPU
    g = nnpartials.Partials(seed_bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert g.active_providers[0] == "CUDAExecutionProvider"
    x = points(5000)
    np.testing.assert_allclose(g.jacobian(x)[1], p.jacobian(x)[1], rtol=1e-4, atol=1e-5)


def test_alternating_calls_quiet_the_thread_pools_once(seed_bundle):
    """forward/jacobian alternation rebuilds both sessions once with session.force_spinning_stop (the spinning
    threads of one session otherwise take the cores the other needs); results are unchanged; one kind of call
    only, or the caller's own session options, keep the sessions as they are."""
    from nnpartials.runtime import serve

    x = points(300)
    p = nnpartials.Partials(seed_bundle)
    y0, J0 = p.jacobian(x)
    for _ in range(5):
        p.jacobian(x)
    assert not p._quiet  # one kind only: untouched
    before = dict(p._sessions)
    for _ in range(serve.ALTERNATIONS_BEFORE_QUIET):
        p.forward(x)
        p.jacobian(x)
    assert p._quiet and all(p._sessions[k] is not before[k] for k in before)
    rebuilt = dict(p._sessions)
    for _ in range(3):
        np.testing.assert_array_equal(p.forward(x), y0)
        y, J = p.jacobian(x)
        np.testing.assert_array_equal(J, J0)
    assert all(p._sessions[k] is rebuilt[k] for k in rebuilt)  # rebuilt once, not on every change
    own = nnpartials.Partials(seed_bundle, session_options=ort.SessionOptions())
    for _ in range(4):
        own.forward(x)
        own.jacobian(x)
    assert not own._quiet
