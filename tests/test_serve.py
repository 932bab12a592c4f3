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
    with pytest.raises(InputError, match="missing inputs"):
        q.jacobian({"a": a})


def test_unavailable_provider_is_a_clear_error(seed_bundle):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here; the refusal path cannot be exercised")
    with pytest.raises(NNPartialsError, match=r"not available.*\[cuda\]"):
        nnpartials.Partials(seed_bundle, providers="cuda")


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="onnxruntime-gpu with a CUDA device is not installed")
def test_cuda_provider_matches_cpu(seed_bundle, p):  # pragma: no cover - needs a GPU
    g = nnpartials.Partials(seed_bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert g.active_providers[0] == "CUDAExecutionProvider"
    x = points(5000)
    np.testing.assert_allclose(g.jacobian(x)[1], p.jacobian(x)[1], rtol=1e-4, atol=1e-5)
