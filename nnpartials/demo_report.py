"""The report of ``nnpartials demo``: ``summary.json``, ``report.md`` and the console summary.

Every sentence is derived from the numbers the report shows. Two things are kept apart:

* *identified*: whether the training inputs determine a quantity at all; from the diagnostics (the rank of the
  training inputs and the directions they support), never from an error;
* *accurately learned*: how far the network's value is from the analytic truth; from its RMS and largest error
  against the analytic curve's peak, graded with the thresholds of :mod:`nnpartials.demo_config`
  (``ACCURATE_MAX_FRAC``, ``ROUGH_RMS_FRAC``; :func:`~nnpartials.demo_config.fit_grade`).

The phrase functions (:func:`learned_phrase`, :func:`prediction_sentence`, :func:`partial_sentence`,
:func:`directional_sentence`, ...) take plain numbers (the ``metrics`` dicts of ``summary.json``), so the wording can
be tested against numbers, not against one training run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from nnpartials.demo_config import (ACCURATE, ACCURATE_MAX_FRAC, BATCH_SIZE, CROSSCHECK_MIN_FRACTION,
                                    ENSEMBLE_AGREE_FRAC, FD_AGREE_RMS_FRAC, GRADE_WORDS, HIDDEN_UNITS, LEAKY_SLOPE,
                                    LEARNING_RATE, PREDICTION_WORDS, QUESTION_FD_STEP, ROUGH, ROUGH_RMS_FRAC,
                                    ROW_DIFF_KEPT_FRAC, TEST_SIZE, VALIDATION_SPLIT, ZERO_TRUTH_PEAK_LABEL, fit_grade,
                                    identified_words)


def _dir(d):
    d = np.asarray(d, dtype=float)
    return f"({d[0]:+.4f}, {d[1]:+.4f}) ∝ (1, {d[1] / d[0]:.4g})" if abs(d[0]) > 1e-12 else \
        f"({d[0]:+.4f}, {d[1]:+.4f})"


def _pi(cfg, factor=1.0):
    v = cfg.x1_max_pi * factor
    return f"{v:g}π"


def _check_txt(c):
    if not c.get("available", True):
        reason = c["reason"] if len(c["reason"]) <= 120 else c["reason"][:117] + "..."
        return f"not run ({reason})"
    txt = (f"{'passed' if c['passed'] else 'FAILED'}: {c['agree']}/{c['points']} points agree "
           f"(largest difference {c['max_abs_diff']:.2g}, median {c['median_abs_diff']:.2g}")
    if "kink_points" in c:
        txt += (f"; {c['kink_points']} point{'' if c['kink_points'] == 1 else 's'} within a step of a kink, "
                f"largest difference elsewhere "
                f"{c['max_abs_diff_away_from_kinks']:.2g}")
    return txt + ")"


def agreement_phrase(s) -> str:
    """What the cross-checks of one scenario established, in words (only what actually passed)."""
    tape, fd = s.checks["gradient_tape"], s.checks["c_core_fd"]
    ok = [name for name, c in (("TensorFlow's GradientTape", tape), ("the C core's finite differences", fd))
          if c.get("available", True) and c["passed"]]
    bad = [name for name, c in (("GradientTape", tape), ("the C core's finite differences", fd))
           if c.get("available", True) and not c["passed"]]
    missing = [] if fd.get("available", True) else ["the C core was not available, so its cross-check did not run"]
    txt = ("the onnxruntime partials agree with " + " and with ".join(ok)) if ok else "no cross-check passed"
    if bad:
        txt += "; they DISAGREE with " + " and ".join(bad)
    if missing:
        txt += "; " + missing[0]
    return txt


# ---- verdicts in words, from numbers ------------------------------------------------------------------------------
DIRECTIONAL_REF = "cos t − 1.5 sin 1.5t"


def grade(f: dict) -> str:
    """The grade (``accurate``/``rough``/``poor``) of a fit summary: a dict with ``rms``, ``max_abs``, ``peak``."""
    return fit_grade(f["rms"], f["max_abs"], f["peak"])


def _pct(a, peak) -> float:
    return 100.0 * a / peak if peak > 0 else float("inf")


def error_numbers(f: dict) -> str:
    """``RMS 0.28, max 1.24 = 50 % of the peak 2.50`` (the peak's name from ``peak_label`` when the fit has one)."""
    return (f"RMS {f['rms']:.3g}, max {f['max_abs']:.3g} = {_pct(f['max_abs'], f['peak']):.0f} % of "
            f"{f.get('peak_label', 'the peak')} {f['peak']:.2f}")


def _line(fraction: float) -> str:
    return identified_words(fraction, "line points")


def compact_phrase(f: dict, ident_fraction: float = None, words: dict = GRADE_WORDS) -> str:
    """One line for a caption or the console: ``identified at all line points, learned only roughly (RMS …, max … =
    …% of the peak …; worst on t ∈ [a, b])``; a quantity that is not identified gets no accuracy verdict."""
    parts = []
    if ident_fraction is not None:
        parts.append(_line(ident_fraction))
    if ident_fraction is None or ident_fraction > 0:
        parts.append(words[grade(f)])
    txt = ", ".join(parts) + f" ({error_numbers(f)}"
    if grade(f) != ACCURATE and f.get("worst_interval"):
        a, b = f["worst_interval"]
        txt += f"; worst on t ∈ [{a:.2f}, {b:.2f}]"
    return txt + ")"


def _criterion(f: dict) -> str:
    g = grade(f)
    if g == ACCURATE:
        return f" (within the {100 * ACCURATE_MAX_FRAC:.0f} % the verdict \"accurate\" allows)"
    if g == ROUGH:
        return f" (the verdict \"accurate\" requires a max within {100 * ACCURATE_MAX_FRAC:.0f} % of the peak)"
    return (f" (RMS {_pct(f['rms'], f['peak']):.0f} % of the peak, above the {100 * ROUGH_RMS_FRAC:.0f} % allowed for "
            "\"roughly\")")


def where_phrase(f: dict) -> str:
    """Where a fit that is not accurate goes wrong: the share of points whose error exceeds ``ACCURATE_MAX_FRAC`` of
    the peak, the t-interval of the worst such region and where the largest error sits ("" when accurate)."""
    if grade(f) == ACCURATE:
        return ""
    parts = []
    if "above_fraction" in f:
        parts.append(f"the error exceeds {100 * ACCURATE_MAX_FRAC:.0f} % of the peak at "
                     f"{100 * f['above_fraction']:.0f} % of the points")
    if f.get("worst_interval"):
        a, b = f["worst_interval"]
        n = f.get("poor_regions", 1)
        parts.append(f"worst on t ∈ [{a:.2f}, {b:.2f}]" + (f" (the worst of {n} such regions)" if n > 1 else ""))
    if "t_of_max" in f:
        parts.append(f"largest at t = {f['t_of_max']:.2f}")
    return ("; " + ", ".join(parts)) if parts else ""


def learned_phrase(f: dict, ref: str) -> str:
    """``learned only roughly: against <ref>, RMS …, max … (…% of the peak …) (…); worst on t ∈ [a, b]``."""
    return f"{GRADE_WORDS[grade(f)]}: against {ref}, {error_numbers(f)}{_criterion(f)}{where_phrase(f)}"


def prediction_sentence(f: dict, f_test: dict = None) -> str:
    """The prediction's verdict along the line (and on the held-out points), from its RMS and largest error."""
    txt = (f"the prediction {PREDICTION_WORDS[grade(f)]} along the line: {error_numbers(f)}{_criterion(f)}"
           f"{where_phrase(f)}")
    if f_test is not None:
        txt += f"; on the held-out test points it {PREDICTION_WORDS[grade(f_test)]} ({error_numbers(f_test)})"
    return txt


def partial_sentence(name: str, ref: str, ident_fraction: float, f: dict, f_test: dict = None) -> str:
    """Identification (from the diagnostics' share of line points) and accuracy (from the errors) of one partial."""
    test = ""
    if f_test is not None:
        test = f"; on the held-out test points {error_numbers(f_test)} ({GRADE_WORDS[grade(f_test)]})"
    if ident_fraction <= 0:
        txt = f"{name} is {_line(ident_fraction)}; it differs from {ref} by {error_numbers(f)}{test}"
        if grade(f) == ACCURATE:
            txt += ": close to it, although the data do not determine it"
        return txt
    conj = "and" if grade(f) == ACCURATE else "but"
    return f"{name} is {_line(ident_fraction)} {conj} {learned_phrase(f, ref)}{test}"


def directional_sentence(m: dict) -> str:
    """Identification (is (1, 1.5) in the span the data support?) and accuracy of the derivative along the line."""
    frac = m["directional_identified_fraction_on_line"]
    f = m["fit"]["directional"]
    within = "within" if m["directional_globally_identified"] else "beyond"
    basis = (f"the distance of (1, 1.5) from the span the training inputs support is "
             f"{m['directional_span_residual']:.2g}, {within} the tolerance {m['span_tol']:g}; effective rank "
             f"{m['effective_rank']}")
    name = "the derivative along the data line, ∂y/∂x1 + 1.5·∂y/∂x2,"
    if frac <= 0:
        txt = f"{name} is {_line(frac)} ({basis}); it differs from {DIRECTIONAL_REF} by {error_numbers(f)}"
        if grade(f) == ACCURATE:
            txt += ": close to it, although the data do not determine it"
        return txt
    conj = "and" if grade(f) == ACCURATE else "but"
    return f"{name} is {_line(frac)} ({basis}) {conj} {learned_phrase(f, DIRECTIONAL_REF)}"


def _fd_agrees(m: dict) -> bool:
    return m["rms_fd_vs_autodiff_directional"] <= FD_AGREE_RMS_FRAC * m["fit"]["directional"]["peak"]


def fd_along_data_sentence(m: dict) -> str:
    """The corrected finite difference of the predictions along the data against the autodiff directional derivative."""
    r = m["rms_fd_vs_autodiff_directional"]
    peak = m["fit"]["directional"]["peak"]
    agrees = _fd_agrees(m)
    return (f"Divided by the true step, the finite difference of the predictions along the data "
            f"{'agrees with' if agrees else 'differs from'} the autodiff directional derivative: RMS difference "
            f"{r:.3g}, {_pct(r, peak):.1f} % of the peak {peak:.2f} ({'within' if agrees else 'above'} the "
            f"{100 * FD_AGREE_RMS_FRAC:g} % counted as agreement)")


def prediction_comparison(m1: dict, m2: dict) -> str:
    """Scenario 1's prediction error against scenario 2's, and whether that tells anything about identification."""
    f1, f2 = m1["fit"]["y"], m2["fit"]["y"]
    ratio = f1["rms"] / f2["rms"] if f2["rms"] > 0 else float("inf")
    cmp = "smaller than" if ratio < 0.8 else "larger than" if ratio > 1.25 else "about the same as"
    txt = (f"Scenario 1's prediction error along the line (RMS {f1['rms']:.3g}) is {cmp} scenario 2's "
           f"(RMS {f2['rms']:.3g})")
    id1, id2 = max(m1["identified_fraction_on_line"]), min(m2["identified_fraction_on_line"])
    if id1 <= 0 < id2 and ratio <= 1.25:
        txt += (", yet only scenario 2's partials are identified: how well a network fits y does not show whether "
                "its partials are identified")
    return txt


def scenario_sentences(m: dict, with_test: bool = True) -> list:
    """(label, sentence) for the prediction, each partial and the directional derivative of one scenario."""
    ident = m["identified_fraction_on_line"]
    ft = m.get("fit_test", {}) if with_test else {}
    return [
        ("prediction", prediction_sentence(m["fit"]["y"], ft.get("y"))),
        ("∂y/∂x1", partial_sentence("∂y/∂x1", "cos(x1)", ident[0], m["fit"]["dy_dx1"], ft.get("dy_dx1"))),
        ("∂y/∂x2", partial_sentence("∂y/∂x2", "−sin(x2)", ident[1], m["fit"]["dy_dx2"], ft.get("dy_dx2"))),
        ("directional", directional_sentence(m)),
    ]


def compact_lines(m: dict) -> list:
    """(label, compact phrase) for the prediction, each partial and the directional derivative of one scenario."""
    ident = m["identified_fraction_on_line"]
    return [
        ("prediction y:", compact_phrase(m["fit"]["y"], words=PREDICTION_WORDS)),
        ("∂y/∂x1 vs cos(x1):", compact_phrase(m["fit"]["dy_dx1"], ident[0])),
        ("∂y/∂x2 vs −sin(x2):", compact_phrase(m["fit"]["dy_dx2"], ident[1])),
        (f"along (1, 1.5) vs {DIRECTIONAL_REF}:",
         compact_phrase(m["fit"]["directional"], m["directional_identified_fraction_on_line"])),
    ]


# ---- second derivatives ----------------------------------------------------------------------------------------
SECOND_DIRECTIONAL_REF = "−sin t − 2.25 cos 1.5t"
#: (key in metrics["second_order"]["fit"], name, analytic reference) of the second partials.
SECOND_PARTIALS = (("d2y_dx1dx1", "∂²y/∂x1²", "−sin(x1)"), ("d2y_dx2dx2", "∂²y/∂x2²", "−cos(x2)"),
                   ("d2y_dx1dx2", "∂²y/∂x1∂x2", "0"))


def hessian_is_zero(so: dict) -> bool:
    """The network's Hessian is exactly 0 at every point it was evaluated at (line and test points)."""
    return so["max_abs_hessian_line"] == 0.0 and so.get("max_abs_hessian_test", 0.0) == 0.0


def second_partial_sentence(name: str, ref: str, ident_fraction: float, f: dict, zero_net: bool) -> str:
    """A second partial's identification and accuracy, as :func:`partial_sentence`; when the network's Hessian is 0
    at every point (``zero_net``), agreement with a zero truth is not called learning."""
    if zero_net and ident_fraction > 0 and grade(f) == ACCURATE:
        return (f"{name} is {_line(ident_fraction)}; against {ref} its error is {error_numbers(f)}, the numbers of "
                f"\"{GRADE_WORDS[ACCURATE]}\", but every entry of this network's Hessian is 0 at these points, so "
                "matching a truth of 0 shows nothing learned")
    txt = partial_sentence(name, ref, ident_fraction, f)
    return txt + (" (the network's value is 0 at every line point)" if zero_net else "")


def second_directional_sentence(m: dict) -> str:
    """Identification (is u = (1, 1.5) in the supported span?) and accuracy of uᵀHu along the data line."""
    so = m["second_order"]
    frac = so["identified_fraction_on_line"]["directional2"]
    f = so["fit"]["directional2"]
    within = "within" if m["directional_globally_identified"] else "beyond"
    basis = (f"u = (1, 1.5) is at distance {m['directional_span_residual']:.2g} from the span the training inputs "
             f"support, {within} the tolerance {m['span_tol']:g}")
    name = "the second derivative along the data line, uᵀHu with u = (1, 1.5),"
    tail = " (the network's value is 0 at every line point)" if hessian_is_zero(so) else ""
    if frac <= 0:
        return (f"{name} is {_line(frac)} ({basis}); it differs from {SECOND_DIRECTIONAL_REF} by "
                f"{error_numbers(f)}{tail}")
    conj = "and" if grade(f) == ACCURATE else "but"
    return f"{name} is {_line(frac)} ({basis}) {conj} {learned_phrase(f, SECOND_DIRECTIONAL_REF)}{tail}"


def second_order_sentences(m: dict) -> list:
    """(label, sentence) for each second partial and the second derivative along the line of one scenario."""
    so = m["second_order"]
    zero = hessian_is_zero(so)
    ident = so["identified_fraction_on_line"]
    out = [(name, second_partial_sentence(name, ref, ident[key], so["fit"][key], zero))
           for key, name, ref in SECOND_PARTIALS]
    out.append(("second directional", second_directional_sentence(m)))
    return out


ZERO_MATCH_WORDS = "0 like the truth, but only as every entry of the network's Hessian is 0"


def second_compact_phrase(f: dict, ident_fraction: float, zero_net: bool) -> str:
    """:func:`compact_phrase` of a second derivative; a zero truth met by a network whose Hessian is 0 everywhere is
    not called learned."""
    if zero_net and ident_fraction > 0 and grade(f) == ACCURATE:
        return f"{_line(ident_fraction)}, {ZERO_MATCH_WORDS} ({error_numbers(f)})"
    return compact_phrase(f, ident_fraction)


def second_compact_lines(m: dict) -> list:
    """(label, compact phrase) for each second partial and uᵀHu of one scenario (console, table, plot caption)."""
    so = m["second_order"]
    zero = hessian_is_zero(so)
    ident = so["identified_fraction_on_line"]
    return ([(f"{name} vs {ref}:", second_compact_phrase(so["fit"][key], ident[key], zero))
             for key, name, ref in SECOND_PARTIALS]
            + [(f"uᵀHu (u = (1, 1.5)) vs {SECOND_DIRECTIONAL_REF}:",
                second_compact_phrase(so["fit"]["directional2"], ident["directional2"], zero))])


def _hessian_check_phrase(c: dict) -> str:
    if c["passed"] and c.get("max_abs_reference") == 0.0 and c.get("max_abs_onnxruntime") == 0.0:
        return "nested GradientTape gives 0 at every point too"
    if c["passed"]:
        return (f"nested GradientTape agrees ({c['agree']}/{c['points']} points, largest difference "
                f"{c['max_abs_diff']:.2g})")
    return (f"nested GradientTape DISAGREES ({c['agree']}/{c['points']} points agree, largest difference "
            f"{c['max_abs_diff']:.2g})")


def second_order_statement(scenarios) -> str:
    """Why the learned second derivatives look as they do, from the bundles' manifests and the computed Hessians."""
    sos = [s.metrics["second_order"] for s in scenarios]
    checks = [s.checks["hessian_gradient_tape"] for s in scenarios]
    counts = sorted({so["fit"]["directional2"]["points"] for so in sos})
    n_line = (f"{counts[0]} line points each" if len(counts) == 1 else
              " and ".join(str(n) for n in counts) + " line points")
    if all(so["zero_almost_everywhere"] for so in sos):
        txt = (f"The networks' activations (LeakyReLU, slope {LEAKY_SLOPE:g}) are piecewise linear, so their second "
               "derivatives are zero almost everywhere (wherever they exist; on the kinks they do not): the exporter "
               "found this in each bundle's forward graph and records it in the manifest "
               "(`second_order.zero_almost_everywhere`: true). ")
        if all(hessian_is_zero(so) for so in sos):
            txt += (f"The Hessians computed with onnxruntime are 0 at every evaluated point of both scenarios "
                    f"({n_line} and the held-out test points; largest absolute entry 0)")
        else:
            txt += ("The largest absolute Hessian entry computed with onnxruntime over the evaluated points is "
                    + " and ".join(f"{max(so['max_abs_hessian_line'], so['max_abs_hessian_test']):.3g} in scenario "
                                   f"{k}" for k, so in enumerate(sos, 1)))
        same = {_hessian_check_phrase(c) for c in checks}
        txt += ("; " + same.pop() if len(same) == 1 else
                "; " + "; ".join(f"scenario {k}: {_hessian_check_phrase(c)}" for k, c in enumerate(checks, 1)))
        txt += "."
        if all(hessian_is_zero(so) for so in sos):
            txt += (" That is why the learned second-derivative curves are flat: a zero curve against −sin(x1), "
                    f"−cos(x2) and {SECOND_DIRECTIONAL_REF}.")
        txt += (" To learn curvature, for example for a physics-informed loss built from the network's second "
                "derivatives, the network needs a smooth activation (tanh, gelu, …): a piecewise-linear network's "
                "second derivatives are zero wherever they exist, whatever the data.")
        return txt
    parts = []
    for k, (so, c) in enumerate(zip(sos, checks), 1):
        kind = "zero almost everywhere" if so["zero_almost_everywhere"] else "not zero almost everywhere"
        parts.append(f"Scenario {k}: the bundle's manifest says its second derivatives are {kind}; the largest "
                     f"absolute Hessian entry over the evaluated points is "
                     f"{max(so['max_abs_hessian_line'], so['max_abs_hessian_test']):.3g}; {_hessian_check_phrase(c)}.")
    return " ".join(parts)


def thresholds_sentence() -> str:
    return (f"\"Accurately learned\": the largest error over the points compared is at most "
            f"{100 * ACCURATE_MAX_FRAC:.0f} % of the analytic curve's peak; \"learned only roughly\": larger, but the "
            f"RMS error is at most {100 * ROUGH_RMS_FRAC:.0f} % of the peak; otherwise \"not learned\" (thresholds "
            "`ACCURATE_MAX_FRAC`, `ROUGH_RMS_FRAC` in `nnpartials/demo_config.py`); ∂²y/∂x1∂x2, whose analytic "
            f"value is 0, is measured against {ZERO_TRUTH_PEAK_LABEL} instead of its own. \"Identified\" comes from "
            "the training inputs alone (the diagnostics' rank and supported directions; a second partial "
            "∂²y/∂x_j∂x_k only where both e_j and e_k lie in the supported span), never from these errors.")


def _cap(txt: str) -> str:
    return txt[:1].upper() + txt[1:]


# ---- summary.json --------------------------------------------------------------------------------------------------
def verdicts(m: dict) -> dict:
    """The grade of each learned quantity (from its numbers), for ``summary.json``."""
    out = {k: grade(f) for k, f in m["fit"].items()}
    out.update({f"{k}_test": grade(f) for k, f in m.get("fit_test", {}).items()})
    out["identified_fraction_on_line"] = {"dy_dx1": m["identified_fraction_on_line"][0],
                                          "dy_dx2": m["identified_fraction_on_line"][1],
                                          "directional": m["directional_identified_fraction_on_line"]}
    if "second_order" in m:
        so = m["second_order"]
        out["second_order"] = {k: grade(f) for k, f in so["fit"].items()}
        out["second_order"].update({f"{k}_test": grade(f) for k, f in so.get("fit_test", {}).items()})
        out["second_order"]["identified_fraction_on_line"] = dict(so["identified_fraction_on_line"])
    return out


def summary_dict(result) -> dict:
    cfg = result.config
    return {
        "config": {k: getattr(cfg, k) for k in ("epochs", "line_points", "random_points", "ensemble", "seed",
                                                 "quick", "x1_max_pi")},
        "seconds": result.seconds,
        "thresholds": {"ACCURATE_MAX_FRAC": ACCURATE_MAX_FRAC, "ROUGH_RMS_FRAC": ROUGH_RMS_FRAC,
                       "FD_AGREE_RMS_FRAC": FD_AGREE_RMS_FRAC, "ROW_DIFF_KEPT_FRAC": ROW_DIFF_KEPT_FRAC,
                       "ENSEMBLE_AGREE_FRAC": ENSEMBLE_AGREE_FRAC},
        "scenarios": {
            s.key: {"title": s.title, "points": s.n_points, "train_points": int(len(s.x_train)),
                    "bundle": os.path.relpath(s.bundle_path, result.out), "metrics": s.metrics,
                    "verdicts": verdicts(s.metrics), "checks": s.checks, "timings": s.timings}
            for s in result.scenarios
        },
        "second_order": {
            "zero_almost_everywhere": all(s.metrics["second_order"]["zero_almost_everywhere"]
                                          for s in result.scenarios),
            "hessian_zero_at_every_point": all(hessian_is_zero(s.metrics["second_order"]) for s in result.scenarios),
            "statement": second_order_statement(result.scenarios),
        },
    }


def write_summary_json(result) -> str:
    path = Path(result.out) / "summary.json"
    path.write_text(json.dumps(summary_dict(result), indent=2) + "\n", encoding="utf-8")
    return str(path)


# ---- tables --------------------------------------------------------------------------------------------------------
def _fit_cell(f: dict, words: dict = GRADE_WORDS) -> str:
    return (f"{f['rms']:.3f} / {f['max_abs']:.3f} ({_pct(f['max_abs'], f['peak']):.0f} % of "
            f"{f.get('peak_label', 'peak')} {f['peak']:.2f}): {words[grade(f)]}")


def _scenario_rows(s):
    m, c = s.metrics, s.checks
    g = s.diagnosis.global_
    ident = m["identified_fraction_on_line"]
    fit, ft = m["fit"], m["fit_test"]
    rows = [
        ("training points (after the 0.2 test split)", f"{len(s.x_train)}"),
        ("final training / validation MAE", f"{m['final_loss']:.4f} / {m['final_val_loss']:.4f}"),
        ("prediction y along the line: RMS / max error", _fit_cell(fit["y"], PREDICTION_WORDS)),
        ("prediction y on the held-out test points: RMS / max error", _fit_cell(ft["y"], PREDICTION_WORDS)),
        ("onnxruntime partials vs GradientTape", _check_txt(c["gradient_tape"])),
        ("onnxruntime partials vs C core finite differences", _check_txt(c["c_core_fd"])),
        ("effective rank of the training inputs", f"{g.effective_rank} of 2 (relative singular values "
                                                  + ", ".join(f"{r:.2g}" for r in g.relative) + ")"),
        ("supported direction(s), input units", "every direction" if g.full_rank
         else "; ".join(_dir(d) for d in g.supported_directions)),
        ("no information along", "—" if g.full_rank else "; ".join(_dir(d) for d in g.null_directions)),
        ("∂y/∂x1 identified (share of line points)", f"{100 * ident[0]:.0f}%"),
        ("∂y/∂x2 identified (share of line points)", f"{100 * ident[1]:.0f}%"),
        ("directional derivative along (1, 1.5) identified (share of line points)",
         f"{100 * m['directional_identified_fraction_on_line']:.0f}%"),
        ("∂y/∂x1 vs cos(x1) along the line: RMS / max error", _fit_cell(fit["dy_dx1"])),
        ("∂y/∂x1 vs cos(x1) on the test points: RMS / max error", _fit_cell(ft["dy_dx1"])),
        ("∂y/∂x2 vs −sin(x2) along the line: RMS / max error", _fit_cell(fit["dy_dx2"])),
        ("∂y/∂x2 vs −sin(x2) on the test points: RMS / max error", _fit_cell(ft["dy_dx2"])),
        ("directional derivative along (1, 1.5) vs cos t − 1.5 sin 1.5t: RMS / max error",
         _fit_cell(fit["directional"])),
        ("finite difference of ŷ along the data (step Δx1) vs autodiff directional: RMS",
         f"{m['rms_fd_vs_autodiff_directional']:.4f}"),
        (f"the question's finite difference Δŷ/{QUESTION_FD_STEP:g} vs analytic: RMS",
         f"{m['rms_question_fd']:.3f} (it is {m['line_step_x1'] / QUESTION_FD_STEP:.3f}× the slope along the data)"),
    ]
    rows.append(("first Dense kernel: largest change of a weight / of the row difference W_x1 − W_x2",
                 f"{m['first_layer_row_change']:.3g} / {m['first_layer_row_difference_change']:.2g}"))
    sh = m["along_data_shares"]
    rows.append((f"∂y/∂x1, ∂y/∂x2 vs their shares ({sh[0]:.3g}, {sh[1]:.3g}) of cos t − 1.5 sin 1.5t: RMS",
                 f"{m['rms_dy_dx1_vs_share']:.3f}, {m['rms_dy_dx2_vs_share']:.3f}"))
    if "ensemble_size" in m:
        rows.append((f"median std across {m['ensemble_size']} seeds: ∂y/∂x1, ∂y/∂x2, directional",
                     f"{m['ensemble_median_std_dy_dx1']:.3f}, {m['ensemble_median_std_dy_dx2']:.3f}, "
                     f"{m['ensemble_median_std_directional']:.3f}"))
    so = m["second_order"]
    rows.append(("onnxruntime Hessians vs nested GradientTape", _check_txt(c["hessian_gradient_tape"])))
    rows.append(("second derivatives zero almost everywhere (bundle manifest); largest absolute Hessian entry "
                 "on the line",
                 f"{'yes' if so['zero_almost_everywhere'] else 'no'}; {so['max_abs_hessian_line']:.3g}"))
    for label, txt in second_compact_lines(m):
        rows.append((f"{label.rstrip(':')} along the line", txt))
    t = s.timings
    rows.append(("time: training, export (order 2), C-core FD, Hessian vs GradientTape"
                 + (", ensemble" if "ensemble_s" in t else ""),
                 f"{t['train_s']:.1f} s, {t['export_s']:.1f} s, {t['c_core_fd_s']:.2f} s, "
                 f"{t['hessian_tape_s']:.1f} s" + (f", {t['ensemble_s']:.1f} s" if "ensemble_s" in t else "")))
    return rows


def print_summary(result, console) -> None:
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    s1, s2 = result.scenarios
    table = Table(title="nnpartials demo: partials of y = sin(x1) + cos(x2) learnt by a Keras MLP", show_lines=False)
    table.add_column("")
    table.add_column("Scenario 1: x2 = 1.5·x1 (as asked)")
    table.add_column("Scenario 2: independent (x1, x2)")
    for (label, a), (_, b) in zip(_scenario_rows(s1), _scenario_rows(s2)):
        table.add_row(label, a, b)
    console.print(table)
    lines = []
    for k, s in enumerate((s1, s2), 1):
        lines.append(f"[bold]Scenario {k}[/] (effective rank {s.diagnosis.global_.effective_rank}): "
                     + escape(_cap(agreement_phrase(s))) + ".")
        for label, txt in compact_lines(s.metrics) + second_compact_lines(s.metrics):
            lines.append(f"  • {escape(label)} {escape(txt)}")
    lines.append(escape(second_order_statement((s1, s2))))
    lines.append(escape(f"Verdicts: max error ≤ {100 * ACCURATE_MAX_FRAC:.0f} % of the peak: accurately learned; "
                        f"RMS ≤ {100 * ROUGH_RMS_FRAC:.0f} % of the peak: only roughly; else not learned."))
    lines.append(f"Report: {escape(os.path.join(result.out, 'report.md'))}  ({result.seconds:.0f} s)")
    console.print(Panel("\n".join(lines), title="What this shows", expand=False))


def write_markdown(result) -> str:
    s1, s2 = result.scenarios
    m1, m2 = s1.metrics, s2.metrics
    cfg = result.config
    g1 = s1.diagnosis.global_
    lines = []
    w = lines.append
    w("# nnpartials demo: which partial derivatives did the network learn?")
    w("")
    w("## The question")
    w("")
    w(f"A Keras MLP (Normalization, Dense {'-'.join(map(str, HIDDEN_UNITS))} with LeakyReLU (slope {LEAKY_SLOPE:g}), "
      f"linear output; mean absolute error, Adam({LEARNING_RATE:g}), batch {BATCH_SIZE}, train/test split "
      f"{TEST_SIZE:g} with random_state 0, validation_split {VALIDATION_SPLIT:g}, {cfg.epochs} epochs) is trained on "
      f"`x1 = linspace(0, {_pi(cfg)}, {cfg.line_points})`, `x2 = 1.5·x1`, `y = sin(x1) + cos(x2)`. The asker "
      "reports predictions that look right, but GradientTape's `∂y/∂x1` far from `cos(x1)`, and asks whether "
      "autodiff returns a \"total derivative\".")
    w("")
    w("## The answer")
    w("")
    checks_ok = all(c["passed"] for s in (s1, s2) for c in s.checks.values() if c.get("available", True))
    if checks_ok:
        w(f"No. The partials are the network's own partial derivatives: {agreement_phrase(s1)}.")
    else:
        w(f"The cross-checks did not all pass ({agreement_phrase(s1)}; scenario 2: {agreement_phrase(s2)}), so the "
          "partials below may not be the network's own; read the rest with that in mind.")
    w("")
    line_only = g1.effective_rank == 1 and m1["directional_globally_identified"]
    if line_only:
        w("But every training point of scenario 1 lies on the line `x = (t, 1.5t)`: the training inputs have "
          f"effective rank {g1.effective_rank} after the model's normalisation, with the supported direction "
          f"{_dir(g1.supported_directions[0])} in input units. The data therefore determine only the derivative "
          "**along** that line,")
        w("")
        w("    d/dt [sin t + cos 1.5t] = cos t − 1.5 sin 1.5t   (= ∂y/∂x1 + 1.5·∂y/∂x2),")
        w("")
        w("and nothing about how `y` changes across it, so how that one number is shared between `∂y/∂x1` and "
          f"`∂y/∂x2` is not determined by the data. The diagnostics find ∂y/∂x1 "
          f"{_line(m1['identified_fraction_on_line'][0])} and ∂y/∂x2 "
          f"{_line(m1['identified_fraction_on_line'][1])}.")
    else:
        w(f"Scenario 1's training inputs have effective rank {g1.effective_rank} after the model's normalisation "
          "(this run's settings differ from the question's or its data do not lie on one line); the verdicts below "
          "say what they identify.")
    w("")
    w(_identified_vs_learned(m1, m2) + " Per scenario:")
    w("")
    for k, s in enumerate((s1, s2), 1):
        w(f"- **Scenario {k}** ({'x2 = 1.5·x1, as asked' if s.key == 'line' else 'independent (x1, x2)'}):")
        for _, txt in scenario_sentences(s.metrics):
            w(f"  - {_cap(txt)}.")
    w("")
    w(thresholds_sentence())
    w("")
    w(f"The question's finite difference also divided by {QUESTION_FD_STEP:g}, while consecutive points are "
      f"{_pi(cfg)}/{cfg.line_points - 1} = {m1['line_step_x1']:.5f} apart in `x1`: that quotient is "
      f"{m1['line_step_x1'] / QUESTION_FD_STEP:.3f}× the slope along the data. {fd_along_data_sentence(m1)}.")
    w("")
    if g1.effective_rank < 2:
        w("### Then what are the partials the network returns?")
        w("")
        w(_shares_paragraph(m1))
        w("")
    if "ensemble_size" in m1:
        w(_ensemble_paragraph(m1))
        w("")
    w("## Second derivatives")
    w("")
    w("Both bundles are exported with second derivatives (`order=2`): the Hessian `H` of each network along the line, "
      "from the bundle's Hessian graph with onnxruntime, is compared with ∂²y/∂x1² = −sin(x1), ∂²y/∂x2² = −cos(x2) and "
      f"∂²y/∂x1∂x2 = 0, and the second derivative along the data line, `uᵀHu` with `u = (1, 1.5)` (per unit t), with "
      f"d²/dt² [sin t + cos 1.5t] = {SECOND_DIRECTIONAL_REF}.")
    w("")
    w(second_order_statement((s1, s2)))
    w("")
    for k, s in enumerate((s1, s2), 1):
        w(f"- **Scenario {k}** ({'x2 = 1.5·x1, as asked' if s.key == 'line' else 'independent (x1, x2)'}):")
        for _, txt in second_order_sentences(s.metrics):
            w(f"  - {_cap(txt)}.")
    w("")
    w("## Results")
    w("")
    w(f"All line metrics are evaluated at the question's points `x1 = linspace(0, {_pi(cfg)}, "
      f"{cfg.line_points})`, `x2 = 1.5·x1` (inside scenario 2's domain as well); \"test points\" are the "
      "held-out 20 % of each scenario's own data. Errors are given as RMS / max, the max also as a percentage of the "
      "analytic curve's peak, with the verdict it earns.")
    w("")
    w("| | Scenario 1: x2 = 1.5·x1 (as asked) | Scenario 2: independent (x1, x2) |")
    w("|---|---|---|")
    for (label, a), (_, b) in zip(_scenario_rows(s1), _scenario_rows(s2)):
        w(f"| {label} | {a} | {b} |")
    w("")
    w(f"Scenario 2 draws {cfg.random_points} points uniformly over x1 ∈ [0, {_pi(cfg)}], x2 ∈ [0, "
      f"{_pi(cfg, 1.5)}]; network, loss, optimiser, split and epochs are those of scenario 1. "
      + (f"The ensemble retrains each network with {cfg.ensemble - 1} other seed(s) on the same data. "
         if cfg.ensemble >= 2 else "")
      + f"Cross-checks pass when at least {100 * CROSSCHECK_MIN_FRACTION:.0f} % of the points agree within the "
      "named tolerances (`JACOBIAN_F32` against GradientTape; `FD_F32_REL` plus the C core's own error estimate "
      "against its finite differences): LeakyReLU networks are piecewise linear and a finite-difference step that "
      "straddles a kink mixes two slopes.")
    w("")
    w("## Plots")
    w("")
    w("### Training inputs")
    w("")
    w("![training inputs](data.png)")
    w("")
    w(" ".join(_inputs_sentence(k, s) for k, s in enumerate((s1, s2), 1)))
    w("")
    w("### Prediction vs analytic")
    w("")
    w("![prediction](prediction.png)")
    w("")
    w(f"Scenario 1: {compact_phrase(m1['fit']['y'], words=PREDICTION_WORDS)}. Scenario 2: "
      f"{compact_phrase(m2['fit']['y'], words=PREDICTION_WORDS)}. {prediction_comparison(m1, m2)}.")
    w("")
    w("### Each partial vs analytic")
    w("")
    w("![partials](partials.png)")
    w("")
    parts = []
    for k, s in enumerate((s1, s2), 1):
        c = compact_lines(s.metrics)
        parts.append(f"Scenario {k} ({'left' if k == 1 else 'right'}): {c[1][0]} {c[1][1]}; {c[2][0]} {c[2][1]}.")
    w(" ".join(parts) + " The partials are piecewise constant because LeakyReLU networks are piecewise linear.")
    w("")
    w("### Directional derivative along the data line")
    w("")
    w("![directional](directional.png)")
    w("")
    w(f"Scenario 1: {compact_lines(m1)[3][1]}. Scenario 2: {compact_lines(m2)[3][1]}. The dashed curve is the "
      f"finite difference of the predictions along the data, divided by the true step; in scenario 1 it "
      f"{'agrees with' if _fd_agrees(m1) else 'differs from'} the autodiff curve (RMS difference "
      f"{m1['rms_fd_vs_autodiff_directional']:.3g}), in scenario 2 it "
      f"{'agrees with' if _fd_agrees(m2) else 'differs from'} it (RMS difference "
      f"{m2['rms_fd_vs_autodiff_directional']:.3g}).")
    w("")
    w("### Second derivatives vs analytic")
    w("")
    w("![second derivatives](second_derivatives.png)")
    w("")
    parts = []
    for k, s in enumerate((s1, s2), 1):
        parts.append(f"Scenario {k} ({'top' if k == 1 else 'bottom'} row): "
                     + "; ".join(f"{a} {b}" for a, b in second_compact_lines(s.metrics)) + ".")
    w(" ".join(parts))
    w("")
    w("## Reproduce and explore")
    w("")
    b1 = os.path.relpath(s1.bundle_path, result.out)
    w("```")
    w(f"nnpartials demo --out {result.out}" + (" --quick" if cfg.quick else ""))
    w(f"nnpartials diagnose {os.path.join(result.out, b1)} --data "
      f"{os.path.join(result.out, os.path.dirname(b1), 'train_x.npy')} --points '1,1.5;1,3'")
    w("```")
    w("")
    w("Files: `summary.json` (every number above, and the verdicts), `data.png`, `prediction.png`, `partials.png`, "
      "`directional.png`, `second_derivatives.png`, and per scenario a `bundle/` (model.onnx, model.jac.onnx, "
      "model.hess.onnx, model.lap.onnx, model.hvp.onnx, model.nnp, manifest.json, validation.json) and `train_x.npy` "
      "(the training inputs).")
    w("")
    w(f"Run time: {result.seconds:.0f} s.")
    path = Path(result.out) / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _identified_vs_learned(m1: dict, m2: dict) -> str:
    """How many of the quantities the data identify (at every line point) were also learned accurately."""
    ident, accurate = [], []
    for k, m in enumerate((m1, m2), 1):
        fr = m["identified_fraction_on_line"]
        for key, name, frac in (("dy_dx1", "∂y/∂x1", fr[0]), ("dy_dx2", "∂y/∂x2", fr[1]),
                                ("directional", "the directional derivative",
                                 m["directional_identified_fraction_on_line"])):
            if frac >= 1.0:
                ident.append(f"{name} of scenario {k}")
                if grade(m["fit"][key]) == ACCURATE:
                    accurate.append(ident[-1])
    if not ident:
        return "The data identify none of the derivatives at every line point."
    n, a = len(ident), len(accurate)
    txt = f"The data identify {n} of the derivatives compared here at every line point; "
    if a == n:
        return txt + "the networks learned all of them accurately."
    return (txt + f"{'none' if a == 0 else a} of them {'was' if a == 1 else 'were'} learned accurately. Identified is "
            "not the same as accurately learned.")


def _inputs_sentence(k, s) -> str:
    g = s.diagnosis.global_
    if g.full_rank:
        return (f"Scenario {k}: effective rank {g.effective_rank} of {len(g.singular_values)}, every direction "
                "informative.")
    sup = "; ".join(_dir(d) for d in g.supported_directions)
    null = "; ".join(_dir(d) for d in g.null_directions)
    return (f"Scenario {k}: effective rank {g.effective_rank} of {len(g.singular_values)}: informative along {sup} "
            f"(input units), no information along {null}.")


def _shares_paragraph(m: dict) -> str:
    """Scenario 1: why the partials come out as they do, stated only as far as the numbers show it."""
    std = m["normalization_std"]
    sh = m["along_data_shares"]
    dz = m.get("max_abs_z1_minus_z2")
    ch, dch = m["first_layer_row_change"], m["first_layer_row_difference_change"]
    kept = dch <= ROW_DIFF_KEPT_FRAC * ch
    txt = ("The network sees its inputs through its Normalization layer, `z = (x − mean) / std`; here "
           f"std(x2)/std(x1) = {std[1] / std[0]:.6g}")
    txt += (f", so `z1` and `z2` differ by at most {dz:.1g} at any training point. " if dz is not None else ". ")
    if kept:
        txt += ("The loss then has the same gradient with respect to the two rows of the first Dense kernel (the "
                "weights of `z1` and of `z2`), Adam moves them alike, and their difference, which alone makes the "
                "network respond differently to `z1` and `z2`, kept its initial value: training moved single weights "
                f"by up to {ch:.3g}, their difference by {dch:.1g} (at most {ROW_DIFF_KEPT_FRAC:g} of that counts as "
                "kept). The slope across the line is therefore set by the random initial weights (seen through the "
                "trained later layers), not by the data. ")
    else:
        txt += (f"Training moved single weights of the first Dense kernel by up to {ch:.3g} and the difference of its "
                f"two rows by {dch:.2g}, more than the {ROW_DIFF_KEPT_FRAC:g} of that counted as kept, so these rows "
                "did not move alike. ")
    r1, r2 = m["rms_dy_dx1_vs_share"], m["rms_dy_dx2_vs_share"]
    a1, a2 = m["fit"]["dy_dx1"]["rms"], m["fit"]["dy_dx2"]["rms"]
    txt += ("With nothing across the line in `z`, the along-line slope `D = cos t − 1.5 sin 1.5t` would split as "
            f"`∂y/∂x1 ≈ {sh[0]:.3g}·D` and `∂y/∂x2 ≈ {sh[1]:.3g}·D` (gradient ∝ std⁻²·(1, 1.5)). ")
    if r1 < a1 and r2 < a2:
        txt += (f"The network's partials are closer to these shares (RMS {r1:.3f} and {r2:.3f}) than to `cos(x1)` and "
                f"`−sin(x2)` (RMS {a1:.3f} and {a2:.3f}).")
    else:
        txt += (f"The network's partials are not closer to these shares (RMS {r1:.3f} and {r2:.3f}) than to "
                f"`cos(x1)` and `−sin(x2)` (RMS {a1:.3f} and {a2:.3f}) in both coordinates.")
    return txt


def _ensemble_paragraph(m: dict) -> str:
    n = m["ensemble_size"]
    sd1, sdd = m["ensemble_median_std_dy_dx1"], m["ensemble_median_std_directional"]
    e1, ed = m["fit"]["dy_dx1"]["rms"], m["fit"]["directional"]["rms"]
    txt = (f"Networks trained with {n - 1} other seed(s) on the same data: the median std of ∂y/∂x1 across the "
           f"{n} networks is {sd1:.3f}, against an RMS error of {e1:.3f} from `cos(x1)`; of the directional "
           f"derivative {sdd:.3f}, against an RMS error of {ed:.3f}.")
    if sd1 <= ENSEMBLE_AGREE_FRAC * e1 and m["identified_fraction_on_line"][0] <= 0:
        txt += (f" The seeds agree with each other (spread at most {ENSEMBLE_AGREE_FRAC:g} of the error) about a "
                "partial the data do not identify: a small spread across seeds is no evidence that a partial is "
                "identified; the rank of the data is.")
    elif sd1 > ENSEMBLE_AGREE_FRAC * e1:
        txt += f" The spread across seeds is more than {ENSEMBLE_AGREE_FRAC:g} of the error."
    return txt
