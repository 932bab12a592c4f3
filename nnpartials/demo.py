"""``nnpartials demo``: why the partials of a network trained on x2 = 1.5·x1 do not match cos(x1) and -sin(x2).

The question the demo answers. A Keras MLP (Normalization, Dense 64-64-32-32-16-16-8 with LeakyReLU, linear
output; mean absolute error, Adam(0.001), train/test split 0.2 with random_state 0, validation_split 0.2,
100 epochs) is trained on ``x1 = linspace(0, 6π, 2000)``, ``x2 = 1.5·x1``, ``y = sin(x1) + cos(x2)``. The asker
found the predictions close to ``y``, but GradientTape's ``dy/dx1`` far from ``cos(x1)``. The partials are the
network's own; the data, lying on one line, determine only the derivative *along* that line,
``d/dt [sin t + cos 1.5t] = cos t - 1.5 sin 1.5t``; each partial on its own is whatever the initial weights left.

* Scenario 1 ("as asked") trains exactly that network, exports the bundle, computes the partials with
  onnxruntime, cross-checks them with the C core's finite differences and with GradientTape, and runs
  :func:`nnpartials.runtime.diagnostics.diagnose` (which partials, and which directional derivatives, the data
  identify).
* Scenario 2 ("the fix") trains the same network with the same recipe on (x1, x2) drawn independently over
  the same ranges, and compares its partials with cos(x1) and -sin(x2) in the same way.
* Both bundles are exported with second derivatives (``order=2``): the Hessians along the line (onnxruntime,
  cross-checked with nested GradientTape) are compared with -sin(x1), -cos(x2) and 0, and the second derivative
  along the data line, ``uᵀHu`` with ``u = (1, 1.5)``, with ``-sin t - 2.25 cos 1.5t``. The network's LeakyReLU
  activations are piecewise linear, so these Hessians are zero almost everywhere; the report says so.

Whether a quantity is *identified* (the data's rank) and how *accurately it was learned* (its error against the
analytic truth) are measured separately; :mod:`nnpartials.demo_report` words both from the numbers, with the
thresholds of :mod:`nnpartials.demo_config`. The scenario's constants and analytic truth live there too.

:func:`run_demo` writes ``report.md``, PNG plots, both bundles and ``summary.json`` into the report folder.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from nnpartials.errors import InputError

# The scenario's recipe, ranges, default sizes, analytic truth and verdict thresholds live in
# nnpartials.demo_config (imported by demo_plots and demo_report too); re-exported here for callers of this module.
from nnpartials.demo_config import (  # noqa: F401
    ACCURATE_MAX_FRAC,
    BATCH_SIZE,
    CROSSCHECK_MIN_FRACTION,
    DATA_SEED,
    DEFAULT_ENSEMBLE,
    DEFAULT_EPOCHS,
    DEFAULT_LINE_POINTS,
    DEFAULT_OUT,
    DEFAULT_RANDOM_POINTS,
    DEFAULT_SEED,
    HIDDEN_UNITS,
    LEAKY_SLOPE,
    LEARNING_RATE,
    LINE_TANGENT,
    POOR_REGION_MERGE_FRAC,
    QUESTION_FD_STEP,
    QUICK,
    SPLIT_RANDOM_STATE,
    TEST_SIZE,
    VALIDATION_SPLIT,
    X1_MAX_PI,
    X2_FACTOR,
    ZERO_TRUTH_PEAK_LABEL,
    DemoConfig,
    analytic_directional,
    analytic_hessian,
    analytic_partials,
    analytic_second_directional,
    target,
)


# ---- data ------------------------------------------------------------------------------------------------------
def line_data(n: int, x1_max: float = X1_MAX_PI * math.pi):
    """The question's data: x1 = linspace(0, 6π, n), x2 = 1.5 x1, y = sin x1 + cos x2 (float32 like Keras)."""
    x1 = np.linspace(0.0, x1_max, n)
    x = np.stack([x1, X2_FACTOR * x1], axis=1)
    return x.astype(np.float32), target(x[:, 0], x[:, 1]).astype(np.float32).reshape(-1, 1)


def random_data(n: int, x1_max: float = X1_MAX_PI * math.pi, seed: int = DATA_SEED):
    """(x1, x2) drawn independently and uniformly over the same ranges, x1 in [0, 6π], x2 in [0, 9π]."""
    rng = np.random.RandomState(seed)
    x1 = rng.uniform(0.0, x1_max, n)
    x2 = rng.uniform(0.0, X2_FACTOR * x1_max, n)
    x = np.stack([x1, x2], axis=1)
    return x.astype(np.float32), target(x[:, 0], x[:, 1]).astype(np.float32).reshape(-1, 1)


def train_test_split(x, y, test_size: float = TEST_SIZE, random_state: int = SPLIT_RANDOM_STATE):
    """The split of ``sklearn.model_selection.train_test_split(x, y, test_size=0.2, random_state=0)``.

    scikit-learn's ShuffleSplit draws ``RandomState(random_state).permutation(n)``, takes the first
    ``ceil(test_size * n)`` indices as the test set and the next ``n - n_test`` as the training set; this
    reproduces it with numpy alone (same indices, same order) so the demo does not depend on scikit-learn.
    """
    n = len(x)
    n_test = int(math.ceil(test_size * n))
    perm = np.random.RandomState(random_state).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], x[test], y[train], y[test]


# ---- model -------------------------------------------------------------------------------------------------------
def build_model(x_train: np.ndarray, seed: int):
    """The question's network, with its Normalization layer adapted to ``x_train``, compiled (MAE, Adam 1e-3)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    norm = layers.Normalization(name="normalization")
    norm.adapt(x_train)
    stack = [keras.Input(shape=(x_train.shape[1],), name="x"), norm]
    for k, units in enumerate(HIDDEN_UNITS):
        stack += [layers.Dense(units, name=f"dense_{k + 1}"),
                  layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"leaky_relu_{k + 1}")]
    stack.append(layers.Dense(1, name="y"))
    model = keras.Sequential(stack, name="question_mlp")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE), loss="mean_absolute_error")
    return model


def _epoch_callback(progress, task):
    import keras

    class RichEpochs(keras.callbacks.Callback):
        """Advances a rich progress task once per epoch and shows the losses."""

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            progress.update(task, advance=1, info=f"loss {logs.get('loss', float('nan')):.4f}  "
                                                  f"val_loss {logs.get('val_loss', float('nan')):.4f}")

    return RichEpochs()


def train(x_train, y_train, *, epochs: int, seed: int, progress=None, label: str = "training"):
    """Fit the question's network; returns (model, history dict, seconds)."""
    model = build_model(x_train, seed)
    callbacks = []
    task = None
    if progress is not None:
        task = progress.add_task(label, total=epochs, info="")
        callbacks.append(_epoch_callback(progress, task))
    w_init = np.array(model.get_layer("dense_1").kernel.numpy(), dtype=np.float64)
    t0 = time.perf_counter()
    hist = model.fit(x_train, y_train, validation_split=VALIDATION_SPLIT, epochs=epochs, batch_size=BATCH_SIZE,
                     verbose=0, callbacks=callbacks, shuffle=True)
    seconds = time.perf_counter() - t0
    if progress is not None:
        progress.update(task, completed=epochs)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    w = np.array(model.get_layer("dense_1").kernel.numpy(), dtype=np.float64)
    # How far training moved the first Dense kernel's rows (one row per normalised input), and their difference.
    # With z1 = z2 on every training point the two rows receive identical gradients, so their difference, which
    # alone sets the network's response across the data line, keeps its initial value.
    history["first_layer_row_change"] = float(np.max(np.abs(w - w_init)))
    history["first_layer_row_difference_change"] = float(np.max(np.abs((w[0] - w[1]) - (w_init[0] - w_init[1]))))
    return model, history, seconds


def tape_jacobian(model, x: np.ndarray) -> np.ndarray:
    """GradientTape partials [N, 1, n_in] of a scalar-output Keras model (the question's own method)."""
    import tensorflow as tf

    xt = tf.constant(np.asarray(x, dtype=np.float32))
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt, training=False)
    return tape.gradient(y, xt).numpy().astype(np.float64)[:, None, :]


def tape_hessian(model, x: np.ndarray) -> np.ndarray:
    """Nested GradientTape Hessians [N, 1, n_in, n_in] of a scalar-output Keras model, eagerly: the inner tape gives
    the gradient [N, n_in], the outer one differentiates each of its columns (every point depends on its own input
    only, so the sum over the batch that ``tape.gradient`` takes separates the points). For two inputs this is three
    gradient calls; ``nnpartials.exporter.reference.tf_hessian`` (batch_jacobian in a tf.function) does the same for
    any model but traces for seconds."""
    import tensorflow as tf

    xt = tf.constant(np.asarray(x, dtype=np.float32))
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(xt)
        with tf.GradientTape() as inner:
            inner.watch(xt)
            y = model(xt, training=False)
        g = inner.gradient(y, xt)
        cols = [g[:, j] for j in range(xt.shape[1])]
    rows = [outer.gradient(c, xt) for c in cols]
    del outer
    H = np.stack([np.zeros(xt.shape, np.float32) if r is None else r.numpy() for r in rows], axis=1)
    return H.astype(np.float64)[:, None]


# ---- scenario ----------------------------------------------------------------------------------------------------
def rms(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.sqrt(np.mean((a - b) ** 2)))


def poor_regions(t, err, threshold: float, merge_points: int):
    """Runs of consecutive points (t sorted) where ``|err| > threshold``; runs at most ``merge_points`` apart are
    merged. Returns ``[(i_start, i_end, integrated |err| over the run's points above threshold)]``."""
    above = np.abs(np.asarray(err, dtype=np.float64)) > threshold
    idx = np.flatnonzero(above)
    if idx.size == 0:
        return []
    cut = np.flatnonzero(np.diff(idx) > merge_points + 1)
    starts = np.r_[idx[0], idx[cut + 1]]
    ends = np.r_[idx[cut], idx[-1]]
    a = np.abs(err)
    return [(int(s), int(e), float(a[s:e + 1][above[s:e + 1]].sum())) for s, e in zip(starts, ends)]


def fit_summary(learned, analytic, t=None, peak=None, peak_label=None) -> dict:
    """How closely ``learned`` follows ``analytic``: RMS and largest error, the analytic peak |value|, and with ``t``
    (sorted points along the line) where the largest error sits and the t-interval of the worst region where the
    error exceeds ``ACCURATE_MAX_FRAC`` of the peak (None when there is none). ``peak`` replaces the analytic
    curve's own peak (for a curve that is zero everywhere), ``peak_label`` names it in the report."""
    learned = np.asarray(learned, dtype=np.float64).ravel()
    analytic = np.broadcast_to(np.asarray(analytic, dtype=np.float64), np.shape(learned)).ravel()
    err = learned - analytic
    peak = float(np.max(np.abs(analytic))) if peak is None else float(peak)
    out = {"rms": float(np.sqrt(np.mean(err ** 2))), "max_abs": float(np.max(np.abs(err))), "peak": peak,
           "points": int(err.size)}
    if peak_label is not None:
        out["peak_label"] = peak_label
    out["above_fraction"] = float(np.mean(np.abs(err) > ACCURATE_MAX_FRAC * peak))
    if t is not None:
        t = np.asarray(t, dtype=np.float64).ravel()
        out["t_of_max"] = float(t[int(np.argmax(np.abs(err)))])
        runs = poor_regions(t, err, ACCURATE_MAX_FRAC * peak, max(1, int(POOR_REGION_MERGE_FRAC * err.size)))
        if runs:
            s, e, _ = max(runs, key=lambda r: r[2])
            out["worst_interval"] = [float(t[s]), float(t[e])]
            out["worst_interval_points"] = int(e - s + 1)
            out["poor_regions"] = len(runs)
        else:
            out["worst_interval"] = None
            out["poor_regions"] = 0
    return out


def direction_span_residual(v_z, directions_z, rank) -> np.ndarray:
    """|v − P v| for the unit vector ``v_z`` (normalised coordinates) and P the projector onto the first ``rank``
    rows of ``directions_z`` (orthonormal rows; batched over leading axes). 0: v lies in the supported span."""
    v = np.asarray(v_z, dtype=np.float64)
    v = v / np.linalg.norm(v)
    vt = np.asarray(directions_z, dtype=np.float64)
    rank = np.asarray(rank)
    mask = (np.arange(vt.shape[-2]) < rank[..., None]).astype(np.float64)
    proj_sq = np.einsum("...k,...k->...", mask, np.einsum("...kj,j->...k", vt, v) ** 2)
    return np.sqrt(np.clip(1.0 - proj_sq, 0.0, 1.0))


@dataclass
class ScenarioResult:
    key: str  # "line" or "random"
    title: str
    x_train: np.ndarray
    n_points: int
    history: dict
    bundle_path: str
    # evaluation along the data line t in [0, 6π]: x = (t, 1.5 t)
    t: np.ndarray
    x_line: np.ndarray
    y_line: np.ndarray  # [N] onnxruntime forward
    J_line: np.ndarray  # [N, n_in] onnxruntime partials
    dir_line: np.ndarray  # [N] J @ (1, 1.5): derivative along the line w.r.t. t
    fd_dir_line: np.ndarray  # [N] corrected finite difference of the predictions along the line, w.r.t. t
    question_fd_line: np.ndarray  # [N-1] the question's forward difference Δŷ / 0.01
    diagnosis: object
    ensemble_std: Optional[np.ndarray] = None  # [N, n_in] std of partials across seeds on the line
    ensemble_dir_std: Optional[np.ndarray] = None  # [N]
    ensemble_J: Optional[np.ndarray] = None  # [M, N, n_in]
    metrics: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    x_test: Optional[np.ndarray] = None
    J_test: Optional[np.ndarray] = None
    H_line: Optional[np.ndarray] = None  # [N, n_in, n_in] onnxruntime Hessian along the line (order-2 bundle)
    dir2_line: Optional[np.ndarray] = None  # [N] uᵀ H u, u = (1, 1.5): second derivative along the line w.r.t. t
    H_test: Optional[np.ndarray] = None  # [N_test, n_in, n_in]


def _crosscheck(J_test: np.ndarray, J_ref: np.ndarray, tol: float, err: Optional[np.ndarray] = None) -> dict:
    """Per-point agreement |J_test - J_ref| <= tol * max(1, |J_ref|) (+ the reference's own error estimate)."""
    J_test = np.asarray(J_test, dtype=np.float64).reshape(J_test.shape[0], -1)
    J_ref = np.asarray(J_ref, dtype=np.float64).reshape(J_test.shape)
    diff = np.abs(J_test - J_ref)
    bound = tol * np.maximum(1.0, np.abs(J_ref))
    out = {}
    if err is not None:
        err = np.asarray(err, dtype=np.float64).reshape(J_test.shape)
        # points whose finite-difference step straddles a kink: the estimate itself is unreliable there
        uncertain = (err > bound).any(axis=1)
        out["kink_points"] = int(uncertain.sum())
        clean = ~uncertain
        out["max_abs_diff_away_from_kinks"] = float(diff[clean].max()) if clean.any() else 0.0
        bound = bound + err
    ok = (diff <= bound).all(axis=1)
    out.update({"points": int(J_test.shape[0]), "agree": int(ok.sum()), "fraction": float(ok.mean()),
                "max_abs_diff": float(diff.max()), "median_abs_diff": float(np.median(diff)), "tolerance": tol,
                "passed": bool(ok.mean() >= CROSSCHECK_MIN_FRACTION)})
    return out


def _c_core_check(bundle_path: str, x: np.ndarray, J: np.ndarray) -> dict:
    """Cross-check the onnxruntime partials with the C core's central finite differences (float64)."""
    from nnpartials import tolerances

    try:
        from nnpartials.runtime.kernel import Kernel

        kernel = Kernel(bundle_path)
        est, err = kernel.fd_jacobian(np.asarray(x, dtype=np.float64))
    except Exception as exc:  # the C core missing is reported, not fatal: the demo still explains the maths
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}", "passed": False}
    res = _crosscheck(J, est, tolerances.FD_F32_REL, err)
    res["available"] = True
    res["what"] = "C core central finite differences (float64) vs onnxruntime partials (float32)"
    return res


def run_scenario(key: str, cfg: DemoConfig, out: Path, progress=None, console=None) -> ScenarioResult:
    """Train, export, evaluate and diagnose one scenario."""
    from nnpartials import tolerances
    from nnpartials.exporter.bundle import export
    from nnpartials.runtime.diagnostics import diagnose
    from nnpartials.runtime.serve import Partials

    if key == "line":
        title = "Scenario 1: data on the line x2 = 1.5·x1 (as asked)"
        x, y = line_data(cfg.line_points, cfg.x1_max)
    elif key == "random":
        title = "Scenario 2: (x1, x2) drawn independently (the fix)"
        x, y = random_data(cfg.random_points, cfg.x1_max)
    else:
        raise InputError(f"unknown scenario {key!r}")
    label = "scenario 1" if key == "line" else "scenario 2"
    x_train, x_test, y_train, y_test = train_test_split(x, y)
    timings = {}

    model, history, timings["train_s"] = train(x_train, y_train, epochs=cfg.epochs, seed=cfg.seed, progress=progress,
                                               label=f"{label}: training")

    steps = None
    if progress is not None:
        steps = progress.add_task(f"{label}: evaluating", total=7, info="")

    def step(name):
        if steps is not None:
            progress.update(steps, advance=1, description=f"{label}: {name}")

    t0 = time.perf_counter()
    bundle_dir = out / f"scenario{1 if key == 'line' else 2}_{key}" / "bundle"
    bundle = export(model, bundle_dir, data=x_train, overwrite=True, progress=False, order=2)
    timings["export_s"] = time.perf_counter() - t0
    step("exported")

    # evaluation along the data line (the question's points when line_points match)
    t0 = time.perf_counter()
    x_line, _ = line_data(cfg.line_points, cfg.x1_max)
    t = x_line[:, 0].astype(np.float64)
    part = Partials(bundle)
    y_line, J = part.jacobian(x_line)
    J_line = J[:, 0, :].astype(np.float64)
    y_line = y_line[:, 0].astype(np.float64)
    dir_line = J_line @ LINE_TANGENT
    # derivative along the line w.r.t. t, by central differences of the predictions (np.gradient: 2nd order)
    fd_dir = np.gradient(y_line, t)
    question_fd = np.diff(y_line) / QUESTION_FD_STEP
    timings["partials_s"] = time.perf_counter() - t0
    step("partials (onnxruntime)")

    checks = {}
    J_tape = tape_jacobian(model, x_line)[:, 0, :]
    checks["gradient_tape"] = _crosscheck(J_line, J_tape, tolerances.JACOBIAN_F32)
    checks["gradient_tape"]["what"] = "TensorFlow GradientTape (the question's method) vs onnxruntime partials"
    t0 = time.perf_counter()
    checks["c_core_fd"] = _c_core_check(bundle.path, x_line, J_line)
    timings["c_core_fd_s"] = time.perf_counter() - t0
    step("cross-checked (C core FD, GradientTape)")

    # second derivatives along the line (the bundle's Hessian graph), cross-checked with nested GradientTape
    t0 = time.perf_counter()
    _, _, H = part.hessian(x_line)
    H_line = H[:, 0].astype(np.float64)  # [N, n_in, n_in]
    dir2_line = np.einsum("j,njk,k->n", LINE_TANGENT, H_line, LINE_TANGENT)
    timings["hessian_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    checks["hessian_gradient_tape"] = _hessian_tape_check(model, x_line, H_line)
    timings["hessian_tape_s"] = time.perf_counter() - t0
    step("second derivatives (onnxruntime, nested GradientTape)")

    # ensemble: the same network and data, other seeds
    ens_J = None
    if cfg.ensemble >= 2:
        Js = [J_line]
        t0 = time.perf_counter()
        for m in range(1, cfg.ensemble):
            mdl, _, _ = train(x_train, y_train, epochs=cfg.epochs, seed=cfg.seed + 1000 * m, progress=progress,
                              label=f"{label}: ensemble seed {cfg.seed + 1000 * m}")
            Js.append(tape_jacobian(mdl, x_line)[:, 0, :])
        ens_J = np.stack(Js)
        timings["ensemble_s"] = time.perf_counter() - t0
    step("ensemble")

    diag = diagnose(x_train, x_line, bundle=bundle, jacobian=J_line[:, None, :], hessian=H_line[:, None],
                    ensemble=[j[:, None, :] for j in ens_J] if ens_J is not None else None)
    step("diagnosed")

    a1, a2 = analytic_partials(t, X2_FACTOR * t)
    metrics = {
        "rms_y": rms(y_line, target(t, X2_FACTOR * t)),
        "rms_dy_dx1": rms(J_line[:, 0], a1),
        "rms_dy_dx2": rms(J_line[:, 1], a2),
        "rms_directional": rms(dir_line, analytic_directional(t)),
        "max_abs_directional": float(np.max(np.abs(dir_line - analytic_directional(t)))),
        "rms_fd_vs_autodiff_directional": rms(fd_dir, dir_line),
        "rms_fd_directional": rms(fd_dir, analytic_directional(t)),
        "rms_question_fd": rms(question_fd, analytic_directional(0.5 * (t[1:] + t[:-1]))),
        "line_step_x1": float(t[1] - t[0]),
        "final_loss": history["loss"][-1],
        "first_layer_row_change": history["first_layer_row_change"],
        "first_layer_row_difference_change": history["first_layer_row_difference_change"],
        "final_val_loss": history["val_loss"][-1],
        "amplitude_directional": float(np.max(np.abs(analytic_directional(t)))),
        # per learned quantity along the line: RMS, largest error, analytic peak, where the error is largest
        "fit": {"y": fit_summary(y_line, target(t, X2_FACTOR * t), t),
                "dy_dx1": fit_summary(J_line[:, 0], a1, t),
                "dy_dx2": fit_summary(J_line[:, 1], a2, t),
                "directional": fit_summary(dir_line, analytic_directional(t), t)},
    }
    res = ScenarioResult(key=key, title=title, x_train=x_train, n_points=len(x), history=history,
                         bundle_path=bundle.path, t=t, x_line=x_line, y_line=y_line, J_line=J_line,
                         dir_line=dir_line, fd_dir_line=fd_dir, question_fd_line=question_fd, diagnosis=diag,
                         metrics=metrics, checks=checks, timings=timings, H_line=H_line, dir2_line=dir2_line)
    if ens_J is not None:
        res.ensemble_J = ens_J
        res.ensemble_std = ens_J.std(axis=0, ddof=1)
        res.ensemble_dir_std = (ens_J @ LINE_TANGENT).std(axis=0, ddof=1)
        metrics["ensemble_size"] = int(ens_J.shape[0])
        metrics["ensemble_median_std_dy_dx1"] = float(np.median(res.ensemble_std[:, 0]))
        metrics["ensemble_median_std_dy_dx2"] = float(np.median(res.ensemble_std[:, 1]))
        metrics["ensemble_median_std_directional"] = float(np.median(res.ensemble_dir_std))
    # the held-out test points (off the line in scenario 2): partials against the analytic ones there too
    _, Jt = part.jacobian(x_test)
    Jt = Jt[:, 0, :].astype(np.float64)
    b1, b2 = analytic_partials(x_test[:, 0].astype(np.float64), x_test[:, 1].astype(np.float64))
    metrics["rms_dy_dx1_test"] = rms(Jt[:, 0], b1)
    metrics["rms_dy_dx2_test"] = rms(Jt[:, 1], b2)
    y_test_pred = part.forward(x_test)[:, 0]
    metrics["rms_y_test"] = rms(y_test_pred, y_test[:, 0])
    metrics["fit_test"] = {"y": fit_summary(y_test_pred, y_test[:, 0]), "dy_dx1": fit_summary(Jt[:, 0], b1),
                           "dy_dx2": fit_summary(Jt[:, 1], b2)}
    res.x_test, res.J_test = x_test, Jt
    g = diag.global_
    # The split of the along-line derivative D between the two partials when the network's gradient in its
    # normalised coordinates z = (x - mean) / std points along the data (nothing across it): the gradient in x is
    # then ∝ std^-2 * (1, 1.5), i.e. dy/dx_j = share_j * D with share = std^-2 (1, 1.5) / ((1, 1.5) std^-2 (1, 1.5)).
    # With std2 = 1.5 std1 (the line) the shares are 1/2 and 1/3.
    w_dir = LINE_TANGENT / diag.normalization.std ** 2
    shares = w_dir / float(w_dir @ LINE_TANGENT)
    metrics["normalization_std"] = diag.normalization.std.tolist()
    z_train = diag.normalization.to_z(np.asarray(x_train, dtype=np.float64))
    metrics["max_abs_z1_minus_z2"] = float(np.max(np.abs(z_train[:, 0] - z_train[:, 1])))
    metrics["along_data_shares"] = shares.tolist()
    Da = analytic_directional(t)
    metrics["rms_dy_dx1_vs_share"] = rms(J_line[:, 0], shares[0] * Da)
    metrics["rms_dy_dx2_vs_share"] = rms(J_line[:, 1], shares[1] * Da)
    metrics["effective_rank"] = g.effective_rank
    metrics["singular_values"] = g.singular_values.tolist()
    metrics["supported_directions"] = g.supported_directions.tolist()
    metrics["null_directions"] = g.null_directions.tolist()
    metrics["globally_identified"] = g.identified.tolist()
    metrics["identified_fraction_on_line"] = diag.local.identified.mean(axis=0).tolist()
    # Is the derivative along the data line, (1, 1.5), identified? The same test the diagnostics apply to each
    # coordinate axis: its distance (normalised coordinates) from the span the data support, against span_tol.
    loc = diag.local
    v_z = LINE_TANGENT / diag.normalization.std
    metrics["span_tol"] = float(diag.span_tol)
    metrics["directional_span_residual"] = float(direction_span_residual(v_z, g.directions_z, g.effective_rank))
    metrics["directional_globally_identified"] = bool(metrics["directional_span_residual"] <= diag.span_tol)
    local_res = direction_span_residual(v_z, loc.directions_z, loc.local_rank)
    metrics["directional_identified_fraction_on_line"] = float(
        np.mean((local_res <= diag.span_tol) & ~loc.outside))
    _, _, Ht = part.hessian(x_test)
    res.H_test = Ht[:, 0].astype(np.float64)
    metrics["second_order"] = _second_order_metrics(bundle, diag, t, H_line, dir2_line, x_test, res.H_test,
                                                    metrics["directional_identified_fraction_on_line"])
    step("done")
    return res


def _hessian_tape_check(model, x, H) -> dict:
    """Cross-check the onnxruntime Hessians ``H [N, n_in, n_in]`` (scalar output) with nested GradientTape."""
    from nnpartials import tolerances

    H_tape = tape_hessian(model, x)[:, 0]
    res = _crosscheck(H.reshape(len(H), -1), H_tape.reshape(len(H), -1), tolerances.SECOND_ORDER_F32)
    res["max_abs_reference"] = float(np.max(np.abs(H_tape)))
    res["max_abs_onnxruntime"] = float(np.max(np.abs(H)))
    res["what"] = "TensorFlow nested GradientTape vs onnxruntime Hessians (model.hess.onnx)"
    return res


def _second_order_metrics(bundle, diag, t, H_line, dir2_line, x_test, H_test, dir_ident) -> dict:
    """Second derivatives along the line (and at the test points) against the analytic ones, whether the bundle's
    second derivatives vanish almost everywhere, and which of them the diagnostics identify on the line."""
    so = bundle.manifest.get("second_order") or {}
    h11, h22, h12 = analytic_hessian(t, X2_FACTOR * t)
    hpeak = float(max(np.max(np.abs(h11)), np.max(np.abs(h22))))
    g11, g22, g12 = analytic_hessian(x_test[:, 0], x_test[:, 1])
    tpeak = float(max(np.max(np.abs(g11)), np.max(np.abs(g22))))
    ident = diag.local.identified_second.mean(axis=0)  # [n_in, n_in] share of line points
    return {
        "zero_almost_everywhere": bool(bundle.second_derivatives_vanish),
        "note": so.get("note"),
        "max_abs_hessian_line": float(np.max(np.abs(H_line))),
        "max_abs_hessian_test": float(np.max(np.abs(H_test))),
        "identified_fraction_on_line": {"d2y_dx1dx1": float(ident[0, 0]), "d2y_dx2dx2": float(ident[1, 1]),
                                        "d2y_dx1dx2": float(ident[0, 1]),
                                        # uᵀHu is identified where u = (1, 1.5) lies in the supported span: the test
                                        # of the first derivative along the line
                                        "directional2": float(dir_ident)},
        "globally_identified": diag.global_.identified_second.tolist(),
        "fit": {"d2y_dx1dx1": fit_summary(H_line[:, 0, 0], h11, t),
                "d2y_dx2dx2": fit_summary(H_line[:, 1, 1], h22, t),
                "d2y_dx1dx2": fit_summary(H_line[:, 0, 1], h12, t, peak=hpeak, peak_label=ZERO_TRUTH_PEAK_LABEL),
                "directional2": fit_summary(dir2_line, analytic_second_directional(t), t)},
        "fit_test": {"d2y_dx1dx1": fit_summary(H_test[:, 0, 0], g11), "d2y_dx2dx2": fit_summary(H_test[:, 1, 1], g22),
                     "d2y_dx1dx2": fit_summary(H_test[:, 0, 1], g12, peak=tpeak, peak_label=ZERO_TRUTH_PEAK_LABEL)},
    }


# ---- the whole demo ----------------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    config: DemoConfig
    out: str
    scenarios: list
    seconds: float
    files: list


def _quiet_tensorflow():
    """Import TensorFlow with its start-up log lines (written by C++ straight to file descriptor 2, whatever
    TF_CPP_MIN_LOG_LEVEL says) kept off the console, so the demo's own output stays readable."""
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreters): nothing to silence
        import tensorflow  # noqa: F401
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run_demo(cfg: Optional[DemoConfig] = None, console=None) -> DemoResult:
    """Run both scenarios, write the report folder, print the console summary; returns the results."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = (cfg or DemoConfig()).check()
    _quiet_tensorflow()
    console = console or Console()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not cfg.progress, transient=False) as progress:
        scenarios = [run_scenario(k, cfg, out, progress if cfg.progress else None, console) for k in ("line", "random")]
    seconds = time.perf_counter() - t_start

    from nnpartials import demo_report

    files = []
    if cfg.plots:
        from nnpartials import demo_plots

        files += demo_plots.write_all(scenarios, out)
    for s in scenarios:
        np.save(out / f"scenario{1 if s.key == 'line' else 2}_{s.key}" / "train_x.npy", s.x_train)
    result = DemoResult(config=cfg, out=str(out), scenarios=scenarios, seconds=seconds, files=files)
    files.append(demo_report.write_summary_json(result))
    files.append(demo_report.write_markdown(result))
    demo_report.print_summary(result, console)
    return result
