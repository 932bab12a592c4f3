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
from nnpartials.bundle import load_bundle


def copy_bundle(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def rewrite(dst, name, data):
    """Replace a file and update its hash in the manifest (so only the content check can catch it)."""
    (dst / name).write_bytes(data)
    m = json.loads((dst / "manifest.json").read_text())
    m["files"][name]["sha256"] = hashlib.sha256(data).hexdigest()
    m["files"][name]["bytes"] = len(data)
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
    m = keras.Model(inp, keras.layers.Lambda(lambda t: keras.ops.cumsum(t, axis=1))(keras.layers.Dense(4)(inp)))
    with pytest.raises(UnsupportedOpError, match="CumSum"):
        nnpartials.export(m, tmp_path / "cumsum")
    assert not (tmp_path / "cumsum").exists()


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


# ----- output folder safety (export -o/-f) ------------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading a model fail loudly: destination checks must refuse before any work."""
    from nnpartials.exporter import keras_export

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(keras_export, "load_model", boom)


def fake_bundle(folder):
    """A folder that looks like a bundle to the overwrite check (manifest.json with the bundle format)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "nnpartials-bundle"}))
    (folder / "precious.txt").write_text("keep me")
    return folder


@pytest.mark.parametrize("where", [".", "..", "home", "/"])
def test_force_never_replaces_working_parent_home_or_root(tmp_path, monkeypatch, no_model_load, where):
    fake_bundle(tmp_path)  # all of them look like bundles: still refused
    work = fake_bundle(tmp_path / "work")
    fake_bundle(tmp_path / "home")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    target = {"home": os.path.expanduser("~")}.get(where, where)
    with pytest.raises(ExportError, match="refusing to write the bundle over"):
        nnpartials.export("model.keras", target, overwrite=True)
    for folder in (tmp_path, work, tmp_path / "home"):
        assert (folder / "precious.txt").read_text() == "keep me"


def test_cli_export_dot_force_refuses_and_keeps_files(tmp_path, monkeypatch, no_model_load, capsys):
    from nnpartials.cli import main

    (tmp_path / "data.csv").write_text("1,2\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["export", "model.keras", "-o", ".", "-f"]) == 1
    assert "refusing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "sub"]


@pytest.mark.parametrize("content", ["notes", "other manifest", "manifest link", "manifest folder"])
def test_force_refuses_a_folder_that_is_not_a_bundle(tmp_path, no_model_load, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    if content == "other manifest":
        (out / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    elif content == "manifest link":
        fake_bundle(tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere" / "manifest.json", out / "manifest.json")
    elif content == "manifest folder":
        (out / "manifest.json").mkdir()
    with pytest.raises(ExportError, match="not an nnpartials bundle.*notes.txt"):
        nnpartials.export("model.keras", out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes"


def test_output_naming_a_file_or_link_is_refused(tmp_path, no_model_load):
    f = tmp_path / "bundle"
    f.write_text("a file")
    with pytest.raises(ExportError, match="existing file"):
        nnpartials.export("model.keras", f, overwrite=True)
    assert f.read_text() == "a file"
    link = tmp_path / "link"
    os.symlink(fake_bundle(tmp_path / "target"), link)
    for name in (str(link), str(link) + os.sep):
        with pytest.raises(ExportError, match="symbolic link"):
            nnpartials.export("model.keras", name, overwrite=True)
    assert (tmp_path / "target" / "precious.txt").exists()


def test_export_into_an_empty_folder_and_replace_a_bundle_follow_the_umask(tmp_path):
    m = models.dense_model("tanh", n_in=2, units=(4,), n_out=1)
    out = tmp_path / "out"
    out.mkdir()
    old = os.umask(0o022)
    try:
        b = nnpartials.export(m, out, n_validation=50)
        assert os.stat(out).st_mode & 0o777 == 0o755
        for name in os.listdir(out):
            assert os.stat(out / name).st_mode & 0o777 == 0o644, name
        (out / "extra.txt").write_text("from the old bundle")
        os.umask(0o027)
        nnpartials.export(m, out, n_validation=50, overwrite=True)
        assert os.stat(out).st_mode & 0o777 == 0o750
        assert {os.stat(out / n).st_mode & 0o777 for n in os.listdir(out)} == {0o640}
    finally:
        os.umask(old)
    assert not (out / "extra.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old folders left beside it
    assert load_bundle(out).manifest["files"] == b.manifest["files"]


def test_replacement_is_atomic_when_the_swap_fails(seed_bundle, tmp_path, monkeypatch):
    from nnpartials.exporter import bundle as bundle_mod

    out = copy_bundle(seed_bundle, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_mod.os, "replace", failing_replace)
    with pytest.raises((ExportError, OSError)):
        bundle_mod._write_atomically(str(out), {"model.onnx": b"new"}, manifest, True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old bundle, whole, where it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ----- hostile bundle files -----------------------------------------------------------------------------------
LOAD_IN_CHILD = """
import sys
from nnpartials.errors import BundleError
from nnpartials.bundle import load_bundle
try:
    load_bundle(sys.argv[1])
except BundleError as exc:
    print("BundleError:", exc)
    sys.exit(3)
print("loaded")
"""


def load_in_child(path, timeout=120):
    """load_bundle in a child process with a memory cap and a timeout, so a regression fails instead of hanging
    or exhausting memory."""
    import subprocess
    import sys

    def limits():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    r = subprocess.run([sys.executable, "-c", LOAD_IN_CHILD, str(path)], capture_output=True, text=True,
                       timeout=timeout, preexec_fn=limits)
    return r.returncode, r.stdout + r.stderr


posix_only = pytest.mark.skipif(os.name != "posix" or not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs/devices")


@posix_only
@pytest.mark.parametrize("name, kind", [("model.nnp", "dev-zero link"), ("manifest.json", "dev-zero link"),
                                        ("model.jac.onnx", "fifo")])
def test_special_files_are_refused_quickly(seed_bundle, tmp_path, name, kind):
    dst = copy_bundle(seed_bundle, tmp_path)
    os.remove(dst / name)
    if kind == "fifo":
        os.mkfifo(dst / name)
    else:
        os.symlink("/dev/zero", dst / name)
    rc, out = load_in_child(dst)
    assert rc == 3 and "BundleError" in out and name in out, out
    assert ("FIFO" if kind == "fifo" else "symbolic link") in out


def test_symlink_to_a_matching_file_is_refused(seed_bundle, tmp_path):
    dst = copy_bundle(seed_bundle, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.move(dst / "model.onnx", outside)
    os.symlink(outside, dst / "model.onnx")  # same bytes, same hash: still refused
    with pytest.raises(BundleError, match="model.onnx: expected a regular file, found a symbolic link"):
        load_bundle(dst)


def test_file_larger_than_listed_is_refused(seed_bundle, tmp_path):
    dst = copy_bundle(seed_bundle, tmp_path)
    with open(dst / "validation.json", "ab") as f:
        f.write(b" " * 4096)
    with pytest.raises(BundleError, match="validation.json: .*more than the"):
        load_bundle(dst)


def test_manifest_over_the_size_cap_is_refused(seed_bundle, tmp_path):
    from nnpartials.bundle import MAX_MANIFEST_BYTES

    dst = copy_bundle(seed_bundle, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m["padding"] = "x" * MAX_MANIFEST_BYTES
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json: .*more than the"):
        load_bundle(dst)


# ----- external data in subgraphs -----------------------------------------------------------------------------
def _external_tensor(name="w_ext"):
    from onnx import helper
    from onnx.external_data_helper import set_external_data

    t = helper.make_tensor(name, onnx.TensorProto.FLOAT, [1], b"\0\0\0\0", raw=True)
    set_external_data(t, location="weights.bin")  # relative: onnxruntime would read it from the working folder
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    return t


def _if_model(where):
    from onnx import helper

    F = onnx.TensorProto.FLOAT
    const = helper.make_tensor("c", F, [1], [1.0])

    def branch(name, out, external_as):
        if external_as == "initializer":
            return helper.make_graph([helper.make_node("Identity", ["w_ext"], [out])], name, [],
                                     [helper.make_tensor_value_info(out, F, [1])], initializer=[_external_tensor()])
        value = _external_tensor() if external_as == "constant" else const
        return helper.make_graph([helper.make_node("Constant", [], [out], value=value)], name, [],
                                 [helper.make_tensor_value_info(out, F, [1])])

    then_g = branch("then", "t_out", "initializer" if where == "then initializer" else None)
    else_g = branch("else", "e_out", "constant" if where == "else constant" else None)
    if where == "nested":  # If inside the then-branch of another If, external data in the inner else-branch
        inner = helper.make_node("If", ["cond"], ["t_out"], then_branch=branch("inner_then", "it", None),
                                 else_branch=branch("inner_else", "ie", "initializer"))
        then_g = helper.make_graph([inner], "then", [], [helper.make_tensor_value_info("t_out", F, [1])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", F, [1])])
    if where == "sparse initializer":
        values = _external_tensor()
        indices = helper.make_tensor("w_idx", onnx.TensorProto.INT64, [1], [0])
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("where", ["then initializer", "else constant", "nested", "sparse initializer"])
def test_external_data_anywhere_in_the_graph_is_refused(seed_bundle, tmp_path, where):
    dst = copy_bundle(seed_bundle, tmp_path)
    (dst / "weights.bin").write_bytes(b"\0" * 4)
    rewrite(dst, "model.onnx", _if_model(where).SerializeToString())
    with pytest.raises(BundleError, match=r"model.onnx references external data \(tensor 'w_ext' in "):
        load_bundle(dst)


# ----- malformed manifests ------------------------------------------------------------------------------------
def _set(path, value):
    def change(m):
        obj = m
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return change


def _drop(*path):
    def change(m):
        obj = m
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]
    return change


def _rename_file(new):
    def change(m):
        m["files"][new] = m["files"].pop("validation.json")
    return change


MALFORMED = {
    "empty file name": (_rename_file(""), "files"),
    "NUL in file name": (_rename_file("validation\0.json"), "files"),
    "hidden file name": (_rename_file(".validation.json"), "files"),
    "manifest lists itself": (_rename_file("manifest.json"), "files"),
    "manifest lists the signature": (_rename_file("model.sig"), "files"),
    "files not an object": (_set(["files"], [["model.onnx"]]), "files"),
    "file entry not an object": (_set(["files", "validation.json"], "abc"), "files\\['validation.json'\\]"),
    "sha256 not hex": (_set(["files", "validation.json", "sha256"], "zz" * 32), "sha256"),
    "sha256 a number": (_set(["files", "validation.json", "sha256"], 12), "sha256"),
    "bytes missing": (_drop("files", "validation.json", "bytes"), "bytes"),
    "bytes negative": (_set(["files", "validation.json", "bytes"], -1), "bytes"),
    "bytes a string": (_set(["files", "validation.json", "bytes"], "491"), "bytes"),
    "bytes a boolean": (_set(["files", "validation.json", "bytes"], True), "bytes"),
    "inputs not a list": (_set(["inputs"], {"name": "x"}), "inputs"),
    "inputs empty": (_set(["inputs"], []), "inputs"),
    "input not an object": (_set(["inputs", 0], "x"), "inputs\\[0\\]"),
    "input name empty": (_set(["inputs", 0, "name"], ""), "inputs\\[0\\].name"),
    "input name with NUL": (_set(["inputs", 0, "name"], "x\0"), "inputs\\[0\\].name"),
    "input name a number": (_set(["inputs", 0, "name"], 3), "inputs\\[0\\].name"),
    "input shape missing": (_drop("inputs", 0, "shape"), "inputs\\[0\\].shape"),
    "width a string": (_set(["inputs", 0, "shape", 1], "x"), "inputs\\[0\\].shape\\[1\\]"),
    "width negative": (_set(["inputs", 0, "shape", 1], -1), "inputs\\[0\\].shape\\[1\\]"),
    "width zero": (_set(["inputs", 0, "shape", 1], 0), "inputs\\[0\\].shape\\[1\\]"),
    "width a float": (_set(["inputs", 0, "shape", 1], 1e9), "inputs\\[0\\].shape\\[1\\]"),
    "width a boolean": (_set(["inputs", 0, "shape", 1], True), "inputs\\[0\\].shape\\[1\\]"),
    "shape without batch": (_set(["inputs", 0, "shape"], [2]), "inputs\\[0\\].shape"),
    "columns wrong length": (_set(["inputs", 0, "columns"], ["x1"]), "inputs\\[0\\].columns"),
    "columns not a list": (_set(["inputs", 0, "columns"], "x1,x2"), "inputs\\[0\\].columns"),
    "column a number": (_set(["inputs", 0, "columns"], ["x1", 2]), "inputs\\[0\\].columns\\[1\\]"),
    "input dtype": (_set(["inputs", 0, "dtype"], "float16"), "inputs\\[0\\].dtype"),
    "mixed precision": (_set(["inputs", 0, "dtype"], "float64"), "one precision"),
    "tensor_shape product": (_set(["inputs", 0, "tensor_shape"], ["batch", 3, 1]), "inputs\\[0\\].tensor_shape"),
    "tensor_shape no batch": (_set(["inputs", 0, "tensor_shape"], [2, 1]), "inputs\\[0\\].tensor_shape"),
    "y missing": (_drop("y"), "y"),
    "y not an object": (_set(["y"], [1]), "y"),
    "y width a string": (_set(["y", "shape", 1], "1"), "y.shape\\[1\\]"),
    "y columns wrong length": (_set(["y", "columns"], ["a", "b"]), "y.columns"),
    "jacobian missing": (_drop("jacobian"), "jacobian"),
    "jacobian mode": (_set(["jacobian", "mode"], "sideways"), "jacobian.mode"),
    "jacobian outputs wrong length": (_set(["jacobian", "outputs"], []), "jacobian.outputs"),
    "jacobian output shape": (_set(["jacobian", "outputs", 0, "shape"], ["batch", 2, 1]),
                              "jacobian.outputs\\[0\\].shape"),
    "jacobian output input": (_set(["jacobian", "outputs", 0, "input"], "z"), "jacobian.outputs\\[0\\].input"),
    "outputs widths": (_set(["outputs"], [{"name": "o", "width": 5}]), "outputs"),
    "normalization not an object": (_set(["input_normalization"], "yes"), "input_normalization"),
    "normalization std zero": (_set(["input_normalization", "std"], [0.0, 1.0]), "input_normalization.std\\[0\\]"),
    "sample box wrong length": (_set(["sample_box"], [[0, 1]]), "sample_box"),
    "c_core not an object": (_set(["c_core"], "yes"), "c_core"),
    "manifest a list": (lambda m: [m], "expected format"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_field_is_a_bundle_error(seed_bundle, tmp_path, case):
    change, field = MALFORMED[case]
    dst = copy_bundle(seed_bundle, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m = change(m) or m
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=field):
        load_bundle(dst)


@pytest.mark.parametrize("case", ["deep nesting", "duplicate key", "NaN", "not UTF-8", "listed file is a folder"])
def test_malformed_manifest_text_is_a_bundle_error(seed_bundle, tmp_path, case):
    dst = copy_bundle(seed_bundle, tmp_path)
    mpath = dst / "manifest.json"
    text = mpath.read_text()
    if case == "deep nesting":
        mpath.write_text(text[:-2] + ', "deep": ' + "[" * 200000 + "]" * 200000 + "}\n")
    elif case == "duplicate key":
        mpath.write_text(text[:-2] + ', "inputs": []}\n')
    elif case == "NaN":
        mpath.write_text(text.replace('"max_rel": ', '"max_rel": NaN, "x": ', 1))
    elif case == "not UTF-8":
        mpath.write_bytes(text.encode("utf-16"))
    else:
        os.remove(dst / "validation.json")
        os.mkdir(dst / "validation.json")
    with pytest.raises(BundleError, match="manifest.json|validation.json: expected a regular file, found a folder"):
        load_bundle(dst)
