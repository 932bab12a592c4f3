"""Named tolerances, in one place. Tests, export-time validation and `nnpartials check` all read them here.

All float32 comparisons use the form ``|a - b| <= atol_scale * max(1, max|reference|)`` over a batch, i.e. an
absolute error scaled by the magnitude of the reference values (never below 1).
"""

#: float32 Jacobian (ONNX companion graph or C core) against TensorFlow's GradientTape, per model and batch.
JACOBIAN_F32 = 1e-5

#: float32 forward pass (C core) against onnxruntime, per model and batch.
FORWARD_F32 = 1e-5

#: Export fails when the companion graph's Jacobian differs from GradientTape by more than this (scaled as above).
EXPORT_VALIDATION = 1e-5

#: float64 finite-difference Jacobian against the analytic Jacobian, relative to max(1, max|J|), smooth activations.
FD_F64_REL = 1e-6

#: float32 finite differences against the analytic Jacobian (the float32 path is limited by rounding).
FD_F32_REL = 2e-3

#: Single-node derivative-rule tests: the float32 companion graph against float64 central differences of the
#: same node (scaled as above). float32 rounding of the rule itself is ~1e-7; this leaves headroom for
#: ops whose derivative has a large dynamic range (exp, reciprocal).
RULE_FD_F32 = 1e-5


def scaled_error(a, b):
    """Return (max_abs, max_rel, scale) for arrays a (tested) against b (reference).

    ``scale = max(1, max|b|)``; ``max_rel = max_abs / scale``. Empty arrays give zeros.
    """
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0, 0.0, 1.0
    max_abs = float(np.max(np.abs(a - b)))
    scale = max(1.0, float(np.max(np.abs(b))))
    return max_abs, max_abs / scale, scale

#: Diagnostics: |sin| of the angle between a direction the diagnostics report and the known data direction.
DIAG_DIRECTION_ATOL = 1e-4

#: Demo tests (quick variant, x1 in [0, 2π]): RMS error of the directional derivative along the data line (1, 1.5)
#: against cos t - 1.5 sin 1.5t (whose own RMS over that line is 0.69, its peak 1.13), scenario 1.
DEMO_DIRECTIONAL_RMS = 0.35

#: Demo tests: RMS error of each partial against cos(x1) and -sin(x2) (RMS 0.71 each) on held-out points, scenario 2.
DEMO_PARTIAL_RMS = 0.3

#: Demo tests: RMS difference between a finite difference of the predictions along the data line (step Δx1) and the
#: autodiff directional derivative (they differ only where the step straddles a LeakyReLU kink).
DEMO_FD_ALONG_DATA_RMS = 0.05

#: `nnpartials check`: the two float32 Jacobian paths (onnxruntime companion graph, C core) against each other.
#: Each is held to JACOBIAN_F32 against GradientTape, so against each other they may differ by both errors.
CHECK_PATHS_F32 = 2 * JACOBIAN_F32

#: `nnpartials check`: a finite-difference entry whose own error estimate exceeds this (relative to max(1, max|J|))
#: straddles a kink of a piecewise activation; it is counted and left out of the float64 comparison.
CHECK_FD_KINK = 1e-7

#: Second derivatives (Hessian, Laplacian, Hessian-vector product; ONNX graphs and C core, float32) against nested
#: GradientTape or float64 finite differences of the Jacobian, scaled by max(1, max|H|) of the reference.
SECOND_ORDER_F32 = 1e-5

#: Export with order=2 fails when a second-order graph differs from its reference by more than this (scaled as above).
EXPORT_SECOND_ORDER = SECOND_ORDER_F32
