"""Cross-check the ways nnpartials computes partials for a bundle.

Always, with onnxruntime and an independent float64 reference:

* the companion graph's ``y`` (``model.jac.onnx``) against the forward graph's (``model.onnx``), so a changed
  forward graph (or companion graph) cannot pass;
* the companion graph's ``dy_dx`` against float64 central differences of the forward graph, evaluated by onnx's
  own reference implementation in float64 (:mod:`nnpartials.onnx_reference`), not by onnxruntime.

When the bundle has a C core (``model.nnp``), also:

* the C core's float32 ``y`` and analytic ``dy_dx`` against onnxruntime;
* both analytic Jacobians against the C core's float64 central differences (Richardson, with error estimates).

For a bundle exported with second derivatives (``order=2``), also:

* the Hessian graph's ``d2y_dx2`` against float64 central differences of the Jacobian graph (onnx reference
  evaluator, float64), the Laplacian graph against their trace and the Hessian-vector product graph against their
  product with random directions; the Hessian graph's ``y`` and ``dy_dx`` against the Jacobian graph's;
* with a C core: its analytic Hessian, Laplacian and Hessian-vector product against onnxruntime's, and its
  analytic Hessian against its own float64 central differences of the analytic Jacobian.

A piecewise-linear network (relu, leaky_relu, ...) has second derivatives that are zero almost everywhere; the
report says so (``second_derivatives_vanish`` and its reason) instead of letting a zero Hessian pass unremarked.

``check_bundle(bundle, x=None, n_points=1000)`` returns a :class:`CheckReport`; ``report.ok`` is true when every
comparison is within its named tolerance in :mod:`nnpartials.tolerances`. Finite-difference entries whose error
estimate says a kink of a piecewise activation lies within a step are counted and left out of the comparisons
against that finite difference (at a kink the one-sided derivatives differ and no finite difference is
meaningful). Zero points is an error, never a pass.
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
    #: float64 finite differences of the forward graph (onnx reference evaluator): error estimate and kinks
    fd_error_max: float = 0.0
    fd_error_median: float = 0.0
    fd_entries_near_kink: int = 0
    fd_entries: int = 0
    #: whether the bundle has a C core, and the same statistics for the C core's float64 finite differences
    c_core: bool = False
    c_core_reason: str | None = None
    c_fd_error_max: float = 0.0
    c_fd_error_median: float = 0.0
    c_fd_entries_near_kink: int = 0
    #: second derivatives: checked (order-2 bundle), and whether they vanish almost everywhere (with the reason)
    order: int = 1
    second_derivatives_vanish: bool = False
    second_order_note: str | None = None
    hessian_fd_entries: int = 0
    hessian_fd_entries_near_kink: int = 0

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
        from nnpartials.bundle import DEFAULT_BOX

        box, origin = [list(DEFAULT_BOX)] * n_in, f"uniform in the default box {list(DEFAULT_BOX)}"
    else:
        origin = "uniform in the manifest's sample_box"
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (n_in, 2) or not np.isfinite(box).all() or np.any(box[:, 1] < box[:, 0]):
        raise BundleError(f"{bundle.path}: manifest sample_box must be [[lo, hi]] for each of the {n_in} inputs, "
                          f"got {bundle.manifest.get('sample_box')!r}")
    rng = np.random.default_rng(seed)
    return (box[:, 0] + (box[:, 1] - box[:, 0]) * rng.random((n, n_in))).astype(np.float32), origin


def _fd_mask(fd, err):
    """(kept entries as 0/1 floats, count near a kink, max error of kept entries, median error)."""
    scale = max(1.0, float(np.max(np.abs(fd)))) if fd.size else 1.0
    smooth = err <= tolerances.CHECK_FD_KINK * scale
    near = int(fd.size - np.count_nonzero(smooth))
    emax = float(np.max(err[smooth])) if smooth.any() else (float(np.max(err)) if fd.size else 0.0)
    emed = float(np.median(err)) if fd.size else 0.0
    return np.where(smooth, 1.0, 0.0), near, emax, emed


def check_bundle(bundle, x=None, n_points: int = DEFAULT_POINTS, seed: int = 0, providers=None) -> CheckReport:
    """Compare onnxruntime, the float64 reference and (when present) the C core on x (or sample-box points)."""
    import onnx

    from nnpartials.bundle import FORWARD, WEIGHTS, load_bundle
    from nnpartials.onnx_reference import Float64Graph
    from nnpartials.runtime.serve import Partials
    from nnpartials.validate import as_batch

    b = load_bundle(bundle)
    if x is None:
        if not isinstance(n_points, (int, np.integer)) or isinstance(n_points, bool) or n_points < 1:
            raise InputError(f"n_points must be a positive integer, got {n_points!r}")
        x, origin = _sample_box(b, int(n_points), seed)
    else:
        x = as_batch(x, b.n_in, name="points", columns=b.input_columns)
        origin = "given points"
        if x.shape[0] == 0:
            raise InputError("points: expected at least one point to check, got 0 rows; a check on no points "
                             "proves nothing")
    has_c = WEIGHTS in b.files
    report = CheckReport(bundle=b.path, n_points=int(x.shape[0]), points_from=origin, n_in=b.n_in, n_out=b.n_out,
                         c_core=has_c, c_core_reason=None if has_c else (b.manifest.get("c_core") or {}).get("reason"))

    def add(name, tested, reference, a, ref, tol, tol_name, entries=None):
        max_abs, max_rel, scale = tolerances.scaled_error(a, ref)
        report.comparisons.append(Comparison(name, name.split()[0], tested, reference, max_abs, max_rel, scale,
                                             float(tol), tol_name, int(np.size(a) if entries is None else entries)))

    p = Partials(b, providers=providers)
    y_ort, J_ort = p.jacobian(x)
    y_fwd = p.forward(x)
    add("y (forward graph)", "companion graph", "forward graph", y_ort, y_fwd, tolerances.FORWARD_F32,
        "FORWARD_F32")
    ref = Float64Graph(onnx.load_model_from_string(b.read(FORWARD)))
    parts = np.split(x.astype(np.float64), np.cumsum(p.input_widths)[:-1], axis=1)
    fd, err = ref.fd_jacobian(parts)
    keep, report.fd_entries_near_kink, report.fd_error_max, report.fd_error_median = _fd_mask(fd, err)
    report.fd_entries = int(fd.size)
    add("dy_dx vs float64 FD of model.onnx", "onnxruntime", "float64 FD (onnx reference)", J_ort * keep, fd * keep,
        tolerances.FD_F64_REL, "FD_F64_REL", np.count_nonzero(keep))
    if has_c:
        from nnpartials.runtime.kernel import Kernel

        kernel = Kernel(b)  # refuses a weight file whose shape disagrees with the manifest
        y_c, J_c = kernel.jacobian(x)
        cfd, cerr = kernel.fd_jacobian(x)
        ckeep, report.c_fd_entries_near_kink, report.c_fd_error_max, report.c_fd_error_median = _fd_mask(cfd, cerr)
        add("y (C core)", "C core", "onnxruntime", y_c, y_ort, tolerances.FORWARD_F32, "FORWARD_F32")
        add("dy_dx (C core)", "C core", "onnxruntime", J_c, J_ort, tolerances.CHECK_PATHS_F32, "CHECK_PATHS_F32")
        add("dy_dx (C core) vs C FD", "C core", "float64 FD (C core)", J_c * ckeep, cfd * ckeep,
            tolerances.FD_F64_REL, "FD_F64_REL", np.count_nonzero(ckeep))
        add("dy_dx vs C FD", "onnxruntime", "float64 FD (C core)", J_ort * ckeep, cfd * ckeep,
            tolerances.FD_F64_REL, "FD_F64_REL", np.count_nonzero(ckeep))
    if b.order == 2:
        _check_second_order(b, p, x, parts, report, add, seed)
    if report.fd_entries and report.fd_entries_near_kink == report.fd_entries:
        raise InputError(f"{b.path}: every finite-difference entry at these points lies next to a kink of a piecewise "
                         f"activation, so nothing could be checked; choose other points")
    return report


def _check_second_order(b, p, x, parts, report, add, seed):
    import onnx

    from nnpartials.bundle import JACOBIAN
    from nnpartials.onnx_reference import fd_hessian

    so = b.manifest["second_order"]
    report.order = 2
    report.second_derivatives_vanish = bool(so.get("zero_almost_everywhere"))
    report.second_order_note = so.get("note")
    y_j, J_j = p.jacobian(x)
    y_h, J_h, H = p.hessian(x)
    _, _, lap = p.laplacian(x)
    v = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(p.dtype)
    _, hv = p.hvp(x, v)
    add("y (Hessian graph)", "Hessian graph", "Jacobian graph", y_h, y_j, tolerances.FORWARD_F32, "FORWARD_F32")
    add("dy_dx (Hessian graph)", "Hessian graph", "Jacobian graph", J_h, J_j, tolerances.CHECK_PATHS_F32,
        "CHECK_PATHS_F32")
    Hfd, keep = fd_hessian(onnx.load_model_from_string(b.read(JACOBIAN)), parts)
    report.hessian_fd_entries = int(Hfd.size)
    report.hessian_fd_entries_near_kink = int(Hfd.size - np.count_nonzero(keep))
    ref_name = "float64 FD of model.jac.onnx"
    add("d2y_dx2 vs float64 FD of model.jac.onnx", "onnxruntime", ref_name, H * keep, Hfd * keep,
        tolerances.SECOND_ORDER_F32, "SECOND_ORDER_F32", np.count_nonzero(keep))
    diag = np.einsum("bijj->bij", keep).all(axis=2)
    add("laplacian vs trace of float64 FD", "onnxruntime", ref_name, lap * diag, np.einsum("bijj->bi", Hfd) * diag,
        tolerances.SECOND_ORDER_F32, "SECOND_ORDER_F32", np.count_nonzero(diag))
    rows = keep.all(axis=3)
    add("hvp vs float64 FD @ v", "onnxruntime", ref_name, hv * rows,
        np.einsum("bijk,bk->bij", Hfd, v.astype(np.float64)) * rows, tolerances.SECOND_ORDER_F32, "SECOND_ORDER_F32",
        np.count_nonzero(rows))
    if report.c_core:
        from nnpartials.runtime.kernel import Kernel

        kernel = Kernel(b)
        _, _, H_c = kernel.hessian(x)
        _, _, lap_c = kernel.laplacian(x)
        _, hv_c = kernel.hvp(x, v)
        _, Hcfd, herr = kernel.fd_hessian(x)
        hkeep, _, _, _ = _fd_mask(Hcfd, herr)
        add("d2y_dx2 (C core)", "C core", "onnxruntime", H_c, H, 2 * tolerances.SECOND_ORDER_F32,
            "2 x SECOND_ORDER_F32")
        add("laplacian (C core)", "C core", "onnxruntime", lap_c, lap, 2 * tolerances.SECOND_ORDER_F32,
            "2 x SECOND_ORDER_F32")
        add("hvp (C core)", "C core", "onnxruntime", hv_c, hv, 2 * tolerances.SECOND_ORDER_F32, "2 x SECOND_ORDER_F32")
        add("d2y_dx2 (C core) vs C FD", "C core", "float64 FD of the C Jacobian", H_c * hkeep, Hcfd * hkeep,
            tolerances.SECOND_ORDER_F32, "SECOND_ORDER_F32", np.count_nonzero(hkeep))


__all__ = ["check_bundle", "CheckReport", "Comparison", "DEFAULT_POINTS"]
