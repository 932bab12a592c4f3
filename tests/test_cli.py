"""The command line, end to end: export a .keras file and compute partials from CSV and .npy."""

import subprocess
import sys

import numpy as np
import pytest

import models
import nnpartials
from nnpartials.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nnpartials", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_help_lists_every_subcommand():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("export", "partials", "check", "demo", "diagnose"):
        assert cmd in r.stdout, cmd
    r = run_cli("partials", "--help")
    assert r.returncode == 0 and "--input" in r.stdout and "--output" in r.stdout


def test_export_then_partials_csv_and_npy(tmp_path):
    model = models.seed_model()
    model.save(tmp_path / "seed.keras")
    r = run_cli("export", tmp_path / "seed.keras", "-o", tmp_path / "bundle")
    assert r.returncode == 0, r.stderr
    assert "passed" in r.stdout
    x = np.random.default_rng(0).uniform(0, 20, size=(70, 2))
    # header in swapped order: columns are matched by name
    np.savetxt(tmp_path / "pts.csv", x[:, ::-1], delimiter=",", header="x2,x1", comments="")
    np.save(tmp_path / "pts.npy", x)
    assert run_cli("partials", tmp_path / "bundle", "-i", tmp_path / "pts.csv", "-o", tmp_path / "out.csv").returncode == 0
    assert run_cli("partials", tmp_path / "bundle", "-i", tmp_path / "pts.npy", "-o", tmp_path / "out.npy",
                   "--chunk", "16").returncode == 0
    _, J = nnpartials.Partials(tmp_path / "bundle").jacobian(x)
    table = np.genfromtxt(tmp_path / "out.csv", delimiter=",", names=True)
    assert table.dtype.names == ("x1", "x2", "y", "dydx1", "dydx2")
    np.testing.assert_allclose(table["dydx1"], J[:, 0, 0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(table["dydx2"], J[:, 0, 1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), J, rtol=1e-6, atol=1e-8)


def test_cli_errors_are_messages_not_tracebacks(seed_bundle, tmp_path, capsys):
    np.savetxt(tmp_path / "three.csv", np.zeros((4, 3)), delimiter=",")
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "three.csv"), "-o", str(tmp_path / "o.csv")]) == 1
    err = capsys.readouterr().err
    assert "expected 2 features" in err and "Traceback" not in err
    assert main(["partials", str(tmp_path / "nowhere"), "-i", str(tmp_path / "three.csv"), "-o", "o.csv"]) == 1
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "nan.csv").write_text("x1,x2\n1,nan\n")
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "nan.csv"), "-o", str(tmp_path / "o.csv")]) == 1
    assert "finite" in capsys.readouterr().err
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "three.csv"), "-o", str(tmp_path / "o.txt")]) == 1


@pytest.mark.parametrize("ext", [".csv", ".npz"])
def test_partials_large_input_chunks(seed_bundle, tmp_path, ext):
    x = np.random.default_rng(1).uniform(0, 20, size=(5000, 2))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / f"out{ext}"
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "x.npy"), "-o", str(out), "--chunk", "1000"]) == 0
    _, J = nnpartials.Partials(seed_bundle).jacobian(x)
    got = np.load(out)["dy_dx"] if ext == ".npz" else np.loadtxt(out, delimiter=",", skiprows=1)[:, 3:5]
    np.testing.assert_allclose(got.reshape(J.shape), J, rtol=1e-6, atol=1e-8)


def test_every_subpackage_is_packaged():
    """A non-editable install ships only the packages pyproject lists: every folder with an __init__.py counts."""
    import os

    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for top, pkg in dirs.items():
        for d, _, files in os.walk(os.path.join(root, top)):
            if "__init__.py" in files and "__pycache__" not in d:
                rel = os.path.relpath(d, os.path.join(root, top))
                found.add(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
