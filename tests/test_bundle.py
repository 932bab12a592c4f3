"""Bundle contents, manifest, hashes, and refusal of damaged bundles."""

import hashlib
import json
import os
import shutil

import numpy as np
import onnx
import pytest

import models
import nnpartials
from nnpartials.errors import BundleError, ExportError, UnsupportedOpError, ValidationError
from nnpartials.exporter.bundle import load_bundle


def copy_bundle(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def rewrite(dst, name, data):
    """Replace a file and update its hash in the manifest (so only the content check can catch it)."""
    (dst / name).write_bytes(data)
    m = json.loads((dst / "manifest.json").read_text())
    m["files"][name]["sha256"] = hashlib.sha256(data).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(m))


def test_bundle_files_and_manifest(seed_bundle):
    names = set(os.listdir(seed_bundle))
    assert {"manifest.json", "model.onnx", "model.jac.onnx", "validation.json"} <= names
    m = json.loads(open(os.path.join(seed_bundle, "manifest.json")).read())
    assert m["format_version"] == 1 and m["opset"] == 17
    assert m["inputs"] == [{"name": "x", "shape": ["batch", 2], "dtype": "float32", "columns": ["x1", "x2"]}]
    assert m["y"]["shape"] == ["batch", 1]
    assert m["jacobian"]["layout"] == "dy_dx[b, i, j] = d y[b, i] / d x[b, j]"
    assert m["jacobian"]["mode"] == "reverse"  # n_out = 1 < n_in = 2
    assert m["validation"]["passed"] and m["validation"]["points"] >= 1000
    for name, meta in m["files"].items():
        data = open(os.path.join(seed_bundle, name), "rb").read()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"]
    for key in ("tensorflow", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        assert any(k.startswith(key) for k in m["tools"]), key
    v = json.loads(open(os.path.join(seed_bundle, "validation.json")).read())
    assert v["jacobian"]["x"]["max_rel"] <= nnpartials.tolerances.EXPORT_VALIDATION
    # the normalization statistics are recorded for the diagnostics
    norm = m["input_normalization"]
    t = np.linspace(0, 6 * np.pi, 2000)
    np.testing.assert_allclose(norm["mean"], [t.mean(), 1.5 * t.mean()], rtol=1e-4)


def test_both_graphs_pass_full_check_and_are_self_contained(seed_bundle):
    for name in ("model.onnx", "model.jac.onnx"):
        model = onnx.load(os.path.join(seed_bundle, name), load_external_data=False)
        onnx.checker.check_model(model, full_check=True)
        assert not any(i.external_data for i in model.graph.initializer)
    jac = onnx.load(os.path.join(seed_bundle, "model.jac.onnx"))
    assert [o.name for o in jac.graph.output] == ["y", "dy_dx"]
    dims = [d.dim_param or d.dim_value for d in jac.graph.output[1].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 2]


def test_multi_input_manifest(multi_bundle):
    m = load_bundle(multi_bundle).manifest
    assert [i["name"] for i in m["inputs"]] == ["a", "b"]
    assert [o["name"] for o in m["jacobian"]["outputs"]] == ["dy_dx__a", "dy_dx__b"]
    assert m["y"]["shape"] == ["batch", 3]
    assert not m["c_core"]["available"] and m["c_core"]["reason"]


def test_missing_file_is_refused(seed_bundle, tmp_path):
    dst = copy_bundle(seed_bundle, tmp_path)
    os.remove(dst / "model.jac.onnx")
    with pytest.raises(BundleError, match="missing model.jac.onnx"):
        nnpartials.Partials(dst)


def test_changed_file_is_refused(seed_bundle, tmp_path):
    dst = copy_bundle(seed_bundle, tmp_path)
    data = bytearray((dst / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dst / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(dst)


def test_truncated_onnx_is_refused_even_with_matching_hash(seed_bundle, tmp_path):
    dst = copy_bundle(seed_bundle, tmp_path)
    rewrite(dst, "model.jac.onnx", (dst / "model.jac.onnx").read_bytes()[:500])
    with pytest.raises(BundleError, match="model.jac.onnx"):
        nnpartials.Partials(dst)


def test_external_data_reference_is_refused(seed_bundle, tmp_path):
    dst = copy_bundle(seed_bundle, tmp_path)
    model = onnx.load(str(dst / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data) or 0)
    from onnx.external_data_helper import set_external_data

    set_external_data(init, location="../../etc/passwd")
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    rewrite(dst, "model.onnx", model.SerializeToString())
    with pytest.raises(BundleError, match="external data"):
        load_bundle(dst)


@pytest.mark.parametrize("damage", ["not json", "wrong format", "wrong version", "path traversal", "no manifest"])
def test_bad_manifest_is_refused(seed_bundle, tmp_path, damage):
    dst = copy_bundle(seed_bundle, tmp_path)
    mpath = dst / "manifest.json"
    m = json.loads(mpath.read_text())
    if damage == "not json":
        mpath.write_text("{ this is not json")
    elif damage == "wrong format":
        m["format"] = "something-else"
        mpath.write_text(json.dumps(m))
    elif damage == "wrong version":
        m["format_version"] = 99
        mpath.write_text(json.dumps(m))
    elif damage == "path traversal":
        m["files"]["../model.onnx"] = m["files"]["model.onnx"]
        mpath.write_text(json.dumps(m))
    else:
        os.remove(mpath)
    with pytest.raises(BundleError):
        load_bundle(dst)


def test_not_a_folder(tmp_path):
    with pytest.raises(BundleError, match="not a folder"):
        load_bundle(tmp_path / "nope")


def test_export_refuses_non_empty_folder(seed_bundle):
    with pytest.raises(ExportError, match="not empty"):
        nnpartials.export(models.dense_model("tanh"), seed_bundle)


def test_validation_failure_writes_nothing(tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(ValidationError, match="GradientTape"):
        nnpartials.export(models.dense_model("tanh"), out, tolerance=0.0)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nnp-export-")]


def test_op_without_rule_fails_export_naming_op(tmp_path):
    import keras

    inp = keras.Input((3,), name="x")
    m = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(inp))
    with pytest.raises(UnsupportedOpError, match="Softmax"):
        nnpartials.export(m, tmp_path / "softmax")
    assert not (tmp_path / "softmax").exists()


def test_export_from_keras_file_and_saved_model(tmp_path):
    m = models.dense_model("elu", n_in=3, n_out=2)
    path = tmp_path / "m.keras"
    m.save(path)
    b1 = nnpartials.export(path, tmp_path / "from_file")
    sm = tmp_path / "sm"
    m.export(str(sm), verbose=False)
    b2 = nnpartials.export(sm, tmp_path / "from_saved_model")
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    y1, j1 = nnpartials.Partials(b1).jacobian(x)
    y2, j2 = nnpartials.Partials(b2).jacobian(x)
    np.testing.assert_allclose(y1, m(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j1, j2, rtol=1e-5, atol=1e-6)


def test_export_bad_model_path(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        nnpartials.export(tmp_path / "missing.keras", tmp_path / "o")
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"garbage")
    with pytest.raises(ExportError, match="could not load"):
        nnpartials.export(bad, tmp_path / "o")


def test_export_with_user_data_records_origin(tmp_path):
    m = models.dense_model("tanh", n_in=3)
    data = np.random.default_rng(3).normal(size=(1500, 3))
    b = nnpartials.export(m, tmp_path / "d", data=data, mode="forward")
    assert b.manifest["validation"]["points_from"] == "data"
    assert b.manifest["validation"]["points"] == 1000
    assert b.manifest["jacobian"]["mode"] == "forward"
    with pytest.raises(nnpartials.InputError, match="3 features"):
        nnpartials.export(m, tmp_path / "e", data=np.zeros((10, 4)))
