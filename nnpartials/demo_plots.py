"""PNG plots of ``nnpartials demo``: both scenarios side by side, always evaluated along the data line
x = (t, 1.5 t), t in [0, 6π] (inside scenario 2's domain too, so the panels compare like with like).

Titles state only what the numbers in ``metrics`` show: errors with the verdict words of
:mod:`nnpartials.demo_config` (the thresholds the report uses), and identification from the diagnostics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnpartials.demo_config import (ACCURATE, LINE_TANGENT, PREDICTION_WORDS, X2_FACTOR, analytic_directional,
                                    analytic_hessian, analytic_partials, analytic_second_directional, fit_grade,
                                    fit_words, identified_words, target)

ANALYTIC = dict(color="black", lw=1.6, label="analytic")
MODEL = dict(color="tab:blue", lw=1.1)
FD = dict(color="tab:orange", lw=1.0, ls="--")
BAND = dict(color="tab:blue", alpha=0.18, lw=0)
RED = "tab:red"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _short(s):
    return "Scenario 1: on the line x2 = 1.5·x1" if s.key == "line" else "Scenario 2: independent (x1, x2)"


def _accurate(f) -> bool:
    return fit_grade(f["rms"], f["max_abs"], f["peak"]) == ACCURATE


def _prediction_words(f) -> str:
    return PREDICTION_WORDS[fit_grade(f["rms"], f["max_abs"], f["peak"])]


def _frac(v):
    for num, den in ((1, 2), (1, 3), (2, 3), (1, 4), (3, 4)):
        if abs(v - num / den) < 5e-3:
            return f"{num}/{den}"
    return f"{v:.3g}"


def _figure_legend(fig, axes):
    """One legend below the panels (entries of all panels, each label once), so no curve is hidden."""
    seen = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center", ncols=min(3, len(seen)),
               fontsize=9, frameon=False)


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def plot_data(scenarios, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(scenarios), figsize=(12, 4.8), layout="constrained")
    for ax, s in zip(np.atleast_1d(axes), scenarios):
        x = s.x_train
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, color="tab:gray", label=f"training inputs ({len(x)})")
        ax.plot(s.t, X2_FACTOR * s.t, color="tab:blue", lw=0.8, alpha=0.7, label="evaluation line x2 = 1.5·x1")
        g = s.diagnosis.global_
        c = x.mean(axis=0)
        L = 0.3 * float(np.ptp(x[:, 1]))
        box = dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85)
        for k, d in enumerate(g.supported_directions if not g.full_rank else []):
            ax.annotate("", xy=c + L * d, xytext=c, arrowprops=dict(arrowstyle="-|>", color="tab:green", lw=2.5))
            ax.text(*(c + 1.02 * L * d), "supported ∝ (1, %.3g)" % (d[1] / d[0]), color="tab:green", fontsize=9,
                    ha="left", va="bottom", bbox=box)
        for d in g.null_directions:
            ax.annotate("", xy=c + L * d, xytext=c, arrowprops=dict(arrowstyle="-|>", color=RED, lw=2.5))
            ax.text(*(c + 1.02 * L * d), "no information ∝ (1, %.3g)" % (d[1] / d[0]), color=RED, fontsize=9,
                    ha="right", va="bottom", bbox=box)
        if g.full_rank:
            ax.text(0.98, 0.02, "every direction informative", transform=ax.transAxes, ha="right", va="bottom",
                    color="tab:green", fontsize=10, bbox=box)
        rank_txt = f"effective rank {g.effective_rank} of {len(g.singular_values)}; relative singular values " \
                   + ", ".join(f"{r:.2g}" for r in g.relative)
        ax.set_title(f"{_short(s)}\n{rank_txt}", fontsize=10)
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        ax.legend(loc="upper left", fontsize=8, markerscale=4)
    fig.suptitle("Training inputs and the directions they inform (rank from the singular values after the model's "
                 "normalisation; directions in input units)", fontsize=11)
    return _save(fig, out / "data.png")


def plot_prediction(scenarios, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(scenarios), figsize=(12, 4), sharey=True, layout="constrained")
    for ax, s in zip(np.atleast_1d(axes), scenarios):
        t = s.t
        ax.plot(t, target(t, X2_FACTOR * t), **ANALYTIC)
        ax.plot(t, s.y_line, label="network (onnxruntime)", **MODEL)
        f = s.metrics["fit"]["y"]
        ax.set_title(f"{_short(s)}\nprediction y: RMS error {f['rms']:.3f}, max {f['max_abs']:.3f} "
                     f"({100 * f['max_abs'] / f['peak']:.0f} % of peak {f['peak']:.2f})\n{_prediction_words(f)}",
                     fontsize=10)
        if f.get("worst_interval") and not _accurate(f):
            a, b = f["worst_interval"]
            ax.axvspan(a, b, color=RED, alpha=0.08, lw=0, label="largest-error region")
        ax.set_xlabel("t = x1  (x2 = 1.5 t)")
    _figure_legend(fig, axes)
    np.atleast_1d(axes)[0].set_ylabel("y = sin(x1) + cos(x2)")
    fig.suptitle("Prediction vs analytic along the data line")
    return _save(fig, out / "prediction.png")


def plot_partials(scenarios, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(2, len(scenarios), figsize=(12, 7.5), sharex=True, sharey="row", layout="constrained")
    axes = np.asarray(axes).reshape(2, len(scenarios))
    names = ("∂y/∂x1", "∂y/∂x2")
    refs = ("cos(x1)", "−sin(x2)")
    for col, s in enumerate(scenarios):
        t = s.t
        a = analytic_partials(t, X2_FACTOR * t)
        ident = s.diagnosis.local.identified.mean(axis=0)
        for j in range(2):
            ax = axes[j, col]
            if s.ensemble_J is not None:
                lo = s.ensemble_J[:, :, j].min(axis=0)
                hi = s.ensemble_J[:, :, j].max(axis=0)
                ax.fill_between(t, lo, hi, label=f"range over {s.ensemble_J.shape[0]} seeds", **BAND)
            ax.plot(t, a[j], **{**ANALYTIC, "label": f"analytic {refs[j]}"})
            ax.plot(t, s.J_line[:, j], label="network partial (onnxruntime)", **MODEL)
            if s.key == "line":
                share = s.metrics["along_data_shares"][j]
                ax.plot(t, share * analytic_directional(t), color="tab:gray", lw=1.0, ls=":",
                        label=f"{_frac(share)}·(cos t − 1.5 sin 1.5t): its share of the along-line slope")
            f = s.metrics["fit"][f"dy_dx{j + 1}"]
            status = identified_words(ident[j], "line points")
            if ident[j] > 0:
                status += "; " + fit_words(f)
            colour = "black" if ident[j] > 0.5 else RED
            head = f"{_short(s)}\n" if j == 0 else ""
            ax.set_title(f"{head}{names[j]} vs {refs[j]}: RMS error {f['rms']:.3f}, max {f['max_abs']:.2f}\n{status}",
                         fontsize=10, color=colour)
            if col == 0:
                ax.set_ylabel(names[j])
            if j == 1:
                ax.set_xlabel("t = x1  (x2 = 1.5 t)")
    _figure_legend(fig, axes)
    fig.suptitle("Each partial vs analytic along the data line")
    return _save(fig, out / "partials.png")


def plot_directional(scenarios, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(scenarios), figsize=(12, 4.3), sharey=True, layout="constrained")
    for ax, s in zip(np.atleast_1d(axes), scenarios):
        t = s.t
        if s.ensemble_J is not None:
            d = s.ensemble_J @ LINE_TANGENT
            ax.fill_between(t, d.min(axis=0), d.max(axis=0), label=f"range over {d.shape[0]} seeds", **BAND)
        ax.plot(t, analytic_directional(t), **{**ANALYTIC, "label": "analytic cos t − 1.5 sin 1.5t"})
        ax.plot(t, s.dir_line, label="∂y/∂x1 + 1.5·∂y/∂x2 (autodiff)", **MODEL)
        ax.plot(t, s.fd_dir_line, label="finite difference of ŷ along the data, step Δx1", **FD)
        m = s.metrics
        f = m["fit"]["directional"]
        frac = m["directional_identified_fraction_on_line"]
        status = identified_words(frac, "line points") + (f"; {fit_words(f)}" if frac > 0 else "")
        ax.set_title(f"{_short(s)}\n{status}\nRMS error {f['rms']:.3f}, max {f['max_abs']:.2f} "
                     f"({100 * f['max_abs'] / f['peak']:.0f} % of peak {f['peak']:.2f}); "
                     f"FD vs autodiff RMS {m['rms_fd_vs_autodiff_directional']:.3f}", fontsize=10)
        if f.get("worst_interval") and not _accurate(f):
            a, b = f["worst_interval"]
            ax.axvspan(a, b, color=RED, alpha=0.08, lw=0, label="largest-error region")
        ax.set_xlabel("t = x1  (x2 = 1.5 t)")
    _figure_legend(fig, axes)
    np.atleast_1d(axes)[0].set_ylabel("d y / d t along x = (t, 1.5 t)")
    fig.suptitle("Directional derivative along the data line (1, 1.5)")
    return _save(fig, out / "directional.png")


def plot_second(scenarios, out: Path) -> str:
    """The network's second partials and uᵀHu along the line against the analytic ones: one row per scenario."""
    plt = _plt()
    fig, axes = plt.subplots(len(scenarios), 4, figsize=(17, 4.0 * len(scenarios)), sharex=True, sharey=True,
                             layout="constrained")
    axes = np.asarray(axes).reshape(len(scenarios), 4)
    panels = (("d2y_dx1dx1", "∂²y/∂x1²", "−sin(x1)"), ("d2y_dx2dx2", "∂²y/∂x2²", "−cos(x2)"),
              ("d2y_dx1dx2", "∂²y/∂x1∂x2", "0"), ("directional2", "uᵀHu, u = (1, 1.5)", "−sin t − 2.25 cos 1.5t"))
    zero_everywhere = True
    for row, s in enumerate(scenarios):
        t = s.t
        h11, h22, h12 = analytic_hessian(t, X2_FACTOR * t)
        truth = (h11, h22, h12, analytic_second_directional(t))
        learned = (s.H_line[:, 0, 0], s.H_line[:, 1, 1], s.H_line[:, 0, 1], s.dir2_line)
        so = s.metrics["second_order"]
        zero = so["max_abs_hessian_line"] == 0.0
        zero_everywhere = zero_everywhere and zero
        for col, (key, name, ref) in enumerate(panels):
            ax = axes[row, col]
            ax.plot(t, truth[col], **{**ANALYTIC, "label": "analytic"})
            ax.plot(t, learned[col], label="network (onnxruntime Hessian)", **{**MODEL, "lw": 1.6, "ls": "--"})
            f = so["fit"][key]
            ident = so["identified_fraction_on_line"][key]
            status = identified_words(ident, "line points")
            if ident > 0 and zero and _accurate(f):
                status += ";\n0 only as the network's whole Hessian is 0"
            elif ident > 0:
                status += "; " + fit_words(f)
            head = f"{_short(s)}\n" if col == 0 else "\n"
            ax.set_title(f"{head}{name} vs {ref}\nRMS error {f['rms']:.3f}, max {f['max_abs']:.2f}\n{status}",
                         fontsize=9, color="black" if ident > 0.5 else RED)
            if row == len(scenarios) - 1:
                ax.set_xlabel("t = x1  (x2 = 1.5 t)")
        axes[row, 0].set_ylabel("second derivative")
    _figure_legend(fig, axes)
    sub = "Second derivatives vs analytic along the data line"
    if zero_everywhere and all(s.metrics["second_order"]["zero_almost_everywhere"] for s in scenarios):
        sub += ("\nLeakyReLU networks are piecewise linear: their Hessian is 0 at every line point (zero almost "
                "everywhere), so the network curves are flat")
    fig.suptitle(sub)
    return _save(fig, out / "second_derivatives.png")


def write_all(scenarios, out: Path) -> list:
    out = Path(out)
    return [plot_data(scenarios, out), plot_prediction(scenarios, out), plot_partials(scenarios, out),
            plot_directional(scenarios, out), plot_second(scenarios, out)]
