"""Kernel (the cffi wrapper of the C core): results against a numpy float64 reference, input validation, bad
weight files, thread splitting. No TensorFlow here; the cross-framework checks are in test_lower_*.py."""

import os
import threading
import warnings

import numpy as np
import pytest

from nnpartials import tolerances
from nnpartials.errors import BundleError, InputError, InputTypeError, WeightFileError
from models import kink_distance
from nnpartials.exporter.nnp import SELU_ALPHA, SELU_SCALE, Layer, forward_ref, write_nnp

import nnpartials._core  # noqa: E402,F401  (built by pip install: a missing build fails, never skips)
import nnpartials.runtime.kernel as kernel_mod  # noqa: E402
Kernel = kernel_mod.Kernel

PARAMS = {"leaky_relu": (0.2, 0.0), "elu": (0.7, 0.0), "selu": (SELU_ALPHA, SELU_SCALE),
          "hard_sigmoid": (1 / 6, 0.5)}
SMOOTH = ["linear", "elu", "selu", "tanh", "sigmoid", "softplus", "softsign", "swish", "gelu", "gelu_tanh",
          "exponential"]
PIECEWISE = ["relu", "leaky_relu", "hard_sigmoid", "relu6"]


def make_layers(act, n_in=3, widths=(9, 7), n_out=2, seed=0, out_act="linear"):
    rng = np.random.default_rng(seed)
    dims = [n_in, *widths, n_out]
    layers = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        name = act if k < len(widths) else out_act
        p0, p1 = (float(np.float32(p)) for p in PARAMS.get(name, (0.0, 0.0)))  # as stored in the file
        layers.append(Layer(rng.uniform(-1, 1, (a, b)) / np.sqrt(a) * 1.5, rng.uniform(-0.3, 0.3, b), name, p0, p1))
    return layers


def ref_jacobian(layers, x, h=1e-6):
    """Central differences of the numpy float64 forward pass (an independent reference)."""
    x = np.asarray(x, np.float64)
    n, n_in = x.shape
    cols = []
    for j in range(n_in):
        e = np.zeros(n_in)
        e[j] = h
        cols.append((forward_ref(layers, x + e) - forward_ref(layers, x - e)) / (2 * h))
    return np.stack(cols, axis=2)  # [n, n_out, n_in]


def points(n, n_in=3, seed=1, scale=2.0):
    return np.random.default_rng(seed).uniform(-scale, scale, (n, n_in)).astype(np.float32)


@pytest.mark.parametrize("act", SMOOTH + PIECEWISE)
def test_forward_and_jacobian_against_numpy(act):
    layers = make_layers(act)
    k = Kernel(write_nnp(layers))
    x = points(300, scale=1.0 if act == "exponential" else 2.0)
    y = k.forward(x)
    yref = forward_ref(layers, x)
    _, rel, _ = tolerances.scaled_error(y, yref)
    assert rel <= tolerances.FORWARD_F32
    far = kink_distance(layers, x) > 1e-3
    Jref = ref_jacobian(layers, x[far])
    for mode in ("auto", "forward", "reverse"):
        y2, J = k.jacobian(x, mode=mode)
        np.testing.assert_array_equal(y2.shape, (300, 2))
        _, rel, _ = tolerances.scaled_error(J[far], Jref)
        assert rel <= 1e-4, (mode, rel)  # the numpy reference is itself a finite difference (~1e-9)
    _, Jf = k.jacobian(x, mode="forward")
    _, Jr = k.jacobian(x, mode="reverse")
    assert tolerances.scaled_error(Jf, Jr)[1] <= tolerances.JACOBIAN_F32


@pytest.mark.parametrize("act", SMOOTH)
def test_fd_float64_against_analytic(act):
    layers = make_layers(act, seed=3)
    k = Kernel(write_nnp(layers))
    x = points(100, seed=4, scale=1.0 if act == "exponential" else 2.0)
    fd, err = k.fd_jacobian(x)
    assert fd.dtype == np.float64 and err.shape == fd.shape
    _, J = k.jacobian(x)
    _, rel, _ = tolerances.scaled_error(fd, J)
    assert rel <= tolerances.FD_F64_REL
    assert np.all(err >= 0) and np.all(err < 1e-6 * max(1.0, np.abs(J).max()))
    yd = k.forward_f64(x)
    np.testing.assert_allclose(yd, forward_ref(layers, x), rtol=1e-12, atol=1e-12)


def test_fd_error_estimate_flags_a_kink():
    # relu(x0) at x0 = 1e-7: the steps straddle the kink, the estimate must say so
    k = Kernel(write_nnp([Layer(np.eye(1), np.zeros(1), "relu")]))
    fd, err = k.fd_jacobian(np.array([[1e-7]]))
    assert abs(fd[0, 0, 0] - 1.0) > 0.01 and err[0, 0, 0] > 0.01
    fd, err = k.fd_jacobian(np.array([[0.5]]))
    assert abs(fd[0, 0, 0] - 1.0) < 1e-9 and err[0, 0, 0] < 1e-8


def test_kinks_follow_tensorflow_conventions():
    cases = [("relu", 0.0, 0.0), ("leaky_relu", 0.0, 0.2), ("elu", 0.0, 0.7), ("selu", 0.0, SELU_SCALE),
             ("relu6", 0.0, 0.0), ("relu6", 6.0, 0.0), ("hard_sigmoid", -3.0, 0.0), ("hard_sigmoid", 3.0, 0.0)]
    for act, x0, want in cases:
        k = Kernel(write_nnp([Layer(np.eye(1), np.zeros(1), act, *PARAMS.get(act, (0.0, 0.0)))]))
        for mode in ("forward", "reverse"):
            _, J = k.jacobian(np.array([[x0]], np.float32), mode=mode)
            assert J[0, 0, 0] == pytest.approx(want, rel=1e-6), (act, x0, mode)


def test_shapes_properties_and_layers():
    layers = make_layers("tanh", n_in=4, widths=(5,), n_out=3)
    k = Kernel(write_nnp(layers))
    assert (k.n_in, k.n_out, k.n_layers) == (4, 3, 2)
    assert k.layers[0][:3] == (4, 5, "tanh")
    assert k.auto_mode == "reverse"  # 3 outputs < 4 inputs
    assert "n_in=4" in repr(k)


def test_input_validation():
    k = Kernel(write_nnp(make_layers("tanh")))
    with pytest.raises(InputError, match="3 features"):
        k.jacobian(np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match="rank 3"):
        k.forward(np.zeros((2, 3, 1), np.float32))
    with pytest.raises(InputError, match="1-D array of length 2"):
        k.forward(np.zeros(2))
    with pytest.raises(InputTypeError):
        k.forward(np.array([["a", "b", "c"]]))
    with pytest.raises(InputTypeError):
        k.jacobian(np.zeros((1, 3), np.complex64))
    with pytest.raises(InputError, match="finite"):
        k.jacobian(np.array([[0.0, np.nan, 1.0]], np.float32))
    with pytest.raises(InputError, match="finite"):
        k.forward(np.array([[0.0, np.inf, 1.0]]))
    with pytest.raises(InputError, match="finite"):
        k.fd_jacobian(np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(InputError, match="overflows"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the clear error only, no numpy overflow warning before it
        k.forward(np.array([[0.0, 1e300, 1.0]]))
    with pytest.raises(InputError, match="nan_policy"):
        k.forward(np.zeros((1, 3), np.float32), nan_policy="ignore")
    with pytest.raises(InputError, match="mode"):
        k.jacobian(np.zeros((1, 3), np.float32), mode="sideways")
    y = k.forward(np.array([[0.0, np.nan, 1.0]], np.float32), nan_policy="propagate")
    assert np.isnan(y).all()
    # conversions: lists, float64, ints, a single 1-D point, non-contiguous arrays
    x = points(5)
    ref = k.forward(x)
    np.testing.assert_array_equal(k.forward(x.tolist()), ref)
    np.testing.assert_array_equal(k.forward(x.astype(np.float64)), ref)
    # a single 1-D point is the batch of that one point (a one-point call may differ from the same point inside a
    # larger batch by float32 rounding: nnp.h)
    np.testing.assert_array_equal(k.forward(x[0]), k.forward(x[:1]))
    xt = np.asfortranarray(x)
    np.testing.assert_array_equal(k.forward(xt), ref)
    np.testing.assert_array_equal(k.forward(np.ones((2, 3), np.int64)), k.forward(np.ones((2, 3), np.float32)))


def test_small_call_fast_path_validates_like_as_batch():
    """Small C-contiguous float32 calls take one checked C call; a NaN or infinity anywhere in the batch gives
    as_batch's error (same text as the onnxruntime path) and other layouts give the same numbers."""
    from nnpartials.validate import as_batch

    k = Kernel(write_nnp(make_layers("tanh")))
    x = points(6)
    y_ref, J_ref = k.jacobian(x, threads=1)
    for r, c, bad in [(0, 0, np.nan), (5, 2, np.inf), (3, 1, -np.inf)]:
        xb = x.copy()
        xb[r, c] = bad
        with pytest.raises(InputError) as want:
            as_batch(xb, 3)
        for call in (k.jacobian, k.forward):
            with pytest.raises(InputError) as got:
                call(xb)
            assert str(got.value) == str(want.value)
            assert f"row {r}, column {c}" in str(got.value)
    # non-contiguous float32 layouts take the general path and agree with the contiguous call
    for xv in (np.asfortranarray(x), np.repeat(x, 2, axis=1)[:, ::2], np.repeat(x, 2, axis=0)[::2]):
        assert xv.dtype == np.float32 and not xv.flags.c_contiguous
        y, J = k.jacobian(xv)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(J, J_ref)
        np.testing.assert_array_equal(k.forward(xv), y_ref)
    # one point, every mode
    for mode in ("auto", "forward", "reverse"):
        y1, J1 = k.jacobian(x[:1], mode=mode)
        np.testing.assert_allclose(J1, J_ref[:1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y1, y_ref[:1], rtol=1e-5, atol=1e-6)


def test_empty_batch():
    k = Kernel(write_nnp(make_layers("tanh")))
    x = np.zeros((0, 3), np.float32)
    assert k.forward(x).shape == (0, 2)
    y, J = k.jacobian(x)
    assert y.shape == (0, 2) and J.shape == (0, 2, 3)
    fd, err = k.fd_jacobian(x)
    assert fd.shape == (0, 2, 3) and err.shape == (0, 2, 3)


@pytest.mark.parametrize("act", ["swish", "leaky_relu"])  # leaky_relu: reverse mode goes through the pattern cache
def test_thread_split_equals_single_thread(act):
    layers = make_layers(act, n_in=2, widths=(16, 8), n_out=1)
    k = Kernel(write_nnp(layers), threads=4)
    x = points(3 * kernel_mod.PARALLEL_MIN_BATCH + 17, n_in=2)
    for mode in ("auto", "forward", "reverse"):
        y1, J1 = k.jacobian(x, mode=mode, threads=1)
        y4, J4 = k.jacobian(x, mode=mode, threads=4)
        np.testing.assert_array_equal(y1, y4)
        np.testing.assert_array_equal(J1, J4)
    np.testing.assert_array_equal(k.forward(x, threads=1), k.forward(x))
    xs = x[:300]
    np.testing.assert_array_equal(k.fd_jacobian(xs, threads=1)[0], k.fd_jacobian(xs, threads=3)[0])
    with pytest.raises(InputError, match="threads"):
        k.forward(x, threads=0)
    with pytest.raises(InputError, match="threads"):
        Kernel(write_nnp(layers), threads=0)


def test_thread_split_by_work():
    """Wide layers split a call across threads from fewer points than narrow ones (PARALLEL_MIN_FLOPS), with the
    same results as one thread."""
    narrow = Kernel(write_nnp(make_layers("tanh", n_in=2, widths=(16, 8), n_out=1)), threads=2)
    wide = Kernel(write_nnp(make_layers("tanh", n_in=3, widths=(256, 256, 256), n_out=2)), threads=2)
    flops = 2 * (3 * 256 + 2 * 256 * 256 + 256 * 2)
    auto = kernel_mod.MODES["auto"]
    assert wide._par_jac[auto] == max(kernel_mod.PARALLEL_FLOOR, -(-kernel_mod.PARALLEL_MIN_FLOPS // (3 * flops)))
    assert wide._par_fwd == max(kernel_mod.PARALLEL_FLOOR, -(-kernel_mod.PARALLEL_MIN_FLOPS // flops))
    assert narrow._par_jac[auto] == kernel_mod.PARALLEL_MIN_BATCH
    n = 300
    assert wide._split(n, None, wide._par_jac[auto]) is not None and narrow._split(n, None, narrow._par_jac[auto]) is None
    x = points(n, n_in=3)
    for mode in ("auto", "forward", "reverse"):
        y1, J1 = wide.jacobian(x, mode=mode, threads=1)
        y2, J2 = wide.jacobian(x, mode=mode)
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(J1, J2)
    np.testing.assert_array_equal(wide.forward(x, threads=1), wide.forward(x))


def test_kernel_shared_between_threads():
    k = Kernel(write_nnp(make_layers("tanh")))
    xs = [points(50, seed=s) for s in range(8)]
    want = [k.jacobian(x)[1] for x in xs]
    got = [None] * len(xs)

    def work(i):
        for _ in range(20):
            got[i] = k.jacobian(xs[i])[1]

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def test_bad_weight_files_raise_with_code(tmp_path):
    good = write_nnp(make_layers("tanh"))
    cases = {"truncated": (good[:50], -2), "magic": (b"XXXX" + good[4:], -3),
             "checksum": (good[:-1] + bytes([good[-1] ^ 1]), -9), "empty": (b"", -2)}
    for name, (data, code) in cases.items():
        with pytest.raises(WeightFileError) as ei:
            Kernel(data)
        assert ei.value.code == code, name
        assert kernel_mod.strerror(code) in str(ei.value)
    p = tmp_path / "m.nnp"
    p.write_bytes(good[:-3])
    with pytest.raises(WeightFileError, match="truncated"):
        Kernel(p)
    with pytest.raises(BundleError, match="no such"):
        Kernel(tmp_path / "missing.nnp")
    with pytest.raises(TypeError):
        Kernel(12345)


def test_weight_file_shape_must_match_manifest(tmp_path, seed_bundle):
    """A model.nnp (consistently re-hashed) whose inputs/outputs disagree with the manifest is refused at load."""
    import hashlib
    import json
    import shutil

    import nnpartials

    dst = tmp_path / "mismatch"
    shutil.copytree(seed_bundle, dst)
    data = write_nnp(make_layers("tanh", n_in=3, n_out=1))
    (dst / "model.nnp").write_bytes(data)
    man = json.loads((dst / "manifest.json").read_text())
    man["files"]["model.nnp"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="3 inputs and 1 outputs, the manifest 2 inputs"):
        Kernel(dst)
    with pytest.raises(BundleError, match="inconsistent"):
        nnpartials.Partials(dst, backend="c")
    Kernel(dst / "model.nnp")  # the bare weight file on its own is fine: there is no manifest to disagree with


def test_sources_path_bytes_bundle(tmp_path, seed_bundle):
    data = write_nnp(make_layers("tanh"))
    p = tmp_path / "m.nnp"
    p.write_bytes(data)
    x = points(10)
    np.testing.assert_array_equal(Kernel(p).forward(x), Kernel(data).forward(x))
    np.testing.assert_array_equal(Kernel(str(p)).forward(x), Kernel(bytearray(data)).forward(x))
    kb = Kernel(seed_bundle)
    assert (kb.n_in, kb.n_out) == (2, 1)
    with open(os.path.join(seed_bundle, "model.nnp"), "rb") as f:
        np.testing.assert_array_equal(Kernel(f.read()).forward(points(5, 2)), kb.forward(points(5, 2)))


def test_every_status_code_maps_to_the_right_exception():
    """Bad input -> InputError, a malformed weight file -> WeightFileError, misuse of the C API -> InternalError."""
    from nnpartials import ccore
    from nnpartials.errors import InternalError

    assert set(ccore.STATUS) == {"null", "truncated", "bad_magic", "version", "bad_field", "bad_dim", "bad_activation",
                                 "size_mismatch", "checksum", "nonfinite", "storage", "workspace", "arg",
                                 "too_large", "input"}
    expected = {"input": InputError, "null": InternalError, "storage": InternalError, "workspace": InternalError,
                "arg": InternalError}
    for name, code in ccore.STATUS.items():
        want = expected.get(name, WeightFileError)
        with pytest.raises(want) as ei:
            Kernel._check(code)
        assert kernel_mod.strerror(code) in str(ei.value), name
        if want is InternalError:
            assert "bug" in str(ei.value)
    Kernel._check(0)


def test_constants_come_from_the_c_header():
    """ACTIVATIONS, MODES and workspace kinds are the header's NNP_* values (read through cffi), not a copy."""
    import re

    from nnpartials import ccore

    with open(os.path.join(os.path.dirname(__file__), "..", "csrc", "nnp.h")) as f:
        header = f.read()
    defs = {k: int(v) for k, v in re.findall(r"#define (NNP_\w+)\s+\(?(-?\d+)\)?", header)}
    assert ccore.ACTIVATIONS == {k[8:].lower(): v for k, v in defs.items()
                                 if k.startswith("NNP_ACT_") and k != "NNP_ACT_COUNT"}
    assert len(ccore.ACTIVATIONS) == defs["NNP_ACT_COUNT"]
    assert ccore.MODES == {k[9:].lower(): v for k, v in defs.items() if k.startswith("NNP_MODE_")}
    assert ccore.WORKSPACES == {k[7:].lower(): v for k, v in defs.items() if k.startswith("NNP_WS_")}
    assert kernel_mod.MODES is ccore.MODES
