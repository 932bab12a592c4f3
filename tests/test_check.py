"""`check_bundle` and `nnpartials check`: the paths agree on a good bundle; a changed weight, a changed forward
graph, zero points are caught; a bundle without a C core is still checked against the float64 reference."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import nnpartials._core  # noqa: E402,F401  (built by pip install: a missing build fails, never skips)

from nnpartials import tolerances  # noqa: E402
from nnpartials.cli import main  # noqa: E402
from nnpartials.errors import InputError  # noqa: E402
from nnpartials.exporter.nnp import read_nnp, write_nnp  # noqa: E402
from nnpartials.runtime.check import check_bundle  # noqa: E402


def _copy_with(src, dst, name, data):
    """Copy a bundle, replace one file and update its hash in the manifest."""
    shutil.copytree(src, dst)
    mpath = os.path.join(dst, "manifest.json")
    with open(mpath) as f:
        manifest = json.load(f)
    if data is None:
        os.remove(os.path.join(dst, name))
        del manifest["files"][name]
        manifest["c_core"] = {"available": False, "file": None, "reason": "removed for a test"}
    else:
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data)
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    return str(dst)


def test_paths_agree_on_seed_bundle(seed_bundle):
    rep = check_bundle(seed_bundle, n_points=300)
    assert rep.ok, rep.to_dict()
    assert rep.n_points == 300 and rep.points_from.startswith("uniform")
    assert [c.name for c in rep.comparisons] == ["y (forward graph)", "dy_dx vs float64 FD of model.onnx",
                                                 "y (C core)", "dy_dx (C core)", "dy_dx (C core) vs C FD",
                                                 "dy_dx vs C FD"]
    assert rep.c_core
    assert rep.comparison("dy_dx (C core)").tolerance == tolerances.CHECK_PATHS_F32
    assert rep.fd_entries == 300 * 2
    assert rep.fd_entries_near_kink < rep.fd_entries // 10
    assert rep.c_fd_entries_near_kink < rep.fd_entries // 10
    assert 0 < rep.fd_error_max < tolerances.FD_F64_REL
    assert 0 < rep.c_fd_error_max < tolerances.FD_F64_REL
    d = rep.to_dict()
    assert d["ok"] is True and all(c["ok"] for c in d["comparisons"])


def test_given_points(seed_bundle):
    x = np.random.default_rng(3).uniform(-2, 2, (25, 2)).tolist()
    rep = check_bundle(seed_bundle, x=x)
    assert rep.ok and rep.n_points == 25 and rep.points_from == "given points"
    with pytest.raises(InputError):
        check_bundle(seed_bundle, x=np.zeros((3, 5)))
    with pytest.raises(InputError):
        check_bundle(seed_bundle, n_points=0)


def test_zero_points_fail(seed_bundle, tmp_path):
    with pytest.raises(InputError, match="0 rows"):
        check_bundle(seed_bundle, x=np.zeros((0, 2), np.float32))
    empty = tmp_path / "none.npy"
    np.save(empty, np.zeros((0, 2)))
    assert main(["check", seed_bundle, "--data", str(empty)]) == 1


def _tampered_forward(seed_bundle, dst):
    """The bundle with one weight of the forward graph changed and its hash recomputed consistently."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(os.path.join(seed_bundle, "model.onnx"))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight matrix
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return _copy_with(seed_bundle, dst, "model.onnx", m.SerializeToString())


def test_changed_forward_graph_is_caught(seed_bundle, tmp_path):
    bad = _tampered_forward(seed_bundle, tmp_path / "fwd")
    rep = check_bundle(bad, n_points=200)
    assert not rep.ok
    assert not rep.comparison("y (forward graph)").ok
    assert not rep.comparison("dy_dx vs float64 FD of model.onnx").ok
    assert main(["check", bad]) == 1

def test_changed_weight_is_caught(seed_bundle, tmp_path):
    with open(os.path.join(seed_bundle, "model.nnp"), "rb") as f:
        layers = read_nnp(f.read())
    layers[3].W[0, 0] += 0.5  # a visible change to one weight
    bad = _copy_with(seed_bundle, tmp_path / "bad", "model.nnp", write_nnp(layers, n_in=2))
    rep = check_bundle(bad, n_points=200)
    assert not rep.ok
    assert not rep.comparison("dy_dx (C core)").ok
    assert rep.comparison("dy_dx vs C FD").ok is False  # the C core's FD follows the (changed) C weights
    assert rep.comparison("dy_dx vs float64 FD of model.onnx").ok  # onnxruntime and model.onnx are unchanged
    assert main(["check", bad, "--n-points", "50"]) == 1


def test_bundle_without_c_weights(seed_bundle, tmp_path, capsys):
    """Without model.nnp, onnxruntime is still checked against float64 finite differences of model.onnx."""
    nod = _copy_with(seed_bundle, tmp_path / "noc", "model.nnp", None)
    rep = check_bundle(nod, n_points=200)
    assert rep.ok and not rep.c_core and rep.c_core_reason == "removed for a test"
    assert [c.name for c in rep.comparisons] == ["y (forward graph)", "dy_dx vs float64 FD of model.onnx"]
    assert rep.comparison("dy_dx vs float64 FD of model.onnx").entries > 300
    assert main(["check", nod]) == 0
    assert "removed for a test" in capsys.readouterr().out
    # and it still catches a changed forward graph
    bad = _copy_with(nod, tmp_path / "noc_fwd", "model.onnx",
                     open(_tampered_forward(seed_bundle, tmp_path / "t2") + "/model.onnx", "rb").read())
    assert not check_bundle(bad, n_points=100).ok
    assert main(["check", bad]) == 1


def test_cli(seed_bundle, tmp_path, capsys):
    csv = tmp_path / "pts.csv"
    cols = None
    with open(os.path.join(seed_bundle, "manifest.json")) as f:
        cols = [c for i in json.load(f)["inputs"] for c in i["columns"]]
    csv.write_text(",".join(reversed(cols)) + "\n" + "\n".join(f"{b},{a}" for a, b in
                                                                 np.random.default_rng(0).uniform(-1, 1, (30, 2))))
    out = tmp_path / "rep.json"
    assert main(["check", seed_bundle, "--data", str(csv), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "30 points" in text and "all paths agree" in text and "FD_F64_REL" in text
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["n_points"] == 30
    assert main(["check", seed_bundle, "--n-points", "20", "--seed", "4"]) == 0
    with pytest.raises(SystemExit) as e:  # a count below 1 is a usage error, before anything is loaded
        main(["check", seed_bundle, "--n-points", "0"])
    assert e.value.code == 2
    assert main(["check", str(tmp_path / "missing")]) == 1


def test_json_report_is_never_overwritten_silently(seed_bundle, tmp_path, capsys):
    """--json: an existing file is refused before any work (and left untouched) unless -f; a missing folder too."""
    out = tmp_path / "rep.json"
    out.write_text("my notes")
    assert main(["check", seed_bundle, "--n-points", "5", "--json", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "my notes"
    assert main(["check", seed_bundle, "--n-points", "5", "--json", str(out), "-f"]) == 0
    assert json.loads(out.read_text())["n_points"] == 5
    assert main(["check", seed_bundle, "--json", str(tmp_path / "nope" / "r.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not any(p.name.startswith(".rep.json") for p in tmp_path.iterdir())
    train = tmp_path / "train.npy"
    np.save(train, np.random.default_rng(0).normal(size=(50, 2)))
    assert main(["diagnose", seed_bundle, "--data", str(train), "--json", str(out)]) == 1
    assert json.loads(out.read_text())["n_points"] == 5  # still check's report
    assert main(["diagnose", seed_bundle, "--data", str(train), "--json", str(out), "--force"]) == 0
    assert "global" in json.loads(out.read_text())
