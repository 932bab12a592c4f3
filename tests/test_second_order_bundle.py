"""Second derivatives end to end: export with order=2, the manifest, Partials.hessian/laplacian/hvp (onnxruntime and
C core), the command line, `check`, and nnpartials.dask, against nested GradientTape and float64 finite
differences."""

import json
import os
import shutil

import numpy as np
import pytest

import nnpartials
from nnpartials import tolerances
from nnpartials.errors import BundleError, ExportError, InputError, OrderNotAvailableError, ValidationError

N = 300


def _tape(model, xs):
    from nnpartials.exporter.keras_export import load_model
    from nnpartials.exporter.reference import tf_hessian

    return tf_hessian(load_model(model), xs)


def _points(n, n_in, seed=0, scale=1.5):
    return np.random.default_rng(seed).normal(0.5, scale, (n, n_in)).astype(np.float32)


@pytest.fixture(scope="module")
def physics(tmp_path_factory):
    """A small physics-like network: 3 inputs, tanh layers, 2 outputs, exported with order=2."""
    import models

    model = models.dense_model("tanh", n_in=3, units=(32, 32), n_out=2, seed=3)
    out = tmp_path_factory.mktemp("so") / "physics"
    nnpartials.export(model, out, order=2, n_validation=300)
    return model, str(out)


@pytest.fixture(scope="module")
def relu_bundle(tmp_path_factory):
    import models

    model = models.dense_model("relu", n_in=2, units=(16, 16), n_out=1, seed=1)
    out = tmp_path_factory.mktemp("so") / "relu"
    nnpartials.export(model, out, order=2, n_validation=200)
    return model, str(out)


def _assert_close(a, ref, tol=tolerances.SECOND_ORDER_F32):
    _, rel, _ = tolerances.scaled_error(a, ref)
    assert rel <= tol, rel


def test_export_order2_writes_the_graphs_and_the_manifest_section(physics):
    _, path = physics
    names = set(os.listdir(path))
    assert {"model.hess.onnx", "model.lap.onnx", "model.hvp.onnx"} <= names
    m = json.loads(open(os.path.join(path, "manifest.json")).read())
    so = m["second_order"]
    assert so["hessian"]["shape"] == ["batch", 2, 3, 3] and so["laplacian"]["shape"] == ["batch", 2]
    assert so["hvp"]["shape"] == ["batch", 2, 3] and so["hvp"]["input"]
    assert so["laplacian"]["method"] == "forward-laplacian"
    assert so["zero_almost_everywhere"] is False
    assert so["validation"]["passed"] and so["validation"]["points"] == 300
    assert so["validation"]["max_rel"] <= tolerances.EXPORT_SECOND_ORDER
    b = nnpartials.load_bundle(path)
    assert b.order == 2 and not b.second_derivatives_vanish
    v = json.loads(open(os.path.join(path, "validation.json")).read())["second_order"]
    assert v["reference"] == "tensorflow nested GradientTape" and v["passed"]


@pytest.mark.parametrize("backend", ["onnxruntime", "c"])
def test_partials_second_order_match_nested_gradient_tape(physics, backend):
    model, path = physics
    x = _points(N, 3, seed=7)
    y_ref, J_ref, H_ref = _tape(model, [x])
    p = nnpartials.Partials(path, backend=backend)
    y, J, H = p.hessian(x)
    assert H.shape == (N, 2, 3, 3) and H.dtype == np.float32
    _assert_close(y, y_ref, tolerances.FORWARD_F32)
    _assert_close(J, J_ref, tolerances.JACOBIAN_F32)
    _assert_close(H, H_ref)
    # the check has something to compare: errors are also small against the Hessian's own size
    assert np.max(np.abs(H_ref)) > 0.01
    assert np.max(np.abs(H - H_ref)) <= 1e-3 * np.max(np.abs(H_ref))
    y2, J2, lap = p.laplacian(x)
    assert lap.shape == (N, 2)
    _assert_close(lap, np.einsum("bijj->bi", H_ref))
    _assert_close(J2, J_ref, tolerances.JACOBIAN_F32)
    v = _points(N, 3, seed=8, scale=1.0)
    y3, hv = p.hvp(x, v)
    assert hv.shape == (N, 2, 3)
    _assert_close(hv, np.einsum("bijk,bk->bij", H_ref, v.astype(np.float64)))
    # one direction for every point
    _, hv1 = p.hvp(x, v[0])
    _assert_close(hv1, np.einsum("bijk,k->bij", H_ref, v[0].astype(np.float64)))


def test_second_order_splits_large_batches_like_one_call(physics):
    _, path = physics
    x = _points(50, 3, seed=2)
    whole = nnpartials.Partials(path).hessian(x)
    split = nnpartials.Partials(path, max_batch=7).hessian(x)
    for a, b in zip(whole, split):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    v = _points(50, 3, seed=3)
    np.testing.assert_allclose(nnpartials.Partials(path, max_batch=7).hvp(x, v)[1],
                               nnpartials.Partials(path).hvp(x, v)[1], rtol=1e-6, atol=1e-6)


def test_hvp_and_hessian_input_errors(physics):
    _, path = physics
    p = nnpartials.Partials(path)
    x = _points(4, 3)
    with pytest.raises(InputError, match=r"v: expected 4 directions"):
        p.hvp(x, _points(3, 3))
    with pytest.raises(InputError, match="v"):
        p.hvp(x, _points(4, 2))
    bad = _points(4, 3)
    bad[1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        p.hvp(x, bad)
    with pytest.raises(InputError):
        p.hessian(_points(4, 5))
    y, hv = p.hvp(x, bad, nan_policy="propagate")
    assert np.isnan(hv[1]).all() and np.isfinite(hv[[0, 2, 3]]).all()


def test_an_order1_bundle_says_how_to_get_second_derivatives(seed_bundle, tmp_path):
    from nnpartials.cli import main

    p = nnpartials.Partials(seed_bundle)
    for call in (lambda: p.hessian([[1.0, 2.0]]), lambda: p.laplacian([[1.0, 2.0]]),
                 lambda: p.hvp([[1.0, 2.0]], [[1.0, 0.0]])):
        with pytest.raises(OrderNotAvailableError, match="--order 2"):
            call()
    np.savetxt(tmp_path / "x.csv", [[1.0, 2.0]], delimiter=",")
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "x.csv"), "-o", str(tmp_path / "o.csv"),
                 "--order", "2"]) == 1
    assert not (tmp_path / "o.csv").exists()


def test_piecewise_linear_network_says_its_second_derivatives_vanish(relu_bundle, capsys):
    from nnpartials.cli import main

    model, path = relu_bundle
    b = nnpartials.load_bundle(path)
    assert b.second_derivatives_vanish
    assert "zero almost everywhere" in b.manifest["second_order"]["note"]
    assert "Relu" in b.manifest["second_order"]["note"]
    x = _points(200, 2, seed=4)
    _, _, H = nnpartials.Partials(path).hessian(x)
    _, _, H_ref = _tape(model, [x])
    assert np.all(H == 0) and np.all(H_ref == 0)
    assert main(["check", path, "--n-points", "50"]) == 0
    out = capsys.readouterr().out
    assert "zero almost everywhere" in out


def test_check_compares_every_second_order_path(physics, tmp_path):
    from nnpartials.runtime.check import check_bundle

    _, path = physics
    rep = check_bundle(path, n_points=100)
    assert rep.ok, [(c.name, c.max_rel) for c in rep.comparisons if not c.ok]
    names = {c.name for c in rep.comparisons}
    assert {"d2y_dx2 vs float64 FD of model.jac.onnx", "laplacian vs trace of float64 FD", "hvp vs float64 FD @ v",
            "d2y_dx2 (C core)", "laplacian (C core)", "hvp (C core)", "d2y_dx2 (C core) vs C FD"} <= names
    assert rep.order == 2 and not rep.second_derivatives_vanish


def test_check_fails_on_a_tampered_hessian_graph(physics, tmp_path):
    """A Hessian graph replaced by one of another network (hashes updated) fails `check`."""
    import models

    from nnpartials.bundle import _sha256
    from nnpartials.runtime.check import check_bundle

    _, path = physics
    other = tmp_path / "other"
    nnpartials.export(models.dense_model("tanh", n_in=3, units=(32, 32), n_out=2, seed=9), other, order=2,
                      n_validation=50)
    dst = tmp_path / "tampered"
    shutil.copytree(path, dst)
    data = (other / "model.hess.onnx").read_bytes()
    (dst / "model.hess.onnx").write_bytes(data)
    m = json.loads((dst / "manifest.json").read_text())
    m["files"]["model.hess.onnx"] = {"sha256": _sha256(data), "bytes": len(data)}
    (dst / "manifest.json").write_text(json.dumps(m))
    rep = check_bundle(str(dst), n_points=50)
    assert not rep.ok
    assert not rep.comparison("d2y_dx2 vs float64 FD of model.jac.onnx").ok


@pytest.mark.parametrize("ext", [".csv", ".npz", ".npy", ".parquet"])
def test_cli_partials_order2_writes_second_partials(physics, tmp_path, ext):
    import pandas as pd

    from nnpartials.cli import main

    _, path = physics
    x = _points(20, 3, seed=11)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / f"o{ext}"
    assert main(["partials", path, "-i", str(tmp_path / "x.npy"), "-o", str(out), "--order", "2", "--chunk",
                 "8"]) == 0
    y, J, H = nnpartials.Partials(path).hessian(x)
    if ext == ".npy":
        np.testing.assert_allclose(np.load(out), H, rtol=1e-6, atol=1e-6)
        return
    if ext == ".npz":
        z = np.load(out)
        np.testing.assert_allclose(z["d2y_dx2"], H, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(z["dy_dx"], J, rtol=1e-6, atol=1e-6)
        return
    t = pd.read_csv(out) if ext == ".csv" else pd.read_parquet(out)
    # one column per output and pair j <= k: 2 outputs x 6 pairs
    second = [c for c in t.columns if c.startswith("d2")]
    assert len(second) == 12
    assert "d2y1/dx1dx1" in second and "d2y2/dx2dx3" in second and "d2y1/dx3dx2" not in second
    np.testing.assert_allclose(t["d2y2/dx2dx3"], H[:, 1, 1, 2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["d2y1/dx1dx1"], H[:, 0, 0, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["dy2/dx3"], J[:, 1, 2], rtol=1e-5, atol=1e-6)


def test_dask_order2_equals_in_process(physics):
    import dask
    import dask.array as da
    import dask.dataframe as dd
    import pandas as pd

    import nnpartials.dask as nd

    _, path = physics
    x = _points(100, 3, seed=12)
    y, J, H = nnpartials.Partials(path).hessian(x)
    with dask.config.set(scheduler="synchronous"):
        dy, dJ, dH = nd.partials(path, da.from_array(x, chunks=(30, 3)), order=2)
        assert dH.shape == (100, 2, 3, 3)
        ry, rJ, rH = dask.compute(dy, dJ, dH)
        np.testing.assert_array_equal(rH, H)
        np.testing.assert_array_equal(rJ, J)
        frame = dd.from_pandas(pd.DataFrame({"x3": x[:, 2], "x1": x[:, 0], "x2": x[:, 1]}), npartitions=3)
        t = nd.partials(path, frame, order=2).compute()
    np.testing.assert_array_equal(t["d2y1/dx2dx3"].to_numpy(), H[:, 0, 1, 2])


def test_export_order_argument_and_size_checks(tmp_path):
    import models

    with pytest.raises(ExportError, match="order must be 1"):
        nnpartials.export(models.dense_model("tanh"), tmp_path / "b", order=3)
    assert not (tmp_path / "b").exists()


def test_failed_second_order_validation_writes_nothing(tmp_path, monkeypatch):
    import models

    from nnpartials.exporter import bundle as writer

    real = writer.validate_second_order

    def strict(*a, **kw):
        kw["tolerance"] = 0.0
        return real(*a, **kw)

    monkeypatch.setattr(writer, "validate_second_order", strict)
    with pytest.raises(ValidationError, match="second-order graphs differ"):
        nnpartials.export(models.dense_model("tanh", n_in=2, units=(8,), n_out=1), tmp_path / "b", order=2,
                          n_validation=50)
    assert not (tmp_path / "b").exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("field,value,match", [
    (("hessian", "shape"), ["batch", 2, 3, 4], "second_order.hessian.shape"),
    (("laplacian", "method"), "guess", "second_order.laplacian.method"),
    (("hvp", "file"), "other.onnx", "second_order.hvp.file"),
    (("zero_almost_everywhere",), "no", "zero_almost_everywhere"),
])
def test_malformed_second_order_manifest_is_refused(physics, tmp_path, field, value, match):
    _, path = physics
    dst = tmp_path / "b"
    shutil.copytree(path, dst)
    m = json.loads((dst / "manifest.json").read_text())
    obj = m["second_order"]
    for k in field[:-1]:
        obj = obj[k]
    obj[field[-1]] = value
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        nnpartials.load_bundle(str(dst))


def test_second_order_file_missing_from_the_list_is_refused(physics, tmp_path):
    _, path = physics
    dst = tmp_path / "b"
    shutil.copytree(path, dst)
    m = json.loads((dst / "manifest.json").read_text())
    del m["files"]["model.lap.onnx"]
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="model.lap.onnx"):
        nnpartials.load_bundle(str(dst))


def test_multi_input_multi_output_order2(tmp_path):
    import models

    model = models.multi_input_model()
    out = tmp_path / "multi"
    nnpartials.export(model, out, order=2, n_validation=200)
    a, b = _points(200, 2, seed=1), _points(200, 3, seed=2)
    _, _, H_ref = _tape(model, [a, b])
    p = nnpartials.Partials(str(out))
    _, _, H = p.hessian({"a": a, "b": b})
    assert H.shape == (200, 3, 5, 5)
    _assert_close(H, H_ref)
    _, _, lap = p.laplacian([a, b])
    _assert_close(lap, np.einsum("bijj->bi", H_ref))
    v = _points(200, 5, seed=3)
    _, hv = p.hvp(np.concatenate([a, b], axis=1), v)
    _assert_close(hv, np.einsum("bijk,bk->bij", H_ref, v.astype(np.float64)))


def test_softsign_order2_falls_back_to_finite_differences(tmp_path):
    """TensorFlow has no second derivative of softsign: export validates against float64 finite differences of the
    Jacobian graph instead, and says so; the graphs match nested central differences of the forward model."""
    import models

    model = models.dense_model("softsign", n_in=2, units=(8,), n_out=1, seed=2)
    b = nnpartials.export(model, tmp_path / "s", order=2, n_validation=100)
    ref = b.manifest["second_order"]["validation"]["reference"]
    assert ref.startswith("float64 central differences of the Jacobian graph")
    import onnx

    from nnpartials.onnx_reference import Float64Graph

    fwd = Float64Graph(onnx.load_model_from_string(b.read("model.onnx")))  # the forward graph in float64
    x = _points(50, 2, seed=5).astype(np.float32).astype(np.float64)
    h = 1e-4
    f = lambda z: fwd.forward([z])  # noqa: E731
    H_fd = np.zeros((50, 1, 2, 2))
    for j in range(2):
        for k in range(2):
            ej, ek = np.eye(2)[j] * h, np.eye(2)[k] * h
            H_fd[:, :, j, k] = (f(x + ej + ek) - f(x + ej - ek) - f(x - ej + ek) + f(x - ej - ek)) / (4 * h * h)
    _, _, H = nnpartials.Partials(b).hessian(x.astype(np.float32))
    assert np.max(np.abs(H_fd)) > 0.01
    _assert_close(H, H_fd, 1e-5)
