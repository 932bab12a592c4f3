"""The benchmark suite runs once at tiny sizes with timing disabled, so that it cannot rot.

Equivalent command: ``NNP_BENCH_TINY=1 python -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider``.
Timings never fail this test: it checks that every benchmark case runs (or skips with a reason, e.g. JAX or
PyTorch not installed), that every path agrees with the float64 reference, and that the report renders.
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

pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs pytest-benchmark (the [test] extra)")


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke")
    record = out / "results.json"
    env = dict(os.environ, NNP_BENCH_TINY="1", NNP_BENCH_RECORD=str(record))
    env.pop("NNP_BENCH_PATHS", None)
    env.pop("NNP_BENCH_WORKLOADS", None)
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-q", "-p", "no:cacheprovider", "-rs"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    with open(record) as f:
        return json.load(f), out


@pytest.mark.slow
def test_every_benchmark_case_runs_or_skips_with_a_reason(tiny_record):
    data, _ = tiny_record
    results = data["results"]
    from benchmarks.paths import PATHS
    from benchmarks.workloads import NAMES

    assert len(results) == len(PATHS) * len(NAMES) * 3
    for r in results:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"], r
        else:
            assert r["max_err"] is not None and r["max_err"] <= data["config"]["agree"], r
            assert r.get("median_s") is None  # timing disabled
    # the onnxruntime paths and TensorFlow never skip
    for r in results:
        if r["path"] in ("ort_forward", "ort_jac_forward", "ort_jac_reverse", "partials", "tf_function", "tf_eager"):
            assert r["status"] == "ok", r
        if r["path"].startswith(("jax_", "torch_")) and r["status"] == "skipped":
            assert "not installed" in r["reason"] and "[peers]" in r["reason"], r


@pytest.mark.slow
def test_report_renders_from_a_tiny_run(tiny_record):
    data, out = tiny_record
    from benchmarks import report

    path = report.render(data, str(out), "python -m benchmarks.report --tiny")
    text = open(path).read()
    for heading in ("## Summary", "## Targets", "## Results", "## First-call cost", "## FLOP convention",
                    "## Machine and settings", "## Where nnpartials is behind"):
        assert heading in text
    assert "Tiny run" in text
    assert (out / "ratios.png").stat().st_size > 1000


def _rec(w, b, p, t, family, flops=1e6):
    return {"workload": w, "batch": b, "path": p, "family": family, "status": "ok", "median_s": t,
            "flops_per_call": flops, "label": p}


def test_report_ratios_and_verdicts():
    from benchmarks import report

    data = {"machine": {}, "workloads": {"seed": {"auto_mode": "reverse", "forward_flops_per_point": 16400}},
            "results": [
                _rec("seed", 1, "ort_forward", 10e-6, "floor"),
                _rec("seed", 1, "ort_jac_reverse", 14e-6, "nnpartials"),
                _rec("seed", 1, "c_kernel", 2e-6, "nnpartials"),
                _rec("seed", 1, "c_alone", 0.6e-6, "nnpartials"),
                _rec("seed", 1, "tf_function", 400e-6, "peer"),
                _rec("seed", 1, "jax_jacrev", 20e-6, "peer"),
                _rec("seed", 100000, "ort_forward", 10e-3, "floor"),
                _rec("seed", 100000, "ort_jac_reverse", 30e-3, "nnpartials"),
                _rec("seed", 100000, "c_kernel", 20e-3, "nnpartials"),
                _rec("seed", 100000, "tf_function", 40e-3, "peer"),
                _rec("seed", 100000, "jax_jacrev", 5e-3, "peer"),
            ]}
    res = report.Results(data)
    assert res.fastest_peer("seed", 1) == "jax_jacrev"
    assert res.ratio_peer("seed", 1, "c_kernel") == pytest.approx(0.1)
    assert res.ratio_fwd("seed", 1, "ort_jac_reverse") == pytest.approx(1.4)
    assert res.gflops("seed", 1, "c_kernel") == pytest.approx(1e6 / 2e-6 / 1e9)
    verdicts = [v for _, _, v in report.targets(res)]
    # (a) 1.4 <= 1.5 met; 3.0 > 2.5 not met; Kernel 2 µs met; C alone 0.6 µs not met; 40/20 = 2 < 2.5 not met
    assert verdicts == ["met", "not met", "met", "not met", "not met"]
    behind = report.behind(res)
    assert [(w, b) for w, b, _, _ in behind] == [("seed", 100000)]


def test_report_finds_disturbed_groups_and_merges_k_expressions():
    from benchmarks import report

    data = {"results": [
        dict(_rec("seed", 1, "ort_forward", 1e-5, "floor"), others_cpu=0.5),
        dict(_rec("seed", 1000, "ort_forward", 1e-4, "floor"), others_cpu=0.01),
        dict(_rec("wide", 1, "tf_function", 1e-4, "peer"), others_cpu=None),
    ]}
    assert report.disturbed_groups(data) == [("seed", 1)]
    assert report._split_k(["-x", "-k", "ort_", "-q"]) == (["-x", "-q"], "ort_")
    assert report._split_k(["-kseed"]) == ([], "seed")
    assert report._split_k(["-q"]) == (["-q"], None)


def test_node_cost_tool_runs():
    """The batch-1 node-cost evidence cited in NOTES.md stays runnable (tiny run; the numbers are not checked)."""
    from benchmarks import node_cost

    res = node_cost.measure(width=8, nodes=2, calls=3)
    assert set(res) >= {"(one node)", "MatMul", "Ceil", "Clip", "Greater + Where"}
    assert all(np.isfinite(v) for v in res.values())
