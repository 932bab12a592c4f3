"""Bundle writer: export a model to a bundle (the format and the loader live in :mod:`nnpartials.bundle`).

A bundle is a folder::

    manifest.json     format version, inputs/outputs/columns, Jacobian layout, sha256 of every file,
                      tool versions, validation summary, sample box, C-core availability
    model.onnx        forward graph (frozen, self-contained)
    model.jac.onnx    companion graph with outputs y [batch, n_out] and dy_dx [batch, n_out, n_in]
    model.nnp         C-core weight file (only when the network is in the C subset)
    model.hess.onnx, model.lap.onnx, model.hvp.onnx   (``order=2``) second-derivative graphs
    validation.json   export-time comparison against TensorFlow's GradientTape
    model.sig         (with ``--sign``) signature over manifest.json and every listed file (OpenSSF model-signing)

Loading reads only regular files (no links, FIFOs, devices) of the listed size, validates the manifest schema,
verifies every hash (and, given a public key, the signature), refuses ONNX files that reference external data
anywhere (subgraphs included), and checks both graphs.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from nnpartials import tolerances
from nnpartials.bundle import (DEFAULT_BOX, FORMAT, FORMAT_VERSION, FORWARD, HESSIAN, HESSIAN_LAYOUT,  # noqa: F401
                               HVP, HVP_LAYOUT, JACOBIAN, LAPLACIAN, LAPLACIAN_LAYOUT, LAYOUT, MANIFEST, MAX_MANIFEST_BYTES, NORMALIZATION_BOX_STDS, VALIDATION, WEIGHTS, Bundle,
                               _parse_manifest, _read_regular, _sha256, _write_file, load_bundle)
from nnpartials.errors import BundleError, ExportError, NotLowerableError, ValidationError
from nnpartials.onnx_reference import fd_hessian

def tool_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("nnpartials", "tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


# ----- sample points -----------------------------------------------------------------------------------------
def _split_data(data, shapes, names, dtype=np.float32):
    """Validation points as one ``[N, width]`` array per input. ``data``: one array ``[N, n_in]`` (features
    concatenated in input order), one array per input (``[N, width]`` or ``[N, *shape]``), or a dict by name."""
    from nnpartials.validate import as_batch

    widths = [int(np.prod(sh, dtype=np.int64)) for sh in shapes]

    def one(d, w, sh, label):
        a = np.asarray(d) if not hasattr(d, "columns") else d
        if isinstance(a, np.ndarray) and a.ndim == 1 + len(sh) and len(sh) > 1 and tuple(a.shape[1:]) == tuple(sh):
            a = a.reshape(a.shape[0], w)  # given in the input's own shape
        return as_batch(a, w, name=label, dtype=dtype)

    if isinstance(data, dict):
        missing = [n for n in names if n not in data]
        if missing:
            raise ExportError(f"validation data: missing inputs {missing}; expected {names}")
        return [one(data[n], w, sh, f"data[{n!r}]") for n, w, sh in zip(names, widths, shapes)]
    if isinstance(data, (list, tuple)) and len(widths) > 1 and len(data) == len(widths) \
            and all(np.ndim(d) >= 2 for d in data):
        return [one(d, w, sh, f"data[{k}]") for k, (d, w, sh) in enumerate(zip(data, widths, shapes))]
    if len(shapes) == 1:
        return [one(data, widths[0], shapes[0], "data")]
    arr = as_batch(data, sum(widths), name="data", dtype=dtype)
    return np.split(arr, np.cumsum(widths)[:-1], axis=1)


def _shaped(parts, shapes):
    """``[N, width]`` arrays -> ``[N, *shape]`` (what the graphs take)."""
    return [np.ascontiguousarray(p.reshape((p.shape[0],) + tuple(sh))) for p, sh in zip(parts, shapes)]


def sample_box(traced) -> list:
    if getattr(traced, "normalization", None) is not None:
        m = np.asarray(traced.normalization["mean"])
        s = np.asarray(traced.normalization["std"])
        return [[float(a - NORMALIZATION_BOX_STDS * b), float(a + NORMALIZATION_BOX_STDS * b)] for a, b in zip(m, s)]
    return [list(DEFAULT_BOX) for _ in range(sum(traced.input_widths))]


def sample_points(traced, data=None, n: int = 1000, seed: int = 0, dtype=np.float32):
    """Validation points, one array ``[n, *shape]`` per input: ``n`` rows of ``data`` (a random subset if larger),
    else uniform in :func:`sample_box`."""
    rng = np.random.default_rng(seed)
    shapes = traced.input_shapes
    if data is not None:
        parts = _split_data(data, shapes, traced.input_names, dtype)
        rows = parts[0].shape[0]
        if rows == 0:
            raise ExportError("validation data is empty")
        idx = np.sort(rng.choice(rows, size=n, replace=False)) if rows > n else np.arange(rows)
        return _shaped([np.ascontiguousarray(p[idx]) for p in parts], shapes), "data"
    box = np.asarray(sample_box(traced), dtype=np.float64)
    pts = rng.uniform(box[:, 0], box[:, 1], size=(n, box.shape[0])).astype(dtype)
    return _shaped(np.split(pts, np.cumsum(traced.input_widths)[:-1], axis=1), shapes), \
        ("normalization statistics" if getattr(traced, "normalization", None) is not None else "default box")


# ----- validation --------------------------------------------------------------------------------------------
#: Bytes the largest derivative tensor of one validation call may take: points are validated in chunks so that a
#: forward-mode Jacobian of a convolutional network (784 directions times every activation) fits in memory.
VALIDATION_CHUNK_BYTES = 256 * 1024 * 1024


def validation_rows(jac_model: onnx.ModelProto) -> int:
    """Points per onnxruntime call when validating ``jac_model``: its largest tensor per point (the derivative
    tensors, [K, batch, ...], counted with their K) within :data:`VALIDATION_CHUNK_BYTES`."""
    from nnpartials.exporter.graph import GraphBuilder

    b = GraphBuilder(jac_model)
    per_point = 1
    for shape in b.shapes.values():
        if shape and any(d is None for d in shape):
            per_point = max(per_point, int(np.prod([1 if d is None else d for d in shape], dtype=np.int64)))
    item = 8 if b.ftype == onnx.TensorProto.DOUBLE else 4
    return max(1, VALIDATION_CHUNK_BYTES // (per_point * item))


def run_in_chunks(sess, feeds: dict, rows: int) -> list:
    """``sess.run(None, feeds)`` over at most ``rows`` points per call, outputs concatenated along the batch axis."""
    n = next(iter(feeds.values())).shape[0]
    if n <= rows:
        return sess.run(None, feeds)
    parts = [sess.run(None, {k: v[s:s + rows] for k, v in feeds.items()}) for s in range(0, n, rows)]
    return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]


def validate_jacobian(traced, jac_model: onnx.ModelProto, xs, tolerance=tolerances.EXPORT_VALIDATION,
                      reference=None) -> dict:
    """Compare the companion graph (onnxruntime, CPU) with GradientTape on the points ``xs``.

    ``reference``: ``(y_ref, [J_ref per input])`` from :func:`~nnpartials.exporter.reference.tf_jacobian` when the
    caller already has it."""
    import onnxruntime as ort

    from nnpartials.exporter.reference import tf_jacobian

    y_ref, j_ref = reference if reference is not None else tf_jacobian(traced, xs)
    sess = ort.InferenceSession(jac_model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {n: x for n, x in zip(traced.input_names, xs)}
    res = run_in_chunks(sess, feeds, validation_rows(jac_model))
    y, js = res[0], res[1:]
    out = {"points": int(xs[0].shape[0]), "tolerance": tolerance,
           "rule": "max|J - J_tf| <= tolerance * max(1, max|J_tf|)", "reference": "tensorflow GradientTape"}
    ya, yr, _ = tolerances.scaled_error(y, y_ref)
    out["y"] = {"max_abs": ya, "max_rel": yr}
    per = {}
    ok = yr <= tolerance
    for name, j, jr in zip(traced.input_names, js, j_ref):
        a, r, scale = tolerances.scaled_error(j, jr)
        per[name] = {"max_abs": a, "max_rel": r, "scale": scale}
        ok = ok and r <= tolerance
    out["jacobian"] = per
    out["max_rel"] = max([yr] + [p["max_rel"] for p in per.values()])
    out["passed"] = bool(ok)
    return out


def validate_onnx(fwd: onnx.ModelProto, jac_model: onnx.ModelProto, names, xs,
                  tolerance=tolerances.EXPORT_VALIDATION):
    """Compare the companion graph (onnxruntime, CPU) with float64 central differences of the forward graph
    (:class:`~nnpartials.onnx_reference.Float64Graph`) on the points ``xs`` (one ``[N, *shape]`` array per input).

    Entries whose finite difference straddles a kink (error estimate above ``tolerances.CHECK_FD_KINK`` of the
    scale) are left out and counted. Returns ``(summary, (y_ref, [J_ref per input]), keep)`` with ``keep`` the
    0/1 mask of the compared entries over all inputs ``[N, n_out, n_in]``."""
    import onnxruntime as ort

    from nnpartials.onnx_reference import Float64Graph

    sess = ort.InferenceSession(jac_model.SerializeToString(), providers=["CPUExecutionProvider"])
    res = run_in_chunks(sess, dict(zip(names, xs)), validation_rows(jac_model))
    y, js = res[0], res[1:]
    ref = Float64Graph(fwd)
    y_ref = ref.forward(xs)
    J_ref, err = ref.fd_jacobian(xs)
    scale = max(1.0, float(np.max(np.abs(J_ref)))) if J_ref.size else 1.0
    keep = (err <= tolerances.CHECK_FD_KINK * scale).astype(np.float64)
    widths = [j.shape[2] for j in js]
    offs = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    out = {"points": int(xs[0].shape[0]), "tolerance": tolerance,
           "rule": "max|J - J_fd| <= tolerance * max(1, max|J_fd|) over the entries not next to a kink",
           "reference": "float64 central differences of the forward graph (Richardson; onnx reference evaluator)",
           "entries": int(keep.size), "entries_next_to_a_kink": int(keep.size - np.count_nonzero(keep))}
    ya, yr, _ = tolerances.scaled_error(y, y_ref)
    out["y"] = {"max_abs": ya, "max_rel": yr}
    per, ok = {}, yr <= tolerance
    j_refs = []
    for k, (name, j) in enumerate(zip(names, js)):
        kk = keep[:, :, offs[k]:offs[k + 1]]
        jr = J_ref[:, :, offs[k]:offs[k + 1]]
        j_refs.append(jr)
        a, r, sc = tolerances.scaled_error(np.asarray(j, np.float64) * kk, jr * kk)
        per[name] = {"max_abs": a, "max_rel": r, "scale": sc}
        ok = ok and r <= tolerance
    if keep.size and not keep.any():
        ok = False
        out["failure"] = "every finite-difference entry lies next to a kink: nothing could be compared"
    out["jacobian"] = per
    out["max_rel"] = max([yr] + [p["max_rel"] for p in per.values()])
    out["passed"] = bool(ok)
    return out, (y_ref, j_refs), keep


def validate_c_core(nnp_bytes: bytes, xs, reference, tolerance=tolerances.EXPORT_VALIDATION, keep=None,
                    reference_name: str = "tensorflow GradientTape") -> dict:
    """Compare the C core's y and analytic Jacobian (both modes) with the reference's on the same points ``xs``
    (``keep``: a 0/1 mask of the Jacobian entries to compare, e.g. those not next to a kink)."""
    from nnpartials import ccore

    y_ref, j_ref = reference
    x = np.concatenate([np.asarray(p, np.float32).reshape(p.shape[0], -1) for p in xs], axis=1)
    J_ref = np.concatenate(j_ref, axis=2)
    if keep is not None:
        J_ref = J_ref * keep
    out = {"points": int(x.shape[0]), "tolerance": tolerance, "reference": reference_name,
           "rule": "max|J - J_ref| <= tolerance * max(1, max|J_ref|), forward and reverse mode"}
    ok = True
    worst = 0.0
    for name, mode in (("forward", 1), ("reverse", 2)):
        y, J = ccore.jacobian(nnp_bytes, x, mode)
        if keep is not None:
            J = J * keep
        ya, yr, _ = tolerances.scaled_error(y, y_ref)
        a, r, scale = tolerances.scaled_error(J, J_ref)
        out[name] = {"y": {"max_abs": ya, "max_rel": yr}, "jacobian": {"max_abs": a, "max_rel": r, "scale": scale}}
        worst = max(worst, yr, r)
        ok = ok and yr <= tolerance and r <= tolerance
    out["max_rel"] = worst
    out["passed"] = bool(ok)
    return out


# ----- second derivatives ------------------------------------------------------------------------------------
#: Largest Hessian per point (n_out * n_in * n_in entries) export builds the second-order graphs for.
MAX_HESSIAN_ENTRIES = 1 << 20


def validate_second_order(graphs: dict, names, xs, first_reference, H_ref, keep,
                          tolerance=tolerances.EXPORT_SECOND_ORDER, reference_name="", seed: int = 0) -> dict:
    """Compare the second-order graphs (onnxruntime, CPU) with the reference Hessian ``H_ref`` on the points ``xs``:
    ``d2y_dx2`` entry by entry, the Laplacian with its trace and the Hessian-vector product with ``H_ref @ v`` for
    random directions ``v``; ``y`` and ``dy_dx`` of the Hessian graph with the first-order reference. ``keep``: 0/1
    mask of the Hessian entries to compare (None: all); a Laplacian or product entry is compared where every entry
    it sums is kept."""
    import onnxruntime as ort

    y_ref, j_refs = first_reference
    J_ref = np.concatenate(j_refs, axis=2)
    mask = np.ones_like(H_ref) if keep is None else keep
    feeds = dict(zip(names, xs))
    n = xs[0].shape[0]
    out = {"points": int(n), "tolerance": tolerance, "reference": reference_name,
           "rule": "max|H - H_ref| <= tolerance * max(1, max|H_ref|); laplacian against the trace of H_ref, hvp "
                   "against H_ref @ v", "entries_next_to_a_kink": int(mask.size - np.count_nonzero(mask))}

    def run(kind, extra=None):
        model = graphs[kind][0]
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return run_in_chunks(sess, dict(feeds, **(extra or {})), validation_rows(model))

    ok = True
    y, J, H = run("hessian")
    a, r, sc = tolerances.scaled_error(np.asarray(H, np.float64) * mask, H_ref * mask)
    ya, yr, _ = tolerances.scaled_error(y, y_ref)
    ja, jr, _ = tolerances.scaled_error(J, J_ref)
    out["hessian"] = {"max_abs": a, "max_rel": r, "scale": sc, "y_max_rel": yr, "jacobian_max_rel": jr}
    ok = ok and max(r, yr, jr) <= tolerance
    diag = np.einsum("bijj->bij", mask).all(axis=2)
    trace = np.einsum("bijj->bi", H_ref)
    lap = run("laplacian")[2]
    a, r, sc = tolerances.scaled_error(np.asarray(lap, np.float64) * diag, trace * diag)
    out["laplacian"] = {"max_abs": a, "max_rel": r, "scale": sc, "method": graphs["laplacian"][1].get(
        "laplacian_method", "forward-laplacian")}
    ok = ok and r <= tolerance
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, H_ref.shape[2])).astype(xs[0].dtype)
    rows = mask.all(axis=3)
    _, hv = run("hvp", {graphs["hvp"][1].get("v_input", "v"): v})[:2]
    ref = np.einsum("bijk,bk->bij", H_ref, v.astype(np.float64))
    a, r, sc = tolerances.scaled_error(np.asarray(hv, np.float64) * rows, ref * rows)
    out["hvp"] = {"max_abs": a, "max_rel": r, "scale": sc}
    ok = ok and r <= tolerance
    if keep is not None and keep.size and not keep.any():
        ok = False
        out["failure"] = "every finite-difference entry lies next to a kink: nothing could be compared"
    out["max_rel"] = max(out[k]["max_rel"] for k in ("hessian", "laplacian", "hvp"))
    out["passed"] = bool(ok)
    return out


# ----- export ------------------------------------------------------------------------------------------------
def _columns(names, widths, single_prefix=None):
    cols = []
    for n, w in zip(names, widths):
        cols.append([f"{n}{j + 1}" for j in range(w)])
    return cols


def is_onnx_source(model_or_path) -> bool:
    """An ``onnx.ModelProto``, serialized bytes, or a path ending in ``.onnx``."""
    if isinstance(model_or_path, (onnx.ModelProto, bytes, bytearray)):
        return True
    return isinstance(model_or_path, (str, os.PathLike)) and os.fspath(model_or_path).lower().endswith(".onnx")


@dataclass
class _Prepared:
    """What the two front ends (Keras, ONNX) hand to the common part of export."""

    fwd: onnx.ModelProto
    jac: onnx.ModelProto
    info: dict
    xs: list                # validation points, one [N, *shape] array per input
    origin: str
    validation: dict
    reference: tuple        # (y_ref, [J_ref per input, [N, n_out, width]])
    keep: object            # 0/1 mask of the Jacobian entries compared (None: all)
    reference_name: str
    input_names: list
    input_shapes: list
    dtype: str
    normalization: object
    box: list
    source: dict
    #: xs -> (H_ref [N, n_out, n_in, n_in], keep mask or None): the independent second-order reference
    second_reference: object = None


def _prepare_keras(model_or_path, data, mode, opset, n_validation, tolerance, seed, steps,
                   allow_unsafe_deserialization=False) -> _Prepared:
    from nnpartials.exporter.jacobian import build_jacobian_model
    from nnpartials.exporter.keras_export import DEFAULT_OPSET, load_model, to_onnx
    from nnpartials.exporter.reference import tf_jacobian

    steps.next("loading the model")
    traced = load_model(model_or_path, allow_unsafe_deserialization=allow_unsafe_deserialization)
    steps.next("converting to ONNX (tf2onnx, frozen)")
    fwd = to_onnx(traced, opset=opset or DEFAULT_OPSET)
    steps.next("building the Jacobian graph")
    jac, info = build_jacobian_model(fwd, mode=mode)
    steps.next(f"validating against GradientTape ({n_validation} points)")
    xs, origin = sample_points(traced, data, n_validation, seed)
    reference = tf_jacobian(traced, xs)
    validation = validate_jacobian(traced, jac, xs, tolerance, reference=reference)
    if not validation["passed"]:
        raise ValidationError(
            f"the exported Jacobian differs from GradientTape: max relative error {validation['max_rel']:.3g} "
            f"> tolerance {tolerance:g} on {validation['points']} points ({origin}); nothing was written")
    def second_reference(points):
        from nnpartials.exporter.reference import tf_hessian

        try:
            return tf_hessian(traced, points)[2], None, "tensorflow nested GradientTape"
        except LookupError as exc:  # an op TensorFlow has no second derivative for (tf.nn.softsign)
            H, keep = fd_hessian(jac, points)
            return H, keep, (f"float64 central differences of the Jacobian graph (nested GradientTape is not available "
                             f"for this model: {str(exc).splitlines()[0]})")

    return _Prepared(fwd=fwd, jac=jac, info=info, xs=xs, origin=origin, validation=validation, reference=reference,
                     keep=None, reference_name="tensorflow GradientTape", input_names=traced.input_names,
                     input_shapes=traced.input_shapes, dtype="float32", normalization=traced.normalization,
                     box=sample_box(traced),
                     source={"kind": traced.source, "name": getattr(traced.keras_model, "name", None)},
                     second_reference=second_reference)


def _prepare_onnx(model_or_path, data, mode, opset, n_validation, tolerance, seed, steps) -> _Prepared:
    from nnpartials.exporter.jacobian import build_jacobian_model
    from nnpartials.exporter.onnx_import import check_batch_independence, load_onnx

    if opset is not None:
        raise ExportError("opset applies to Keras models (the tf2onnx conversion); an ONNX model keeps its own "
                          "opset (upgraded to 13 when older)")
    steps.next("loading the ONNX model")
    om = load_onnx(model_or_path)
    check_batch_independence(om)
    steps.next("building the Jacobian graph")
    jac, info = build_jacobian_model(om.model, mode=mode)
    steps.next(f"validating against float64 finite differences ({n_validation} points)")
    dt = np.float32 if om.dtype == "float32" else np.float64
    xs, origin = sample_points(om, data, n_validation, seed, dtype=dt)
    validation, reference, keep = validate_onnx(om.model, jac, om.input_names, xs, tolerance)
    if not validation["passed"]:
        raise ValidationError(
            f"the exported Jacobian differs from float64 finite differences of the forward graph: max relative "
            f"error {validation['max_rel']:.3g} > tolerance {tolerance:g} on {validation['points']} points "
            f"({origin}){'; ' + validation['failure'] if 'failure' in validation else ''}; nothing was written")
    return _Prepared(fwd=om.model, jac=jac, info=info, xs=xs, origin=origin, validation=validation,
                     reference=reference, keep=keep, reference_name=validation["reference"],
                     input_names=om.input_names, input_shapes=om.input_shapes, dtype=om.dtype, normalization=None,
                     box=sample_box(om),
                     source={"kind": "onnx", "producer": om.producer or None,
                             "renamed_outputs": om.renamed_outputs or None,
                             "dropped_outputs": om.dropped_outputs or None, "upgraded_from_opset": om.upgraded_from},
                     second_reference=lambda points: fd_hessian(jac, points) + (
                         "float64 central differences of the Jacobian graph (Richardson; onnx reference evaluator)",))


def export(model_or_path, out_dir, *, data=None, mode: str = "auto", opset: int | None = None,
           n_validation: int = 1000, tolerance: float = tolerances.EXPORT_VALIDATION, overwrite: bool = False,
           progress: bool = False, seed: int = 0, sign=None, allow_unsafe_deserialization: bool = False,
           order: int = 1) -> Bundle:
    """Export a model to a bundle folder ``out_dir``: a Keras model (object, ``.keras`` file or SavedModel
    directory) or an ONNX model (``onnx.ModelProto``, bytes, or a ``.onnx`` file from PyTorch, skl2onnx, tf2onnx,
    ``onnx.helper``, ...).

    ``data``: points for export-time validation (array [N, n_in], or one array per input, or a dict by input
    name); without it, points are drawn from the Normalization statistics or :data:`DEFAULT_BOX`.
    ``mode``: ``"auto"`` (cheaper of forward/reverse by shape), ``"forward"`` or ``"reverse"``.
    The companion graph is checked against an independent reference, GradientTape for Keras and float64 central
    differences of the forward graph for ONNX input; :class:`ValidationError` (and nothing written) above
    ``tolerance``.
    ``overwrite``: replace ``out_dir`` when it holds a bundle (never a folder that is not one, and never the
    root, home or working folder or a folder above it; these are refused before any work).
    ``sign``: path of a PEM elliptic-curve private key; the bundle gets ``model.sig`` (needs
    ``pip install 'nnpartials[sign]'``), signed before it appears at ``out_dir``.
    ``allow_unsafe_deserialization``: load a ``.keras`` file with Lambda layers, whose Python code Keras runs while
    loading (Keras's ``safe_mode=False``; refused by default). Only for files you trust.
    ``order=2`` also writes the second-derivative graphs ``model.hess.onnx``, ``model.lap.onnx`` and
    ``model.hvp.onnx``, validated on the same points against nested GradientTape (Keras) or float64 central
    differences of the Jacobian graph (ONNX input); :class:`ValidationError` (nothing written) above
    ``tolerances.EXPORT_SECOND_ORDER``.
    """
    if isinstance(order, bool) or order not in (1, 2):
        raise ExportError(f"order must be 1 (Jacobian) or 2 (also Hessian, Laplacian, Hessian-vector product), got "
                          f"{order!r}")
    if isinstance(n_validation, bool) or not isinstance(n_validation, (int, np.integer)) or n_validation < 1:
        raise ExportError(f"n_validation must be a positive integer (points for the export-time check), got "
                          f"{n_validation!r}")
    out_dir = os.fspath(out_dir)
    out_dir = out_dir.rstrip("/" + os.sep) or out_dir  # "b/" names the folder b (also when b is a link)
    _check_destination(out_dir, overwrite)  # before any work
    if sign is not None:
        from nnpartials.signing import check_private_key

        check_private_key(sign)
    steps = _Steps(progress)
    with steps:
        front = _prepare_onnx if is_onnx_source(model_or_path) else _prepare_keras
        extra = {"allow_unsafe_deserialization": allow_unsafe_deserialization} if front is _prepare_keras else {}
        pr = front(model_or_path, data, mode, opset, n_validation, tolerance, seed, steps, **extra)
        fwd, jac, info, validation = pr.fwd, pr.jac, pr.info, pr.validation
        validation["points_from"] = pr.origin
        validation["mode"] = info["mode"]
        steps.next("lowering to the C core weight file")
        nnp_bytes, c_note = None, None
        if pr.dtype != "float32":
            c_note = (f"the C core computes in float32 and this model is {pr.dtype}: onnxruntime serves it in its "
                      f"own precision")
        else:
            try:
                from nnpartials.exporter.lower import lower_onnx

                nnp_bytes = lower_onnx(fwd)
            except NotLowerableError as exc:
                c_note = str(exc)
            except ImportError as exc:  # pragma: no cover - C lowering not installed
                c_note = f"C lowering unavailable: {exc}"
        if nnp_bytes is not None:
            steps.next(f"validating the C core ({validation['points']} points)")
            validation["c_core"] = validate_c_core(nnp_bytes, pr.xs, pr.reference, tolerance, keep=pr.keep,
                                                   reference_name=pr.reference_name)
            if not validation["c_core"]["passed"]:
                raise ValidationError(
                    f"the C core's Jacobian (model.nnp) differs from the reference ({pr.reference_name}): max "
                    f"relative error {validation['c_core']['max_rel']:.3g} > tolerance {tolerance:g} on "
                    f"{validation['points']} points ({pr.origin}); nothing was written")
        second = _second_order(pr, info, nnp_bytes, steps) if order == 2 else None
        steps.next("writing the bundle")
        files = {FORWARD: fwd.SerializeToString(), JACOBIAN: jac.SerializeToString()}
        if nnp_bytes is not None:
            files[WEIGHTS] = nnp_bytes
        if second is not None:
            validation["second_order"] = second["validation"]
            for kind, fname in (("hessian", HESSIAN), ("laplacian", LAPLACIAN), ("hvp", HVP)):
                files[fname] = second["graphs"][kind][0].SerializeToString()
        files[VALIDATION] = (json.dumps(validation, indent=2) + "\n").encode()
        widths = [int(np.prod(sh, dtype=np.int64)) for sh in pr.input_shapes]
        in_cols = _columns(pr.input_names, widths)
        n_out = info["n_out"]
        y_cols = ["y"] if n_out == 1 else [f"y{i + 1}" for i in range(n_out)]
        out_shapes = _output_shapes(fwd, info)
        inputs = []
        for n, w, c, sh in zip(pr.input_names, widths, in_cols, pr.input_shapes):
            entry = {"name": n, "shape": ["batch", w], "dtype": pr.dtype, "columns": c}
            if len(sh) != 1:
                entry["tensor_shape"] = ["batch", *[int(d) for d in sh]]
            inputs.append(entry)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": pr.source,
            "opset": next(o.version for o in fwd.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": inputs,
            "outputs": [dict({"name": o["name"], "width": o["width"]},
                             **({"tensor_shape": ["batch", *sh]} if sh is not None and len(sh) != 1 else {}))
                        for o, sh in zip(info["outputs"], out_shapes)],
            "y": {"shape": ["batch", n_out], "dtype": pr.dtype, "columns": y_cols,
                  "note": "the model's outputs flattened and concatenated in order"},
            "jacobian": {
                "mode": info["mode"],
                "layout": LAYOUT,
                "features": "inputs and outputs of any shape are flattened in C order; tensor_shape gives their "
                            "shapes",
                "outputs": [{"name": jn, "input": i["name"], "shape": ["batch", n_out, i["width"]]}
                            for jn, i in zip(info["jacobian_outputs"], info["inputs"])],
            },
            "input_normalization": pr.normalization,
            "sample_box": pr.box,
            "c_core": {"available": nnp_bytes is not None, "file": WEIGHTS if nnp_bytes is not None else None,
                       "reason": c_note,
                       "validation": ({k: validation["c_core"][k] for k in ("points", "max_rel", "passed")}
                                      if "c_core" in validation else None)},
            "validation": dict({k: validation[k] for k in ("points", "points_from", "max_rel", "tolerance",
                                                           "passed")}, reference=validation["reference"]),
            "second_order": None if second is None else second["manifest"],
            "tools": tool_versions(),
            "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
        }
        _write_atomically(out_dir, files, manifest, overwrite, sign)
    return load_bundle(out_dir)


def _second_order(pr, info, nnp_bytes, steps) -> dict:
    """Build and validate the second-order graphs; returns their models, the validation summary and the manifest
    section. Raises :class:`ValidationError` when a graph (or the C core) misses its reference."""
    from nnpartials.exporter.second_order import (build_hessian_model, build_hvp_model, build_laplacian_model,
                                                  second_derivatives_vanish)

    n_in, n_out = info["n_in"], info["n_out"]
    if n_out * n_in * n_in > MAX_HESSIAN_ENTRIES:
        raise ExportError(f"order=2: the Hessian of this model has {n_out} x {n_in} x {n_in} = {n_out * n_in * n_in} "
                          f"entries per point, more than the {MAX_HESSIAN_ENTRIES} export builds second-order graphs "
                          f"for; export with order=1")
    steps.next("building the second-order graphs (Hessian, Laplacian, Hessian-vector product)")
    graphs = {"hessian": build_hessian_model(pr.fwd), "laplacian": build_laplacian_model(pr.fwd),
              "hvp": build_hvp_model(pr.fwd)}
    vanish, why = second_derivatives_vanish(pr.fwd)
    steps.next(f"validating second derivatives ({pr.xs[0].shape[0]} points)")
    H_ref, keep, ref_name = pr.second_reference(pr.xs)
    val = validate_second_order(graphs, pr.input_names, pr.xs, pr.reference, H_ref, keep, reference_name=ref_name)
    if not val["passed"]:
        raise ValidationError(
            f"the second-order graphs differ from the reference ({ref_name}): max relative error "
            f"{val['max_rel']:.3g} > tolerance {val['tolerance']:g} on {val['points']} points ({pr.origin})"
            f"{'; ' + val['failure'] if 'failure' in val else ''}; nothing was written")
    c_second = False
    if nnp_bytes is not None:
        from nnpartials import ccore

        if ccore.has_second_order():
            val["c_core"] = validate_c_second_order(nnp_bytes, pr.xs, H_ref, keep, val["tolerance"], ref_name)
            if not val["c_core"]["passed"]:
                raise ValidationError(
                    f"the C core's second derivatives (model.nnp) differ from the reference ({ref_name}): max "
                    f"relative error {val['c_core']['max_rel']:.3g} > tolerance {val['tolerance']:g}; nothing was "
                    f"written")
            c_second = True
    lap_info, hvp_info = graphs["laplacian"][1], graphs["hvp"][1]
    note = (f"second derivatives are zero almost everywhere: {why}" if vanish else
            "the network is smooth where its activations are")
    manifest = {
        "hessian": {"file": HESSIAN, "output": "d2y_dx2", "shape": ["batch", n_out, n_in, n_in],
                    "layout": HESSIAN_LAYOUT, "symmetric": True},
        "laplacian": {"file": LAPLACIAN, "output": "laplacian", "shape": ["batch", n_out], "layout": LAPLACIAN_LAYOUT,
                      "method": lap_info.get("laplacian_method", "forward-laplacian"),
                      "fallback_reason": lap_info.get("laplacian_fallback_reason")},
        "hvp": {"file": HVP, "input": hvp_info.get("v_input", "v"), "output": "hvp", "shape": ["batch", n_out, n_in],
                "layout": HVP_LAYOUT},
        "features": "all inputs' flattened features, concatenated in input order (n_in = " + str(n_in) + ")",
        "zero_almost_everywhere": bool(vanish),
        "note": note,
        "c_core": c_second,
        "validation": {k: val[k] for k in ("points", "max_rel", "tolerance", "passed", "reference")},
    }
    return {"graphs": graphs, "validation": val, "manifest": manifest}


def validate_c_second_order(nnp_bytes: bytes, xs, H_ref, keep, tolerance, reference_name) -> dict:
    """The C core's analytic Hessian, Laplacian and Hessian-vector product against the reference Hessian."""
    from nnpartials import ccore

    x = np.concatenate([np.asarray(p, np.float32).reshape(p.shape[0], -1) for p in xs], axis=1)
    mask = np.ones_like(H_ref) if keep is None else keep
    out = {"points": int(x.shape[0]), "tolerance": tolerance, "reference": reference_name}
    H = ccore.hessian(nnp_bytes, x)
    _, r, _ = tolerances.scaled_error(np.asarray(H, np.float64) * mask, H_ref * mask)
    out["hessian"] = r
    diag = np.einsum("bijj->bij", mask).all(axis=2)
    lap = ccore.laplacian(nnp_bytes, x)
    _, r2, _ = tolerances.scaled_error(np.asarray(lap, np.float64) * diag, np.einsum("bijj->bi", H_ref) * diag)
    out["laplacian"] = r2
    v = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    rows = mask.all(axis=3)
    hv = ccore.hvp(nnp_bytes, x, v)
    _, r3, _ = tolerances.scaled_error(np.asarray(hv, np.float64) * rows,
                                       np.einsum("bijk,bk->bij", H_ref, v.astype(np.float64)) * rows)
    out["hvp"] = r3
    out["max_rel"] = max(r, r2, r3)
    out["passed"] = bool(out["max_rel"] <= tolerance)
    return out


def _output_shapes(fwd, info):
    """Per-point shape of each graph output (None where unknown)."""
    from nnpartials.exporter.graph import GraphBuilder

    b = GraphBuilder(fwd)
    out = []
    for o in info["outputs"]:
        s = b.shape(o["name"])
        out.append(tuple(int(d) for d in s[1:]) if s is not None and all(d is not None for d in s[1:]) else None)
    return out


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _protected_folders() -> set:
    """Folders export never writes over: the root, the home folder, the working folder and every folder above it."""
    out = {os.path.realpath(os.sep)}
    home = os.path.expanduser("~")
    if home != "~":
        out.add(os.path.realpath(home))
    try:
        d = os.path.realpath(os.getcwd())
    except OSError:  # the working folder was removed
        return out
    while True:
        out.add(d)
        up = os.path.dirname(d)
        if up == d:
            return out
        d = up


def _not_a_bundle(folder):
    """None when ``folder`` holds an nnpartials bundle (manifest.json parses, format "nnpartials-bundle"), else what
    was found instead."""
    try:
        manifest = _parse_manifest(_read_regular(folder, MANIFEST, MAX_MANIFEST_BYTES, f"no {MANIFEST}"), MANIFEST)
    except BundleError as exc:
        return str(exc)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"{MANIFEST} does not have format {FORMAT!r}"
    return None


def _check_destination(out_dir, overwrite) -> str:
    """Refuse an output folder that export must not write; else say what is there: "absent", "empty" or "bundle".

    Run before any work and again right before the final rename. Only a folder holding a bundle is ever replaced
    (with ``overwrite``), and never the root, the home folder, the working folder or a folder above it."""
    if os.path.islink(out_dir):
        raise ExportError(f"output {out_dir!r} is a symbolic link; give the bundle folder itself")
    if not os.path.lexists(out_dir):
        return "absent"
    if not os.path.isdir(out_dir):
        raise ExportError(f"output {out_dir!r} is an existing {'file' if os.path.isfile(out_dir) else 'non-folder'}, "
                          f"not a folder; give the name of a new folder for the bundle")
    real = os.path.realpath(out_dir)
    if real in _protected_folders():
        raise ExportError(f"refusing to write the bundle over {out_dir!r} ({real}): it is the root, the home folder, "
                          f"the working folder or a folder above it; give the name of a new folder")
    if os.path.ismount(real):
        raise ExportError(f"refusing to write the bundle over {out_dir!r}: it is a mount point; give a folder inside it")
    try:
        entries = sorted(os.listdir(out_dir))
    except OSError as exc:
        raise ExportError(f"output folder {out_dir!r} cannot be listed ({exc.strerror or exc})") from None
    if not entries:
        return "empty"
    problem = _not_a_bundle(out_dir)
    if problem is not None:
        shown = ", ".join(repr(e) for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ExportError(f"output folder {out_dir!r} exists and is not empty, and is not an nnpartials bundle "
                          f"({problem}; it holds {len(entries)} entries: {shown}); export only ever replaces a bundle "
                          f"folder: give a new or empty folder")
    if not overwrite:
        raise ExportError(f"output folder {out_dir!r} exists and is not empty: it holds a bundle "
                          f"(pass overwrite=True / --force to replace it)")
    return "bundle"


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_atomically(out_dir, files, manifest, overwrite, sign=None):
    """Write the bundle into a temporary folder beside ``out_dir`` (signing it there with ``sign``), then swap it in.

    Replacing a bundle: rename the old folder aside, rename the new one in, then remove the old one; an
    interruption leaves either the old bundle or the new one at ``out_dir`` (or, between the two renames, the old
    one restored), never a half-written bundle. Folder mode 0o777 & ~umask, files 0o666 & ~umask."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".nnp-export-", dir=parent)
    aside = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        for name, data in files.items():
            _write_file(tmp, name, data)
        _write_file(tmp, MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        if sign is not None:
            from nnpartials.bundle import sign_bundle

            sign_bundle(tmp, sign)
        _fsync_dir(tmp)
        if _check_destination(out_dir, overwrite) == "bundle":  # again: it may have changed while exporting
            aside = os.path.join(parent, f".nnp-old-{secrets.token_hex(8)}")
            os.rename(out_dir, aside)
        try:
            os.replace(tmp, out_dir)  # onto nothing, or onto an empty folder
        except OSError as exc:
            raise ExportError(f"could not move the new bundle into {out_dir!r} ({exc.strerror or exc}); "
                              f"did the folder change while exporting?") from None
        tmp = None
        _fsync_dir(parent)
    except BaseException:
        if aside is not None and not os.path.lexists(out_dir):
            os.rename(aside, out_dir)  # put the old bundle back
            aside = None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


class _Steps:
    """A small rich status line for export steps (silent unless progress=True)."""

    def __init__(self, enabled):
        self.enabled = enabled
        self._status = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console

            self._status = Console(stderr=True).status("exporting")
            self._status.__enter__()
        return self

    def next(self, what):
        if self._status is not None:
            self._status.update(f"export: {what}")

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)
