"""The demo's quick variant end to end (train both scenarios, export, partials, cross-checks, diagnostics, report),
the report's wording against numbers, and the demo modules' import structure.

One training run per module (about half a minute on two cores). Every number is compared with an independent
reference: the analytic partials of sin(x1) + cos(x2), the data line's direction (1, 1.5), and central finite
differences of the bundle's forward graph evaluated in float64 by onnx's reference evaluator. The wording tests feed
the report constructed numbers (no training), so what it says is tested against numbers, not against one run.
"""

import ast
import copy
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnpartials import tolerances as tol

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODULES = ("nnpartials.demo_config", "nnpartials.demo_plots", "nnpartials.demo_report", "nnpartials.demo",
                "nnpartials.commands.demo")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from nnpartials.demo import DemoConfig, run_demo
    from rich.console import Console

    out = tmp_path_factory.mktemp("demo")
    console = Console(file=open(os.devnull, "w"), width=160)
    return run_demo(DemoConfig.quick_config(out=str(out), progress=False), console=console)


def _scenario(demo, key):
    return next(s for s in demo.scenarios if s.key == key)


def _forward(bundle_dir):
    import onnxruntime as ort

    sess = ort.InferenceSession(os.path.join(bundle_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.asarray(x, dtype=np.float32)})[0][:, 0].astype(np.float64)


def _rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)))


def _sin_angle(u, v):
    """|sin| of the angle between two 2-D directions (0: parallel or antiparallel)."""
    u = np.asarray(u, float) / np.linalg.norm(u)
    v = np.asarray(v, float) / np.linalg.norm(v)
    return abs(u[0] * v[1] - u[1] * v[0])


def test_scenario1_rank_one_along_the_data_line(demo):
    """The supported direction is ∝ (1, 1.5) and the null direction ∝ (1, −1.5), both in input units (the z-space
    directions (1, 1)/√2 and (1, −1)/√2 mapped back with std2 = 1.5·std1). The data are float32 and the model's
    normalisation statistics are float32, so both are exact to ~1e-7 (sin of the angle); DIAG_DIRECTION_ATOL (1e-4)
    leaves three orders of magnitude and fails for any genuinely different direction."""
    s = _scenario(demo, "line")
    g = s.diagnosis.global_
    assert g.effective_rank == 1
    d = g.supported_directions[0]
    assert _sin_angle(d, (1.0, 1.5)) <= tol.DIAG_DIRECTION_ATOL, d
    n = g.null_directions[0]
    assert _sin_angle(n, (1.0, -1.5)) <= tol.DIAG_DIRECTION_ATOL, n
    assert abs(abs(np.dot(n, d)) - 5.0 / 13.0) <= tol.DIAG_DIRECTION_ATOL  # |(1, 1.5)·(1, −1.5)| / 3.25


def test_scenario1_partials_are_flagged_not_identified(demo):
    s = _scenario(demo, "line")
    assert not s.diagnosis.global_.identified.any()
    assert not s.diagnosis.local.identified.any()  # at every point of the line
    assert np.isnan(s.diagnosis.masked_partials()).all()
    # and they do not match the analytic partials (this is the question's observation)
    t = s.t
    worst = max(_rms(s.J_line[:, 0], np.cos(t)), _rms(s.J_line[:, 1], -np.sin(1.5 * t)))
    assert worst > tol.DEMO_PARTIAL_RMS


def test_scenario1_directional_derivative_identified_and_close(demo):
    s = _scenario(demo, "line")
    t = s.t
    analytic = np.cos(t) - 1.5 * np.sin(1.5 * t)
    directional = s.J_line[:, 0] + 1.5 * s.J_line[:, 1]
    assert _rms(directional, analytic) <= tol.DEMO_DIRECTIONAL_RMS
    m = s.metrics
    assert m["directional_identified_fraction_on_line"] == 1.0 and m["directional_globally_identified"]
    f = m["fit"]["directional"]
    assert f["rms"] == pytest.approx(_rms(directional, analytic), rel=1e-9)
    assert f["max_abs"] == pytest.approx(np.max(np.abs(directional - analytic)), rel=1e-9)
    assert f["peak"] == pytest.approx(np.max(np.abs(analytic)), rel=1e-12)
    # the diagnostics' own "identified" derivative is the same quantity per unit length of (1, 1.5)
    D, _ = s.diagnosis.directional_derivatives()
    np.testing.assert_allclose(D[:, 0, 0] * math.hypot(1.0, 1.5), directional, rtol=1e-4, atol=1e-5)


def test_corrected_finite_difference_along_the_data_agrees(demo):
    """A central difference of the bundle's forward graph along the data line, step Δx1 (not the question's 0.01)."""
    s = _scenario(demo, "line")
    f = _forward(s.bundle_path)
    t = s.t.astype(np.float64)
    h = t[1] - t[0]
    inner = t[1:-1]
    fd = (f(np.stack([inner + h, 1.5 * (inner + h)], 1)) - f(np.stack([inner - h, 1.5 * (inner - h)], 1))) / (2 * h)
    directional = s.J_line[1:-1, 0] + 1.5 * s.J_line[1:-1, 1]
    assert _rms(fd, directional) <= tol.DEMO_FD_ALONG_DATA_RMS
    # the question's quotient with 0.01 is off by the step ratio
    assert s.metrics["line_step_x1"] == pytest.approx(2 * math.pi / (len(t) - 1))


#: Step of the float64 finite differences below. The network is piecewise linear, so away from a kink a difference
#: quotient has no truncation error at all; float64 rounding of y (|y| ~ 1) makes it ~1e-16 / 1e-4 = 1e-12.
FD64_STEP = 1e-4
#: A point is within a step of a kink when its forward and backward quotients differ by more than this (1e4 times
#: their rounding noise); a kink that changes them by less moves the central quotient by less, far below the bound.
FD64_KINK = 1e-8
#: At most this share of the points may be set aside as kink points (measured: 0-1 of 200 at step 1e-4).
FD64_MAX_KINK_SHARE = 0.05


def test_partials_are_the_networks_own(demo):
    """onnxruntime's float32 partials against central differences of the bundle's forward graph evaluated in float64
    (onnx's reference evaluator, weights promoted exactly), at the float32 test points.

    Away from kinks the float64 quotient is the network's exact slope to ~1e-12, so the comparison measures only the
    float32 Jacobian's own rounding (measured up to 5e-7 relative to max(1, |J|)); it is held to JACOBIAN_F32 (1e-5)
    at every point that is not within a step of a kink, where one-sided quotients disagree."""
    import onnx

    from nnpartials.onnx_reference import Float64Graph

    for s in demo.scenarios:
        ref = Float64Graph(onnx.load(os.path.join(s.bundle_path, "model.onnx")))
        x = s.x_test[:200].astype(np.float32).astype(np.float64)  # exactly the points the partials were taken at
        J = s.J_test[:200]
        y0 = ref.forward([x])[:, 0]
        for j, e in enumerate(np.eye(2)):
            yp = ref.forward([x + FD64_STEP * e])[:, 0]
            ym = ref.forward([x - FD64_STEP * e])[:, 0]
            kink = np.abs((yp - y0) - (y0 - ym)) / FD64_STEP > FD64_KINK
            assert kink.mean() <= FD64_MAX_KINK_SHARE, (s.key, j, int(kink.sum()))
            central = (yp - ym) / (2 * FD64_STEP)
            err = np.abs(central - J[:, j]) / np.maximum(1.0, np.abs(J[:, j]))
            assert err[~kink].max() <= tol.JACOBIAN_F32, (s.key, j, float(err[~kink].max()))
        assert s.checks["gradient_tape"]["passed"]


def test_c_core_cross_check(demo):
    for s in demo.scenarios:
        c = s.checks["c_core_fd"]
        if not c.get("available", True):
            pytest.skip(f"C core not available: {c['reason']}")
        assert c["passed"], c


def test_scenario2_full_rank_and_partials_match(demo):
    s = _scenario(demo, "random")
    assert s.diagnosis.global_.effective_rank == 2
    assert s.diagnosis.global_.identified.all()
    assert s.diagnosis.local.identified.all()
    x = s.x_test.astype(np.float64)
    assert _rms(s.J_test[:, 0], np.cos(x[:, 0])) <= tol.DEMO_PARTIAL_RMS
    assert _rms(s.J_test[:, 1], -np.sin(x[:, 1])) <= tol.DEMO_PARTIAL_RMS


def test_report_folder(demo):
    out = demo.out
    for name in ("report.md", "summary.json", "data.png", "prediction.png", "partials.png", "directional.png",
                 "second_derivatives.png"):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 1000, name
    for name in ("data.png", "prediction.png", "partials.png", "directional.png"):
        with open(os.path.join(out, name), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["scenarios"]["line"]["metrics"]["effective_rank"] == 1
    assert summary["scenarios"]["random"]["metrics"]["effective_rank"] == 2
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "not identified" in report.lower() and "![partials](partials.png)" in report
    for s in demo.scenarios:
        assert os.path.isfile(os.path.join(s.bundle_path, "manifest.json"))
        assert os.path.isfile(os.path.join(os.path.dirname(s.bundle_path), "train_x.npy"))


# ---- second derivatives ---------------------------------------------------------------------------------------------
def test_second_derivatives_are_the_networks_own(demo):
    """The bundles hold the order-2 graphs; the onnxruntime Hessians along the line against float64 central differences
    of the bundle's Jacobian graph (onnx's reference evaluator, an independent evaluation): a LeakyReLU network's
    Jacobian is piecewise constant, so away from kinks they are 0, and so are the Hessians. The demo's own
    cross-check with nested GradientTape passed."""
    import onnx

    from nnpartials.bundle import load_bundle
    from nnpartials.onnx_reference import fd_hessian

    for s in demo.scenarios:
        b = load_bundle(s.bundle_path)
        assert b.order == 2 and b.second_derivatives_vanish
        assert "zero almost everywhere" in b.manifest["second_order"]["note"]
        idx = np.linspace(0, len(s.t) - 1, 200).astype(int)
        x = s.x_line[idx].astype(np.float32).astype(np.float64)
        H_fd, keep = fd_hessian(onnx.load(os.path.join(s.bundle_path, "model.jac.onnx")), [x])
        assert keep.mean() >= 1 - FD64_MAX_KINK_SHARE
        err = np.abs(s.H_line[idx] - H_fd[:, 0]) * keep[:, 0]
        assert err.max() <= tol.SECOND_ORDER_F32 * max(1.0, np.abs(H_fd).max()), (s.key, float(err.max()))
        c = s.checks["hessian_gradient_tape"]
        assert c["passed"] and c["points"] == len(s.t), c


def test_second_order_numbers_against_the_analytic_truth(demo):
    """Every second-order error in summary.json from the Hessians and the analytic formulas −sin x1, −cos x2, 0 and
    −sin t − 2.25 cos 1.5t; identification: on the line only uᵀHu (scenario 1), everything with independent inputs."""
    summary = json.load(open(os.path.join(demo.out, "summary.json")))
    for s in demo.scenarios:
        t, H = s.t, s.H_line
        so = summary["scenarios"][s.key]["metrics"]["second_order"]
        fit = so["fit"]
        assert fit["d2y_dx1dx1"]["rms"] == pytest.approx(_rms(H[:, 0, 0], -np.sin(t)), rel=1e-9, abs=1e-12)
        assert fit["d2y_dx2dx2"]["rms"] == pytest.approx(_rms(H[:, 1, 1], -np.cos(1.5 * t)), rel=1e-9, abs=1e-12)
        assert fit["d2y_dx1dx2"]["max_abs"] == pytest.approx(np.max(np.abs(H[:, 0, 1])), abs=1e-12)
        assert fit["d2y_dx1dx2"]["peak"] == pytest.approx(max(np.abs(np.sin(t)).max(), np.abs(np.cos(1.5 * t)).max()))
        d2 = H[:, 0, 0] + 3.0 * H[:, 0, 1] + 2.25 * H[:, 1, 1]  # uᵀHu, u = (1, 1.5)
        truth = -np.sin(t) - 2.25 * np.cos(1.5 * t)
        assert fit["directional2"]["rms"] == pytest.approx(_rms(d2, truth), rel=1e-9)
        assert fit["directional2"]["peak"] == pytest.approx(np.abs(truth).max())
        # a piecewise-linear network: its Hessian is 0 on the line, so each error is the truth's own size
        assert so["zero_almost_everywhere"] and so["max_abs_hessian_line"] == 0.0
        assert fit["d2y_dx1dx1"]["rms"] == pytest.approx(np.sqrt(np.mean(np.sin(t) ** 2)), rel=1e-9)
        ident = so["identified_fraction_on_line"]
        if s.key == "line":
            assert ident == {"d2y_dx1dx1": 0.0, "d2y_dx2dx2": 0.0, "d2y_dx1dx2": 0.0, "directional2": 1.0}
        else:
            assert ident == {"d2y_dx1dx1": 1.0, "d2y_dx2dx2": 1.0, "d2y_dx1dx2": 1.0, "directional2": 1.0}
        from nnpartials.demo_config import fit_grade
        for name, f in fit.items():
            assert summary["scenarios"][s.key]["verdicts"]["second_order"][name] == fit_grade(
                f["rms"], f["max_abs"], f["peak"])


def test_report_states_that_the_second_derivatives_vanish(demo):
    report = open(os.path.join(demo.out, "report.md"), encoding="utf-8").read()
    summary = json.load(open(os.path.join(demo.out, "summary.json")))
    statement = summary["second_order"]["statement"]
    assert summary["second_order"]["zero_almost_everywhere"] and summary["second_order"]["hessian_zero_at_every_point"]
    for text in (report, statement):
        assert "LeakyReLU" in text and "piecewise linear" in text and "zero almost everywhere" in text
        assert "smooth activation" in text and "physics-informed" in text
    assert statement in report and "![second derivatives](second_derivatives.png)" in report
    with open(os.path.join(demo.out, "second_derivatives.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # the zero mixed partial of scenario 2 is not called learned
    sec = report.split("## Second derivatives", 1)[1].split("## Results", 1)[0]
    mixed = [ln for ln in sec.splitlines() if ln.strip().startswith("- ∂²y/∂x1∂x2 is identified")]
    assert len(mixed) == 1 and "shows nothing learned" in mixed[0], mixed


def test_second_order_wording_follows_the_numbers():
    from types import SimpleNamespace

    from nnpartials import demo_report as R

    acc = _fit(0.0, 0.0, 1.0)
    # a zero truth met by a network whose whole Hessian is 0: no claim of learning
    txt = R.second_partial_sentence("∂²y/∂x1∂x2", "0", 1.0, acc, zero_net=True)
    assert "shows nothing learned" in txt and "is identified at all line points and accurately" not in txt
    assert "accurately learned" in R.second_partial_sentence("∂²y/∂x1∂x2", "0", 1.0, _fit(0.01, 0.05, 1.0), False)
    poor = R.second_partial_sentence("∂²y/∂x1²", "−sin(x1)", 1.0, _fit(0.707, 1.0, 1.0), zero_net=True)
    assert "not learned" in poor and "value is 0" in poor and not CLAIMS_OF_ACCURACY.search(poor), poor

    def scen(vanish, hmax):
        so = {"zero_almost_everywhere": vanish, "max_abs_hessian_line": hmax, "max_abs_hessian_test": hmax,
              "fit": {"directional2": {"points": 2000}}}
        check = {"passed": True, "agree": 2000, "points": 2000, "max_abs_diff": 0.0, "max_abs_reference": hmax,
                 "max_abs_onnxruntime": hmax}
        return SimpleNamespace(metrics={"second_order": so}, checks={"hessian_gradient_tape": check})

    zero = R.second_order_statement([scen(True, 0.0), scen(True, 0.0)])
    assert "zero almost everywhere" in zero and "flat" in zero and "smooth activation" in zero
    smooth = R.second_order_statement([scen(False, 0.8), scen(False, 0.9)])
    assert "not zero almost everywhere" in smooth and "flat" not in smooth and "LeakyReLU" not in smooth
    assert "0.8" in smooth and "0.9" in smooth


def test_diagnose_command_on_the_demo_bundle(demo, tmp_path, capsys):
    from nnpartials.cli import main

    s = _scenario(demo, "line")
    train = os.path.join(os.path.dirname(s.bundle_path), "train_x.npy")
    out = tmp_path / "diag.json"
    rc = main(["diagnose", s.bundle_path, "--data", train, "--points", "1,1.5;1,3", "--json", str(out),
               "--fail-unidentified"])
    assert rc == 3  # partials at the query points are not identified
    d = json.loads(out.read_text())
    assert d["global"]["effective_rank"] == 1
    assert d["local"]["outside"] == [False, True]
    assert d["local"]["identified"] == [[False, False], [False, False]]
    # the bundle has second derivatives (order 2): the second partials are diagnosed too, and their values are not
    # reported, since the LeakyReLU network's second derivatives vanish almost everywhere
    so = d["second_order"]
    assert so["zero_almost_everywhere"] is True and "hessian" not in so
    assert so["identified"] == [[[False, False], [False, False]]] * 2
    printed = capsys.readouterr().out
    assert "effective rank 1 of 2" in printed and "zero almost everywhere" in printed
    # the same data as CSV with a header naming the model's columns, in the other order
    csv = tmp_path / "train.csv"
    x = np.load(train)
    np.savetxt(csv, x[:, ::-1], delimiter=",", header="x2,x1", comments="")
    cols = json.load(open(os.path.join(s.bundle_path, "manifest.json")))["inputs"][0]["columns"]
    if cols == ["x1", "x2"]:
        out2 = tmp_path / "diag_csv.json"
        assert main(["diagnose", s.bundle_path, "--data", str(csv), "--json", str(out2)]) == 0
        assert json.loads(out2.read_text())["global"]["effective_rank"] == 1


@pytest.mark.parametrize("argv,match", [
    (["demo", "--epochs", "0", "--out", "unused"], "nnpartials demo: error: epochs: expected an integer >= 1, got 0"),
    (["diagnose", "nonexistent_bundle", "--data", "x.npy"],
     "nnpartials diagnose: error: bundle 'nonexistent_bundle' is not a folder"),
])
def test_command_errors(argv, match, capsys, tmp_path, monkeypatch):
    from nnpartials.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert match in err, err
    assert not (tmp_path / "unused").exists()  # rejected before any work


# ---- the report's words, against numbers -------------------------------------------------------------------------
CLAIMS_OF_ACCURACY = re.compile(r"\baccurately\b|\bmatch(es|ed)?\b|\bagrees?\b|\breproduces?\b", re.I)


def _fit(rms, max_abs, peak, interval=None, t_of_max=None, above=None):
    f = {"rms": rms, "max_abs": max_abs, "peak": peak}
    if interval is not None:
        f.update(worst_interval=list(interval), poor_regions=1, t_of_max=t_of_max, above_fraction=above)
    return f


def _metrics(directional, y=None, d1=None, d2=None, ident=(0.0, 0.0), dir_ident=1.0, rank=1):
    """A scenario's metrics with the numbers the wording reads (the rest of summary.json is not needed)."""
    return {
        "fit": {"y": y or _fit(0.01, 0.03, 2.0), "dy_dx1": d1 or _fit(0.7, 1.4, 1.0),
                "dy_dx2": d2 or _fit(0.5, 1.0, 1.0), "directional": directional},
        "identified_fraction_on_line": list(ident),
        "directional_identified_fraction_on_line": dir_ident,
        "directional_globally_identified": dir_ident > 0,
        "directional_span_residual": 1e-8 if dir_ident > 0 else 0.8,
        "span_tol": 0.1, "effective_rank": rank,
        "rms_fd_vs_autodiff_directional": 0.01,
    }


def test_fit_grade_thresholds():
    from nnpartials.demo_config import (ACCURATE, ACCURATE_MAX_FRAC, POOR, ROUGH, ROUGH_RMS_FRAC, fit_grade)

    assert fit_grade(0.01, ACCURATE_MAX_FRAC * 2.5, 2.5) == ACCURATE
    assert fit_grade(0.01, ACCURATE_MAX_FRAC * 2.5 * 1.001, 2.5) == ROUGH
    assert fit_grade(ROUGH_RMS_FRAC * 2.5, 2.0, 2.5) == ROUGH
    assert fit_grade(ROUGH_RMS_FRAC * 2.5 * 1.001, 2.0, 2.5) == POOR
    assert fit_grade(float("nan"), 0.0, 1.0) == POOR


def test_directional_wording_follows_the_numbers():
    """The origin issue's numbers (RMS 0.28, max 1.24, peak 2.5): identified, but not 'accurately learned'."""
    from nnpartials import demo_report as R

    big = R.directional_sentence(_metrics(_fit(0.28, 1.24, 2.5, (1.5, 4.5), 3.1, 0.3)))
    assert "identified at all line points" in big
    assert "learned only roughly" in big and "RMS 0.28, max 1.24 = 50 % of the peak 2.50" in big
    assert "t ∈ [1.50, 4.50]" in big
    assert not CLAIMS_OF_ACCURACY.search(big), big

    worse = R.directional_sentence(_metrics(_fit(0.9, 2.4, 2.5, (0.0, 6.0), 1.0, 0.8)))
    assert "not learned" in worse and not CLAIMS_OF_ACCURACY.search(worse), worse

    small = R.directional_sentence(_metrics(_fit(0.05, 0.2, 2.5)))
    assert "identified at all line points" in small and "accurately learned" in small, small
    assert "t ∈" not in small  # no region of large error to point at

    # not identified: no accuracy verdict, even when the numbers happen to be close
    lucky = R.directional_sentence(_metrics(_fit(0.05, 0.2, 2.5), dir_ident=0.0))
    assert "not identified" in lucky and "accurately" not in lucky and "do not determine" in lucky, lucky


def test_prediction_wording_follows_the_numbers():
    from nnpartials import demo_report as R

    under = R.prediction_sentence(_fit(0.12, 0.9, 2.0, (1.52, 4.47), 3.0, 0.4), _fit(0.1, 0.8, 2.0))
    assert "fits y only roughly" in under and "t ∈ [1.52, 4.47]" in under and "largest at t = 3.00" in under
    assert "45 % of the peak 2.00" in under and "40 % of the points" in under
    assert not CLAIMS_OF_ACCURACY.search(under), under
    poor = R.prediction_sentence(_fit(0.8, 2.0, 2.0, (0.0, 9.0), 2.0, 0.9))
    assert "does not fit y" in poor and not CLAIMS_OF_ACCURACY.search(poor), poor
    good = R.prediction_sentence(_fit(0.02, 0.1, 2.0), _fit(0.03, 0.15, 2.0))
    assert good.count("fits y accurately") == 2 and "t ∈" not in good, good


def test_partial_wording_follows_the_numbers():
    from nnpartials import demo_report as R

    assert "accurately learned" in R.partial_sentence("∂y/∂x1", "cos(x1)", 1.0, _fit(0.03, 0.08, 1.0))
    rough = R.partial_sentence("∂y/∂x1", "cos(x1)", 1.0, _fit(0.15, 0.6, 1.0, (5.5, 6.2), 6.2, 0.4))
    assert "identified at all line points but learned only roughly" in rough and "t ∈ [5.50, 6.20]" in rough
    assert not CLAIMS_OF_ACCURACY.search(rough), rough
    unident = R.partial_sentence("∂y/∂x1", "cos(x1)", 0.0, _fit(0.85, 1.24, 1.0))
    assert "not identified" in unident and "differs from cos(x1)" in unident
    assert not CLAIMS_OF_ACCURACY.search(unident), unident
    part = R.partial_sentence("∂y/∂x1", "cos(x1)", 0.25, _fit(0.03, 0.08, 1.0))
    assert "identified at 25 % of the line points" in part


def test_fd_and_comparison_wording_follow_the_numbers():
    from nnpartials import demo_report as R
    from nnpartials.demo_config import FD_AGREE_RMS_FRAC

    m = _metrics(_fit(0.3, 1.2, 2.5))
    m["rms_fd_vs_autodiff_directional"] = 0.5 * FD_AGREE_RMS_FRAC * 2.5
    assert "agrees with" in R.fd_along_data_sentence(m)
    m["rms_fd_vs_autodiff_directional"] = 2.0 * FD_AGREE_RMS_FRAC * 2.5
    assert "differs from" in R.fd_along_data_sentence(m) and "agree" not in R.fd_along_data_sentence(m)[:80]

    m1 = _metrics(_fit(0.3, 1.2, 2.5), y=_fit(0.05, 0.2, 2.0), ident=(0.0, 0.0))
    m2 = _metrics(_fit(0.3, 1.2, 2.5), y=_fit(0.10, 0.4, 2.0), ident=(1.0, 1.0), rank=2)
    assert "smaller than" in R.prediction_comparison(m1, m2) and "does not show" in R.prediction_comparison(m1, m2)
    m1["fit"]["y"] = _fit(0.5, 1.5, 2.0)  # a worse fit on the line: no conclusion drawn about identification
    assert "larger than" in R.prediction_comparison(m1, m2) and "does not show" not in R.prediction_comparison(m1, m2)


def test_fit_summary_locates_the_poor_region():
    """A learned curve that is exact except on t in [1.5, 4.5]: the summary's worst interval is that one."""
    from nnpartials.demo import fit_summary

    t = np.linspace(0.0, 2 * np.pi, 2000)
    truth = np.cos(t) - 1.5 * np.sin(1.5 * t)
    learned = truth + np.where((t >= 1.5) & (t <= 4.5), 0.6, 0.0)
    f = fit_summary(learned, truth, t)
    a, b = f["worst_interval"]
    step = t[1] - t[0]
    assert abs(a - 1.5) <= step and abs(b - 4.5) <= step
    assert f["max_abs"] == pytest.approx(0.6) and f["peak"] == pytest.approx(np.max(np.abs(truth)))
    assert f["above_fraction"] == pytest.approx(np.mean((t >= 1.5) & (t <= 4.5)), abs=1e-3)
    assert fit_summary(truth + 1e-3, truth, t)["worst_interval"] is None


def _patched_report(demo, tmp_path, name, patch):
    """The quick run's result with some of its numbers replaced, rendered again (markdown and console)."""
    from rich.console import Console

    from nnpartials import demo_report

    res = copy.deepcopy(demo)
    res.out = str(tmp_path / name)
    os.makedirs(res.out)
    for s in res.scenarios:
        patch(s.key, s.metrics)
    md = open(demo_report.write_markdown(res), encoding="utf-8").read()
    buf = io.StringIO()
    demo_report.print_summary(res, Console(file=buf, width=400))
    return md, buf.getvalue()


def _directional_lines(text):
    """The sentences (report bullets, console lines) on the directional derivative; not the table row, which shows
    the numbers and the verdict but no region."""
    return [ln for ln in text.splitlines() if "RMS / max error" not in ln and
            ("along the data line, ∂y/∂x1 + 1.5·∂y/∂x2" in ln or "along (1, 1.5) vs" in ln)]


def test_report_does_not_claim_accuracy_for_large_errors(demo, tmp_path):
    """Scenario 1's directional derivative with the origin issue's numbers, the prediction underfitting on
    t in [1.5, 4.5]: the report calls the derivative identified but not accurately learned, and says where."""
    def patch(key, m):
        peak = m["fit"]["directional"]["peak"]
        m["fit"]["directional"] = _fit(0.11 * peak, 0.5 * peak, peak, (0.3, 1.1), 0.5, 0.3)
        m["fit"]["y"] = _fit(0.15, 0.6, m["fit"]["y"]["peak"], (1.5, 4.5), 3.0, 0.45)

    md, console = _patched_report(demo, tmp_path, "large", patch)
    table_row = [ln for ln in md.splitlines() if ln.startswith("| directional derivative along (1, 1.5) vs")]
    assert len(table_row) == 1 and "learned only roughly" in table_row[0] and "accurately" not in table_row[0]
    for text in (md, console):
        lines = _directional_lines(text)
        assert lines, text
        for ln in lines:
            assert "learned only roughly" in ln and "accurately learned" not in ln, ln
            assert "t ∈ [0.30, 1.10]" in ln, ln
    assert "fits y accurately" not in md and "fits y only roughly" in md and "t ∈ [1.50, 4.50]" in md
    answer = md.split("## The answer", 1)[1].split("## Results", 1)[0]
    assert not re.search(r"\bmatch(es|ed)?\b|\breproduces?\b", answer), answer


def test_report_claims_accuracy_only_for_small_errors(demo, tmp_path):
    def patch(key, m):
        for k, f in m["fit"].items():
            m["fit"][k] = _fit(0.01 * f["peak"], 0.05 * f["peak"], f["peak"])
        for k, f in m["fit_test"].items():
            m["fit_test"][k] = _fit(0.01 * f["peak"], 0.05 * f["peak"], f["peak"])

    md, console = _patched_report(demo, tmp_path, "small", patch)
    for text in (md, console):
        lines = _directional_lines(text)
        assert lines and all("accurately learned" in ln for ln in lines), lines
        assert "fits y accurately" in text and "fits y only roughly" not in text
    # scenario 2's partials are identified, so with small errors they are called accurately learned; scenario 1's
    # are not identified, so however small their error, no accuracy verdict is given for them
    assert "∂y/∂x1 is identified at all line points and accurately learned" in md
    assert "∂y/∂x1 is not identified at any of the line points" in md
    assert "∂y/∂x1 is not identified at any of the line points and accurately" not in md


def test_report_verdicts_match_the_summary_numbers(demo):
    """In the quick run itself: every verdict word in summary.json is the one its numbers earn."""
    from nnpartials.demo_config import fit_grade

    summary = json.load(open(os.path.join(demo.out, "summary.json")))
    for key, sc in summary["scenarios"].items():
        for name, f in sc["metrics"]["fit"].items():
            assert sc["verdicts"][name] == fit_grade(f["rms"], f["max_abs"], f["peak"])
    report = open(os.path.join(demo.out, "report.md"), encoding="utf-8").read()
    from nnpartials.demo_config import GRADE_WORDS
    for sc in summary["scenarios"].values():
        words = GRADE_WORDS[sc["verdicts"]["directional"]]
        assert words in report


# ---- import structure ---------------------------------------------------------------------------------------------
def _module_file(name):
    parts = name.split(".")
    p = ROOT.joinpath(*parts)
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def _imports(path: Path, modname: str) -> set:
    """Every nnpartials module ``path`` imports, at any depth of the file (functions included), resolved to the
    longest module prefix that exists in nnpartials/ (``from nnpartials import x`` -> nnpartials.x if it is one)."""
    pkg = modname if path.name == "__init__.py" else modname.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            if not n.startswith("nnpartials"):
                continue
            parts = n.split(".")
            while parts and _module_file(".".join(parts)) is None:
                parts.pop()
            if parts and ".".join(parts) != modname:
                out.add(".".join(parts))
    return out


def test_demo_modules_have_one_direction():
    """The scenario's constants and truth live in demo_config; demo_plots and demo_report read them there and never
    import nnpartials.demo (which imports them), and demo_config imports none of the demo modules."""
    graph = {m: _imports(_module_file(m), m) for m in DEMO_MODULES}
    assert "nnpartials.demo" not in graph["nnpartials.demo_plots"]
    assert "nnpartials.demo" not in graph["nnpartials.demo_report"]
    assert not graph["nnpartials.demo_config"] & set(DEMO_MODULES)
    assert "nnpartials.demo_config" in graph["nnpartials.demo_plots"]
    assert "nnpartials.demo_config" in graph["nnpartials.demo_report"]


def test_no_import_cycle_in_the_package():
    """No cycle among the static imports (any depth, deferred ones included) of nnpartials/*.py and
    nnpartials/commands/*.py."""
    files = sorted((ROOT / "nnpartials").glob("*.py")) + sorted((ROOT / "nnpartials" / "commands").glob("*.py"))
    mods = {}
    for f in files:
        rel = f.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mods[name] = f
    graph = {m: {d for d in _imports(f, m) if d in mods} for m, f in mods.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", DEMO_MODULES)
def test_demo_module_imports_alone(module):
    """Each demo module imports first in a fresh interpreter; the plots and report do not pull in nnpartials.demo."""
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "print('nnpartials.demo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded_demo = out.stdout.strip().splitlines()[-1] == "True"
    assert loaded_demo == (module == "nnpartials.demo"), (module, out.stdout)
