"""The command line, end to end: export a .keras file and compute partials from CSV and .npy."""

import os
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

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomli, the same parser, comes with the [test] extra there
        tomllib = pytest.importorskip("tomli", reason="Python 3.10 reads pyproject.toml with tomli ([test] extra)")
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


# ---- partials: outputs are checked first and written atomically -------------------------------------------------

def _points(tmp_path, n=40):
    x = np.random.default_rng(2).uniform(0, 20, size=(n, 2))
    np.save(tmp_path / "x.npy", x)
    return str(tmp_path / "x.npy")


def _no_leftovers(folder):
    return [p for p in os.listdir(folder) if ".partial-" in p] == []


def _never_called(*a, **k):
    raise AssertionError("the input was evaluated before the output was checked")


def test_partials_output_in_missing_folder_fails_before_any_work(seed_bundle, tmp_path, capsys, monkeypatch):
    from nnpartials.runtime.serve import Partials

    monkeypatch.setattr(Partials, "__init__", _never_called)
    monkeypatch.setattr(Partials, "jacobian", _never_called)
    out = tmp_path / "no" / "such" / "out.csv"
    assert main(["partials", seed_bundle, "-i", _points(tmp_path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "no" / "such") in err and "Traceback" not in err, err
    (tmp_path / "d.npy").mkdir()
    assert main(["partials", seed_bundle, "-i", _points(tmp_path), "-o", str(tmp_path / "d.npy")]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_partials_interrupted_between_chunks_leaves_no_output(seed_bundle, tmp_path, capsys, monkeypatch):
    from nnpartials.runtime.serve import Partials

    real, calls = Partials.jacobian, []

    def interrupt_second_chunk(self, x, **kw):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, x, **kw)

    monkeypatch.setattr(Partials, "jacobian", interrupt_second_chunk)
    out = tmp_path / "out.csv"
    assert main(["partials", seed_bundle, "-i", _points(tmp_path), "-o", str(out), "--chunk", "8"]) == 130
    assert calls == [8, 8] and not out.exists() and _no_leftovers(tmp_path)


@pytest.mark.parametrize("ext, writer", [(".csv", "savetxt"), (".npy", "save"), (".npz", "savez")])
def test_partials_interrupted_while_writing_leaves_no_output(seed_bundle, tmp_path, monkeypatch, ext, writer):
    """Writing a large CSV takes a while: an interrupt then must not leave a plausible-looking partial table."""
    real = getattr(np, writer)

    def write_some_then_interrupt(file, *args, **kw):
        real(file, *[a[:3] if isinstance(a, np.ndarray) else a for a in args],
             **{k: v[:3] if isinstance(v, np.ndarray) else v for k, v in kw.items()})
        raise KeyboardInterrupt

    x = _points(tmp_path)
    monkeypatch.setattr(np, writer, write_some_then_interrupt)
    out = tmp_path / f"out{ext}"
    assert main(["partials", seed_bundle, "-i", x, "-o", str(out)]) == 130
    assert not out.exists() and _no_leftovers(tmp_path)


def test_partials_refuses_an_existing_output_unless_forced(seed_bundle, tmp_path, capsys, monkeypatch):
    from nnpartials.runtime.serve import Partials

    out = tmp_path / "out.npz"
    out.write_bytes(b"someone else's file")
    with monkeypatch.context() as m:
        m.setattr(Partials, "__init__", _never_called)
        assert main(["partials", seed_bundle, "-i", _points(tmp_path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err, err
    assert out.read_bytes() == b"someone else's file"
    assert main(["partials", seed_bundle, "-i", _points(tmp_path), "-o", str(out), "--force"]) == 0
    with np.load(out) as z:
        assert z["dy_dx"].shape == (40, 1, 2)
    assert main(["partials", seed_bundle, "-i", _points(tmp_path), "-o", str(out), "-f"]) == 0
    assert _no_leftovers(tmp_path)


def test_partials_header_only_and_empty_csv(seed_bundle, tmp_path, capsys):
    (tmp_path / "hdr.csv").write_text("x1,x2\n")
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "hdr.csv"), "-o", str(tmp_path / "o.csv")]) == 0
    assert (tmp_path / "o.csv").read_text() == "x1,x2,y,dy/dx1,dy/dx2\n"
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "hdr.csv"), "-o", str(tmp_path / "o.npz")]) == 0
    with np.load(tmp_path / "o.npz") as z:
        assert z["x"].shape == (0, 2) and z["y"].shape == (0, 1) and z["dy_dx"].shape == (0, 1, 2)
    capsys.readouterr()
    (tmp_path / "empty.csv").write_text("")
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "empty.csv"), "-o", str(tmp_path / "e.csv")]) == 1
    err = capsys.readouterr().err
    assert "no points" in err and "Traceback" not in err, err
    assert not (tmp_path / "e.csv").exists()


def test_partials_bad_csv_row_is_reported_with_its_line(seed_bundle, tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("\ufeffx1,x2\n1,2\n3,abc\n")
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "bad.csv"), "-o", str(tmp_path / "o.csv")]) == 1
    err = capsys.readouterr().err
    assert "row 2 (line 3): non-numeric value 'abc' in column 'x2'" in err, err


# ---- count options ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["export", "m.keras", "-o", "b", "--n-points", "0"],
    ["export", "m.keras", "-o", "b", "--points", "-3"],
    ["check", "B", "--n-points", "0"],
    ["check", "B", "--points", "0"],
    ["partials", "B", "-i", "x.npy", "-o", "o.npy", "--chunk", "0"],
    ["partials", "B", "-i", "x.npy", "-o", "o.npy", "--chunk", "many"],
])
def test_count_options_reject_values_below_one_when_parsing(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "positive integer" in err and "Traceback" not in err, err


def test_export_with_zero_validation_points_is_a_usage_error_not_a_traceback(tmp_path):
    r = run_cli("export", tmp_path / "missing.keras", "-o", tmp_path / "b", "--points", "0")
    assert r.returncode == 2 and "positive integer" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_n_points_is_the_count_option_and_points_an_alias(capsys):
    from nnpartials.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["check", "B", "--n-points", "7"]).points == 7
    assert parser.parse_args(["export", "m", "-o", "b", "--n-points", "5"]).points == 5
    assert parser.parse_args(["check", "B"]).points is None
    assert parser.parse_args(["export", "m", "-o", "b"]).points == 1000
    capsys.readouterr()
    assert parser.parse_args(["check", "B", "--points", "9"]).points == 9
    assert "--points is deprecated" in capsys.readouterr().err
    for cmd in ("check", "export"):
        r = run_cli(cmd, "--help")
        assert "--n-points N" in r.stdout and "--points" not in r.stdout, r.stdout


# ---- quiet start-up, public names -------------------------------------------------------------------------------

def test_export_stderr_holds_only_nnpartials_messages(tmp_path):
    model = models.dense_model("tanh", n_in=2, units=(4,), n_out=1)
    model.save(tmp_path / "tiny.keras")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "ABSL_"))}
    r = subprocess.run([sys.executable, "-m", "nnpartials", "export", str(tmp_path / "tiny.keras"),
                        "-o", str(tmp_path / "b")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "passed" in r.stdout
    foreign = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("nnpartials")]
    assert foreign == [], r.stderr


def test_dir_lists_the_lazy_public_names():
    names = dir(nnpartials)
    for name in ("export", "Partials", "Kernel", "diagnose", "load_bundle", "InputError", "__version__"):
        assert name in names, name
