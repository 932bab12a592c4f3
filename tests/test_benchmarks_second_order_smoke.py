"""The second-order benchmark (``python -m benchmarks.second_order``) runs once in ``--quick`` mode at tiny sizes, so
that it cannot rot.

Equivalent command: ``python -m benchmarks.second_order --quick --networks seed_tanh --batches 1,4 --out-dir DIR``.
Timings are never checked: only that the report and the record are written, that every path ran or was skipped
with a reason (JAX, folx and PyTorch are optional: "not installed"), and that every path that ran agreed with the
float64 reference. A second run hides JAX, folx and PyTorch from the script, as on a machine without the [peers]
extra. The reference itself is checked against finite differences of the suite's float64 Jacobian.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.append(ROOT)

BATCHES = (1, 4)
ARGS = ["--quick", "--networks", "seed_tanh", "--batches", ",".join(map(str, BATCHES)), "--n-validation", "64",
        "--quiet-budget", "0", "--repasses", "0"]
PEER_PREFIXES = ("jax_", "folx_", "torch_")
#: Paths that need nothing beyond the project's own dependencies and the C core (built with the package).
ALWAYS = ("nnp_partials_hessian", "nnp_session_hessian", "nnp_partials_laplacian", "nnp_session_laplacian",
          "nnp_partials_hessian_trace", "nnp_session_hessian_trace", "nnp_partials_hvp", "nnp_session_hvp",
          "tf_hessian", "tf_hessian_trace", "tf_hvp")

#: Runs the script with `import jax`, `import folx` and `import torch` (and their submodules) raising
#: ModuleNotFoundError, as where the [peers] extra is not installed (a finder ahead of the others; None entries in
#: sys.modules would break libraries that look there, such as scipy's array-API helpers).
HIDE_PEERS = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "folx", "torch"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the smoke test)", name=name)
sys.meta_path.insert(0, Hide())
from benchmarks.second_order import main
sys.exit(main(sys.argv[1:]))
"""


def _run(out, extra=(), hide_peers=False):
    argv = ARGS + ["--out-dir", str(out), *extra]
    if hide_peers:
        cmd = [sys.executable, "-c", HIDE_PEERS, *argv]
    else:
        cmd = [sys.executable, "-m", "benchmarks.second_order", *argv]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    with open(out / "second_order.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("second-order-smoke")
    return _run(out), out


def _check_record(data, paths, hidden=False):
    from benchmarks.second_order import KEY

    results = data["results"]
    assert {(r["batch"], r["path"]) for r in results} == {(b, p) for b in BATCHES for p in paths}
    agree = data["config"]["agree"]
    for r in results:
        assert r["status"] in ("ok", "skipped"), r  # never "wrong" or "failed"
        if r["status"] == "ok":
            assert KEY[r["quantity"]] in r["max_err"], r
            assert all(e <= agree for e in r["max_err"].values()), r
            assert r["median_s"] is not None and r["flops_per_point"] > 0  # present; never compared with anything
        elif r["path"].startswith(PEER_PREFIXES):
            assert "not installed" in r["reason"] and "[peers]" in r["reason"], r
        else:
            assert r["path"].startswith("nnp_c_") and r["reason"], r  # the C core, when it cannot run here
        if hidden and r["path"].startswith(PEER_PREFIXES):
            assert r["status"] == "skipped", r
        if r["path"] in ALWAYS:
            assert r["status"] == "ok", r


@pytest.mark.slow
def test_quick_run_writes_the_report_and_every_path_agrees_with_the_reference(quick_run):
    data, out = quick_run
    from benchmarks.second_order import PATHS, QUANTITIES

    _check_record(data, [p.name for p in PATHS])
    assert {p.quantity for p in PATHS} == set(QUANTITIES)
    assert data["networks"]["seed_tanh"]["n_in"] == 2 and data["config"]["quick"] is True
    assert {t["target"] for t in data["targets"]} == {"laplacian_vs_peer", "laplacian_vs_hessian", "c_hessian_batch1"}
    # batch 100,000 was not run: its targets are not judged
    assert all(t["verdict"] in ("not judged", "not measured") for t in data["targets"]
               if t["target"] != "c_hessian_batch1")
    text = (out / "SECOND_ORDER.md").read_text()
    for heading in ("## Summary", "## Results", "## Where onnxruntime spends its time", "## FLOP counts",
                    "## Networks, reference and settings"):
        assert heading in text
    assert "**Quick run**" in text and "**Hessian**" in text and "**Laplacian**" in text
    assert "F·(n + 2)" in text and "Load average" in text


@pytest.mark.slow
def test_quick_run_without_the_peers_reports_them_as_not_installed(tmp_path):
    paths = ["jax_hessian", "folx_laplacian", "torch_hvp", "nnp_session_laplacian", "tf_hvp"]
    data = _run(tmp_path, ["--paths", ",".join(paths), "--no-profile"], hide_peers=True)
    _check_record(data, paths, hidden=True)
    assert (tmp_path / "SECOND_ORDER.md").exists()


def test_reference_is_the_derivative_of_the_suite_jacobian_and_seed_tanh_has_the_seed_weights():
    from benchmarks import workloads
    from benchmarks.second_order import build_network, directions, reference

    w = build_network("seed_tanh")
    seed = workloads.build("seed")
    assert [a for _, _, a in w.layers] == ["tanh"] * 7 + ["linear"]
    for (wt, b, _), (ws, bs, _) in zip(w.layers, seed.layers):
        assert np.array_equal(wt, ws) and np.array_equal(b, bs)
    for net in (w, build_network("physics")):
        x = net.inputs(6).astype(np.float64)
        v = directions(net, 6).astype(np.float64)
        ref = reference(net, x, v)
        y, j = workloads.reference(net, x)
        assert np.abs(ref["y"] - y).max() < 1e-12 and np.abs(ref["J"] - j).max() < 1e-12
        h = 1e-5
        fd = np.empty_like(ref["H"])
        for k in range(net.n_in):
            e = np.zeros(net.n_in)
            e[k] = h * np.maximum(1.0, np.abs(x[:, k]))[0]
            fd[:, :, :, k] = (workloads.reference(net, x + e)[1] - workloads.reference(net, x - e)[1]) / (2 * e[k])
        scale = max(1.0, np.abs(ref["H"]).max())
        assert np.abs(fd - ref["H"]).max() <= 1e-7 * scale
        assert np.abs(ref["H"] - ref["H"].transpose(0, 1, 3, 2)).max() <= 1e-12 * scale
        assert np.allclose(ref["lap"], np.einsum("bijj->bi", fd), atol=1e-7 * scale)
        assert np.allclose(ref["hvp"], np.einsum("boij,bj->boi", fd, v), atol=1e-6 * scale)
        assert np.abs(ref["H"]).max() > 1e-3  # not trivially zero
