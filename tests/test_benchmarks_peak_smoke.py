"""The benchmark suite's measured multiply-add peak (csrc/bench/fma_peak.c, "fraction of peak" next to GFLOP/s) and
its jax2onnx peer (JAX's jacrev exported to ONNX, run in onnxruntime), each at tiny sizes. No timing is checked: the
peak only has to be a positive number, and the jax2onnx Jacobian has to equal a float64 reference written out by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.append(ROOT)

from benchmarks import cbench  # noqa: E402

PEAK_SOURCE = os.path.join(ROOT, "csrc", "bench", "fma_peak.c")
WARN_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-ffp-contract=fast"]


def _compilers():
    return [c for c in ("gcc", "clang") if shutil.which(c)]


def test_fma_peak_program_builds_and_prints_a_positive_peak(tmp_path):
    reason = cbench.unavailable()
    if reason:
        pytest.skip(reason)
    exe = cbench.build_peak(str(tmp_path))
    res = cbench.measure_peak(exe, min_sample_s=0.001, samples=1)
    assert res["peak_gflops"] > 0 and np.isfinite(res["peak_gflops"])
    isas = {d["isa"]: d for d in res["isas"]}
    assert "base" in isas and res["isa"] in isas
    assert res["peak_gflops"] == max(d["gflops"] for d in res["isas"])
    assert all(d["gflops"] > 0 and d["chains"] >= 8 for d in res["isas"])
    assert cbench.peak_fraction(res["peak_gflops"], res["peak_gflops"], 1) == pytest.approx(1.0)
    assert cbench.peak_fraction(None, res["peak_gflops"], 1) is None


@pytest.mark.parametrize("dispatch", [True, False], ids=["dispatch", "no-dispatch"])
def test_fma_peak_program_has_no_warnings(tmp_path, dispatch):
    """-Wall -Wextra -pedantic -Werror with every compiler found, with and without the run-time dispatch."""
    ccs = _compilers()
    if not ccs:
        pytest.skip("neither gcc nor clang on PATH")
    for cc in ccs:
        cmd = [cc, *WARN_FLAGS, *([] if dispatch else ["-DNNP_NO_DISPATCH"]), PEAK_SOURCE,
               "-o", str(tmp_path / f"fma_peak_{cc}")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and not res.stderr.strip(), f"{' '.join(cmd)}:\n{res.stderr}"
        out = subprocess.run([str(tmp_path / f"fma_peak_{cc}"), "0.001", "1"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and '"peak_gflops"' in out.stdout.splitlines()[-1]


def _tiny_dense_workload():
    """A 3 → 5 (tanh) → 2 (linear) network with a normalization, in the attributes the JAX paths read."""
    rng = np.random.default_rng(7)
    W1, b1 = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    W2, b2 = rng.normal(size=(5, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    mean, std = np.float32([0.5, -1.0, 2.0]), np.float32([2.0, 0.5, 1.5])
    w = types.SimpleNamespace(name="tiny", kind="dense", n_in=3, n_out=2, input_shape=(3,), normalization=(mean, std),
                              layers=[(W1, b1, "tanh"), (W2, b2, "linear")])
    w.shaped = lambda x: x.reshape((x.shape[0],) + w.input_shape)
    return w


def _reference(w, x):
    """y and dy/dx in float64 from the chain rule: J = W2ᵀ · diag(1 - h²) · W1ᵀ · diag(1/std)."""
    (W1, b1, _), (W2, b2, _) = [(a.astype(np.float64), b.astype(np.float64), act) for a, b, act in w.layers]
    mean, std = (v.astype(np.float64) for v in w.normalization)
    h = np.tanh(((x - mean) / std) @ W1 + b1)
    y = h @ W2 + b2
    J = np.einsum("ok,bk,jk->boj", W2.T, 1 - h ** 2, W1) / std
    return y, J


def test_jax2onnx_path_matches_the_reference_on_a_tiny_network(tmp_path):
    pytest.importorskip("jax2onnx", reason="jax2onnx is not installed (the [peers] extra)")
    from benchmarks import paths

    assert paths.BY_NAME["jax2onnx_jacrev"].available() is None
    w = _tiny_dense_workload()

    def skip(reason):
        raise AssertionError(f"the tiny network should export: {reason}")

    ctx = types.SimpleNamespace(tmp=str(tmp_path), skip=skip)
    runner = paths.make_jax2onnx(ctx, w)
    for batch in (1, 7):  # one export, a symbolic batch axis
        x = np.random.default_rng(batch).normal(size=(batch, 3)).astype(np.float32)
        y, J = runner.to_numpy(runner.call(runner.prepare(x)))
        y_ref, J_ref = _reference(w, x.astype(np.float64))
        assert y.shape == (batch, 2) and J.shape == (batch, 2, 3)
        assert np.abs(y - y_ref).max() <= 1e-5 * max(1.0, np.abs(y_ref).max())
        assert np.abs(J - J_ref).max() <= 1e-5 * max(1.0, np.abs(J_ref).max())
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".jax2onnx.onnx")]) == 1


def test_jax2onnx_path_is_a_skip_when_not_installed(monkeypatch):
    """Without jax2onnx the path says "not installed" with the [peers] hint (a skip, never a failure)."""
    from benchmarks import paths

    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import fails as if the package were absent
    monkeypatch.setattr(paths, "_IMPORTABLE", {})
    reason = paths.BY_NAME["jax2onnx_jacrev"].available()
    assert reason and "not installed" in reason and "[peers]" in reason
