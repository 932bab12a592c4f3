"""Cross-check the three ways nnpartials computes partials for a bundle.

* onnxruntime on the companion Jacobian graph (``model.jac.onnx``), float32;
* the C core's analytic Jacobian (``model.nnp``), float32;
* the C core's float64 central differences with Richardson extrapolation, which carry their own error estimate.

``check_bundle(bundle, x=None, n_points=1000)`` returns a :class:`CheckReport`; ``report.ok`` is true when every
comparison is within its named tolerance in :mod:`nnpartials.tolerances`. Finite-difference entries whose error
estimate says a kink of a piecewise activation lies within a step are counted and left out of the float64
comparisons (at a kink the one-sided derivatives differ and no finite difference is meaningful).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from nnpartials import tolerances
from nnpartials.errors import BundleError, InputError

DEFAULT_POINTS = 1000


@dataclass
class Comparison:
    name: str
    quantity: str
    tested: str
    reference: str
    max_abs: float
    max_rel: float
    scale: float
    tolerance: float
    tolerance_name: str
    entries: int

    @property
    def ok(self) -> bool:
        return bool(self.max_rel <= self.tolerance)


@dataclass
class CheckReport:
    bundle: str
    n_points: int
    points_from: str
    n_in: int
    n_out: int
    comparisons: list = field(default_factory=list)
    fd_error_max: float = 0.0
    fd_error_median: float = 0.0
    fd_entries_near_kink: int = 0
    fd_entries: int = 0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def comparison(self, name) -> Comparison:
        return next(c for c in self.comparisons if c.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        for c, cd in zip(self.comparisons, d["comparisons"]):
            cd["ok"] = c.ok
        return d


def _sample_box(bundle, n, seed):
    box = bundle.manifest.get("sample_box")
    n_in = bundle.n_in
    if box is None:
        from nnpartials.exporter.bundle import DEFAULT_BOX

        box, origin = [list(DEFAULT_BOX)] * n_in, f"uniform in the default box {list(DEFAULT_BOX)}"
    else:
        origin = "uniform in the manifest's sample_box"
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (n_in, 2) or not np.isfinite(box).all() or np.any(box[:, 1] < box[:, 0]):
        raise BundleError(f"{bundle.path}: manifest sample_box must be [[lo, hi]] for each of the {n_in} inputs, "
                          f"got {bundle.manifest.get('sample_box')!r}")
    rng = np.random.default_rng(seed)
    return (box[:, 0] + (box[:, 1] - box[:, 0]) * rng.random((n, n_in))).astype(np.float32), origin


def check_bundle(bundle, x=None, n_points: int = DEFAULT_POINTS, seed: int = 0, providers=None) -> CheckReport:
    """Compare onnxruntime, the C core and float64 finite differences on x (or points from the sample box)."""
    from nnpartials.exporter.bundle import WEIGHTS, load_bundle
    from nnpartials.runtime.kernel import Kernel
    from nnpartials.runtime.serve import Partials
    from nnpartials.runtime.validate import as_batch

    b = load_bundle(bundle)
    if WEIGHTS not in b.files:
        reason = (b.manifest.get("c_core") or {}).get("reason")
        raise BundleError(f"bundle {b.path!r} has no C-core weight file ({WEIGHTS})"
                          + (f": {reason}" if reason else "") + "; only onnxruntime can evaluate it, there is "
                          "nothing to cross-check")
    if x is None:
        if not isinstance(n_points, (int, np.integer)) or n_points < 1:
            raise InputError(f"n_points must be a positive integer, got {n_points!r}")
        x, origin = _sample_box(b, int(n_points), seed)
    else:
        x = as_batch(x, b.n_in, name="points")
        origin = "given points"
    kernel = Kernel(b)
    if (kernel.n_in, kernel.n_out) != (b.n_in, b.n_out):
        raise BundleError(f"{b.path}: {WEIGHTS} has {kernel.n_in} inputs and {kernel.n_out} outputs, the manifest "
                          f"{b.n_in} and {b.n_out}")
    y_ort, J_ort = Partials(b, providers=providers).jacobian(x)
    y_c, J_c = kernel.jacobian(x)
    fd, err = kernel.fd_jacobian(x)

    report = CheckReport(bundle=b.path, n_points=int(x.shape[0]), points_from=origin, n_in=b.n_in, n_out=b.n_out)

    def add(name, tested, reference, a, ref, tol, tol_name):
        max_abs, max_rel, scale = tolerances.scaled_error(a, ref)
        report.comparisons.append(Comparison(name, name.split()[0], tested, reference, max_abs, max_rel, scale,
                                             float(tol), tol_name, int(np.size(a))))

    add("y", "C core", "onnxruntime", y_c, y_ort, tolerances.FORWARD_F32, "FORWARD_F32")
    add("dy_dx", "C core", "onnxruntime", J_c, J_ort, tolerances.CHECK_PATHS_F32, "CHECK_PATHS_F32")
    scale = max(1.0, float(np.max(np.abs(fd)))) if fd.size else 1.0
    smooth = err <= tolerances.CHECK_FD_KINK * scale
    report.fd_entries = int(fd.size)
    report.fd_entries_near_kink = int(fd.size - np.count_nonzero(smooth))
    if fd.size:
        report.fd_error_max = float(np.max(err[smooth])) if smooth.any() else float(np.max(err))
        report.fd_error_median = float(np.median(err))
    keep = np.where(smooth, 1.0, 0.0)
    add("dy_dx vs FD", "C core", "float64 FD", J_c * keep, fd * keep, tolerances.FD_F64_REL, "FD_F64_REL")
    add("dy_dx (onnxruntime) vs FD", "onnxruntime", "float64 FD", J_ort * keep, fd * keep, tolerances.FD_F64_REL,
        "FD_F64_REL")
    for c in report.comparisons[2:]:
        c.entries = int(np.count_nonzero(smooth))
    return report


__all__ = ["check_bundle", "CheckReport", "Comparison", "DEFAULT_POINTS"]
