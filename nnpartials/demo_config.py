"""The one home of ``nnpartials demo``'s scenario: the question's recipe, ranges and default sizes, the analytic
truth the networks are compared with, and the named thresholds behind every verdict word of the report.

``nnpartials.demo`` (training and evaluation), ``nnpartials.demo_plots`` and ``nnpartials.demo_report`` all import
from here, and this module imports none of them (only numpy and ``nnpartials.errors``), so the demo's modules form
no import cycle: demo -> demo_plots -> demo_config, demo -> demo_report -> demo_config.

The analytic truth::

    y(x1, x2)      = sin x1 + cos x2
    ∂y/∂x1         = cos x1
    ∂y/∂x2         = −sin x2
    data line      x = (t, 1.5 t),  tangent (1, 1.5)
    along the line d/dt y(t, 1.5 t) = cos t − 1.5 sin 1.5t   (= ∂y/∂x1 + 1.5·∂y/∂x2)
    ∂²y/∂x1²       = −sin x1
    ∂²y/∂x2²       = −cos x2
    ∂²y/∂x1∂x2     = 0
    along the line d²/dt² y(t, 1.5 t) = −sin t − 2.25 cos 1.5t   (= uᵀ H u, u = (1, 1.5))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nnpartials.errors import InputError

# ---- the recipe of the question -----------------------------------------------------------------------------
HIDDEN_UNITS = (64, 64, 32, 32, 16, 16, 8)
LEAKY_SLOPE = 0.3  # keras.layers.LeakyReLU's default negative slope
LEARNING_RATE = 1e-3
BATCH_SIZE = 32  # Keras' default
TEST_SIZE = 0.2
SPLIT_RANDOM_STATE = 0
VALIDATION_SPLIT = 0.2
X1_MAX_PI = 6.0  # x1 in [0, 6π]
X2_FACTOR = 1.5  # x2 = 1.5 x1 on the data line; x2 ranges over [0, 9π]

# ---- demo defaults ----------------------------------------------------------------------------------------------
DEFAULT_EPOCHS = 100
#: Points on the data line of scenario 1 (the question's linspace).
DEFAULT_LINE_POINTS = 2000
#: Independent points of scenario 2: a 2-D function needs more samples than a curve (2000 leave it under-fitted).
DEFAULT_RANDOM_POINTS = 8000
#: Networks per scenario for the ensemble spread (the main one plus this many minus one, other seeds); 0/1: none.
DEFAULT_ENSEMBLE = 3
DEFAULT_SEED = 0
DATA_SEED = 1  # the random draws of scenario 2
DEFAULT_OUT = "nnpartials_report"
#: Step the question's finite difference divided by (consecutive points are 6π/1999 apart in x1).
QUESTION_FD_STEP = 0.01
#: Cross-checks "pass" when at least this fraction of points agree. The network is piecewise linear
#: (LeakyReLU); a finite-difference step that straddles a kink mixes two slopes, so a few points may differ.
CROSSCHECK_MIN_FRACTION = 0.99

#: ``--quick``: fewer epochs and points, no ensemble, and x1 in [0, 2π] (x2 in [0, 3π]): with 6π, scenario 2's
#: network sits on a loss plateau for ~10000 steps before it resolves cos(x2), too long for a quick run.
QUICK = dict(epochs=30, line_points=2000, random_points=2000, ensemble=0, x1_max_pi=2.0)

# ---- verdict thresholds of the report ------------------------------------------------------------------------------
# Every verdict word the report prints is computed from the numbers it prints, with these thresholds. "Peak" is the
# largest |value| of the analytic curve over the points compared (along the default line t in [0, 6π]: 1.91 for y,
# 1 for each partial, 2.50 for the directional derivative; with --quick's [0, 2π]: 1.22, 1, 1.13).

#: A learned curve (prediction, partial, directional derivative) is called "accurately learned" only when its
#: largest error over the points compared is at most this fraction of the analytic curve's peak.
ACCURATE_MAX_FRAC = 0.10
#: Not accurate, but its RMS error at most this fraction of the peak: "learned only roughly". Beyond it: "not learned".
ROUGH_RMS_FRAC = 0.25
#: A region of the line where the error exceeds ``ACCURATE_MAX_FRAC`` of the peak is reported with its t-interval;
#: runs of such points separated by at most this fraction of the line's points count as one region.
POOR_REGION_MERGE_FRAC = 0.02
#: The finite difference of the predictions along the data "agrees" with the autodiff directional derivative when
#: their RMS difference is at most this fraction of the analytic peak.
FD_AGREE_RMS_FRAC = 0.02
#: The first Dense kernel's row difference W_x1 − W_x2 "kept its initial value" when training moved it by at most
#: this fraction of the largest change of a single weight.
ROW_DIFF_KEPT_FRAC = 1e-3
#: Networks trained with other seeds "agree with each other" about a quantity when the median spread (std) across
#: seeds is at most this fraction of the RMS error of that quantity against the analytic one.
ENSEMBLE_AGREE_FRAC = 0.5

#: A quantity whose analytic value is zero everywhere (the mixed partial ∂²y/∂x1∂x2) has no peak of its own; it is
#: graded against the peak of the Hessian it belongs to: the largest |analytic value| of ∂²y/∂x1² and ∂²y/∂x2² over
#: the same points. This names that scale in the report.
ZERO_TRUTH_PEAK_LABEL = "the peak of ∂²y/∂x1², ∂²y/∂x2²"

#: Grades returned by :func:`fit_grade`.
ACCURATE, ROUGH, POOR = "accurate", "rough", "poor"


def fit_grade(rms: float, max_abs: float, peak: float) -> str:
    """``"accurate"`` when ``max_abs <= ACCURATE_MAX_FRAC * peak``, else ``"rough"`` when
    ``rms <= ROUGH_RMS_FRAC * peak``, else ``"poor"`` (NaN errors are ``"poor"``)."""
    peak = float(peak)
    if not (math.isfinite(rms) and math.isfinite(max_abs) and math.isfinite(peak)) or peak <= 0:
        return POOR
    if max_abs <= ACCURATE_MAX_FRAC * peak:
        return ACCURATE
    if rms <= ROUGH_RMS_FRAC * peak:
        return ROUGH
    return POOR


#: The words each grade is printed as.
GRADE_WORDS = {ACCURATE: "accurately learned", ROUGH: "learned only roughly", POOR: "not learned"}
#: ... and for the prediction of y itself.
PREDICTION_WORDS = {ACCURATE: "fits y accurately", ROUGH: "fits y only roughly", POOR: "does not fit y"}


def fit_words(fit: dict) -> str:
    """The grade words of a fit summary (a dict with ``rms``, ``max_abs`` and ``peak``)."""
    return GRADE_WORDS[fit_grade(fit["rms"], fit["max_abs"], fit["peak"])]


def identified_words(fraction: float, points: str = "points") -> str:
    """``"identified at all points"``, ``"not identified at any of the points"``, or ``"identified at N % of the
    points"``: the share of evaluation points at which the diagnostics call a quantity identified."""
    if fraction >= 1.0:
        return f"identified at all {points}"
    if fraction <= 0.0:
        return f"not identified at any of the {points}"
    return f"identified at {100 * fraction:.0f} % of the {points}"


# ---- the analytic truth --------------------------------------------------------------------------------------------
def target(x1, x2):
    """y = sin x1 + cos x2."""
    return np.sin(x1) + np.cos(x2)


def analytic_partials(x1, x2):
    """(dy/dx1, dy/dx2) of sin(x1) + cos(x2): (cos x1, −sin x2)."""
    return np.cos(x1), -np.sin(x2)


def analytic_directional(t):
    """d/dt [sin t + cos 1.5t] = cos t - 1.5 sin 1.5t: the derivative along the data line x = (t, 1.5t)."""
    return np.cos(t) - X2_FACTOR * np.sin(X2_FACTOR * t)


def analytic_hessian(x1, x2):
    """(∂²y/∂x1², ∂²y/∂x2², ∂²y/∂x1∂x2) of sin(x1) + cos(x2): (−sin x1, −cos x2, 0)."""
    x1, x2 = np.asarray(x1, dtype=np.float64), np.asarray(x2, dtype=np.float64)
    return -np.sin(x1), -np.cos(x2), np.zeros(np.broadcast(x1, x2).shape)


def analytic_second_directional(t):
    """d²/dt² [sin t + cos 1.5t] = −sin t − 2.25 cos 1.5t: the second derivative along the data line x = (t, 1.5t),
    i.e. uᵀ H u with u = (1, 1.5) (per unit t)."""
    return -np.sin(t) - X2_FACTOR ** 2 * np.cos(X2_FACTOR * t)


#: The data line's tangent in input units: d x / d t for x = (t, 1.5 t).
LINE_TANGENT = np.array([1.0, X2_FACTOR])


# ---- configuration ---------------------------------------------------------------------------------------------------
@dataclass
class DemoConfig:
    out: str = DEFAULT_OUT
    epochs: int = DEFAULT_EPOCHS
    line_points: int = DEFAULT_LINE_POINTS
    random_points: int = DEFAULT_RANDOM_POINTS
    ensemble: int = DEFAULT_ENSEMBLE
    seed: int = DEFAULT_SEED
    x1_max_pi: float = X1_MAX_PI
    progress: bool = True
    quick: bool = False
    plots: bool = True

    @classmethod
    def quick_config(cls, **kw) -> "DemoConfig":
        base = dict(QUICK)
        base.update(kw)
        return cls(quick=True, **base)

    def check(self):
        for name, lo in (("epochs", 1), ("line_points", 20), ("random_points", 20), ("ensemble", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise InputError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if not (isinstance(self.x1_max_pi, (int, float)) and 0 < self.x1_max_pi <= 1000):
            raise InputError(f"x1_max_pi: expected a number in (0, 1000], got {self.x1_max_pi!r}")
        return self

    @property
    def x1_max(self) -> float:
        return float(self.x1_max_pi) * math.pi
