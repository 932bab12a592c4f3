"""Bundle writer and loader.

A bundle is a folder::

    manifest.json     format version, inputs/outputs/columns, Jacobian layout, sha256 of every file,
                      tool versions, validation summary, sample box, C-core availability
    model.onnx        forward graph (frozen, self-contained)
    model.jac.onnx    companion graph with outputs y [batch, n_out] and dy_dx [batch, n_out, n_in]
    model.nnp         C-core weight file (only when the network is in the C subset)
    validation.json   export-time comparison against TensorFlow's GradientTape
    model.sig         (with ``--sign``) signature over manifest.json and every listed file (OpenSSF model-signing)

Loading reads only regular files (no links, FIFOs, devices) of the listed size, validates the manifest schema,
verifies every hash (and, given a public key, the signature), refuses ONNX files that reference external data
anywhere (subgraphs included), and checks both graphs.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx

from nnpartials import tolerances
from nnpartials.errors import BundleError, ExportError, NotLowerableError, ValidationError

FORMAT = "nnpartials-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FORWARD = "model.onnx"
JACOBIAN = "model.jac.onnx"
WEIGHTS = "model.nnp"
VALIDATION = "validation.json"
#: Signature written by ``export(..., sign=KEY)`` / ``nnpartials export --sign``; never listed in the manifest
#: (it signs the manifest).
SIGNATURE = "model.sig"
LAYOUT = "dy_dx[b, i, j] = d y[b, i] / d x[b, j]"
#: Precisions a bundle's inputs and outputs may have (the companion graph computes in the model's own).
DTYPES = ("float32", "float64")

#: Points drawn for validation when neither data nor Normalization statistics are available: x_j ~ U[-1, 1].
DEFAULT_BOX = (-1.0, 1.0)
#: With Normalization statistics the box is mean ± NORMALIZATION_BOX_STDS · std per feature.
NORMALIZATION_BOX_STDS = 2.0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


@dataclass
class Bundle:
    """A verified bundle in memory: its folder, manifest and the bytes of every file (hash-checked)."""

    path: str
    manifest: dict
    files: dict = field(default_factory=dict, repr=False)
    #: the exact bytes of manifest.json as read (what a signature covers)
    manifest_bytes: bytes = field(default=b"", repr=False)

    @property
    def n_in(self) -> int:
        return sum(i["shape"][1] for i in self.manifest["inputs"])

    @property
    def n_out(self) -> int:
        return int(self.manifest["y"]["shape"][1])

    @property
    def input_columns(self) -> list:
        return [c for i in self.manifest["inputs"] for c in i["columns"]]

    @property
    def output_columns(self) -> list:
        return list(self.manifest["y"]["columns"])

    @property
    def has_c_core(self) -> bool:
        return WEIGHTS in self.files

    def read(self, name: str) -> bytes:
        if name not in self.files:
            raise BundleError(f"bundle {self.path!r} has no file {name!r}"
                              + (f" ({self.manifest.get('c_core', {}).get('reason')})" if name == WEIGHTS else ""))
        return self.files[name]


# ----- sample points -----------------------------------------------------------------------------------------
def _split_data(data, shapes, names, dtype=np.float32):
    """Validation points as one ``[N, width]`` array per input. ``data``: one array ``[N, n_in]`` (features
    concatenated in input order), one array per input (``[N, width]`` or ``[N, *shape]``), or a dict by name."""
    from nnpartials.runtime.validate import as_batch

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
    res = sess.run(None, feeds)
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
    res = sess.run(None, dict(zip(names, xs)))
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


def _prepare_keras(model_or_path, data, mode, opset, n_validation, tolerance, seed, steps) -> _Prepared:
    from nnpartials.exporter.jacobian import build_jacobian_model
    from nnpartials.exporter.keras_export import DEFAULT_OPSET, load_model, to_onnx
    from nnpartials.exporter.reference import tf_jacobian

    steps.next("loading the model")
    traced = load_model(model_or_path)
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
    return _Prepared(fwd=fwd, jac=jac, info=info, xs=xs, origin=origin, validation=validation, reference=reference,
                     keep=None, reference_name="tensorflow GradientTape", input_names=traced.input_names,
                     input_shapes=traced.input_shapes, dtype="float32", normalization=traced.normalization,
                     box=sample_box(traced),
                     source={"kind": traced.source, "name": getattr(traced.keras_model, "name", None)})


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
                             "renamed_outputs": om.renamed_outputs or None, "upgraded_from_opset": om.upgraded_from})


def export(model_or_path, out_dir, *, data=None, mode: str = "auto", opset: int | None = None,
           n_validation: int = 1000, tolerance: float = tolerances.EXPORT_VALIDATION, overwrite: bool = False,
           progress: bool = False, seed: int = 0, sign=None) -> Bundle:
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
    """
    if isinstance(n_validation, bool) or not isinstance(n_validation, (int, np.integer)) or n_validation < 1:
        raise ExportError(f"n_validation must be a positive integer (points for the export-time check), got "
                          f"{n_validation!r}")
    out_dir = os.fspath(out_dir)
    out_dir = out_dir.rstrip("/" + os.sep) or out_dir  # "b/" names the folder b (also when b is a link)
    _check_destination(out_dir, overwrite)  # before any work
    if sign is not None:
        from nnpartials.exporter.signing import check_private_key

        check_private_key(sign)
    steps = _Steps(progress)
    with steps:
        front = _prepare_onnx if is_onnx_source(model_or_path) else _prepare_keras
        pr = front(model_or_path, data, mode, opset, n_validation, tolerance, seed, steps)
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
        steps.next("writing the bundle")
        files = {FORWARD: fwd.SerializeToString(), JACOBIAN: jac.SerializeToString()}
        if nnp_bytes is not None:
            files[WEIGHTS] = nnp_bytes
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
            "tools": tool_versions(),
            "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
        }
        _write_atomically(out_dir, files, manifest, overwrite, sign)
    return load_bundle(out_dir)


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


def _write_file(folder, name, data: bytes):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    with os.fdopen(os.open(os.path.join(folder, name), flags, 0o666), "wb") as f:  # 0o666 & ~umask
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
            from nnpartials.exporter.signing import sign_bundle

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


# ----- loading -----------------------------------------------------------------------------------------------
#: Largest manifest.json the loader reads (a real one is a few KiB; the cap keeps a hostile one from filling memory).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
#: Largest signature file (model.sig) the loader reads (a real one is under 2 KiB).
MAX_SIGNATURE_BYTES = 1024 * 1024
#: File names a manifest may list: plain names inside the bundle folder, no path separators, not hidden.
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_JACOBIAN_MODES = ("forward", "reverse")


def _kind(mode) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _read_regular(folder, name, limit: int, missing: str) -> bytes:
    """The bytes of ``folder/name``, which must be a regular file of at most ``limit`` bytes.

    A symbolic link is refused whatever it points to (``O_NOFOLLOW`` where the platform has it, and an ``lstat``
    check everywhere), so is anything that is not a regular file (folder, FIFO, device, socket); the file is
    opened non-blocking (a FIFO cannot hang the open) and never read past ``limit`` bytes (``/dev/zero`` or a
    file that grows cannot fill memory). ``missing``: the message when the file does not exist.
    """
    fpath = os.path.join(folder, name)
    try:
        st = os.lstat(fpath)
    except FileNotFoundError:
        raise BundleError(missing) from None
    except OSError as exc:
        raise BundleError(f"{fpath}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{fpath}: expected a regular file, found {_kind(st.st_mode)} "
                          f"(bundle files must be plain files inside the bundle folder, not links)")
    flags = os.O_RDONLY
    for flag in ("O_NOFOLLOW", "O_NONBLOCK", "O_BINARY", "O_CLOEXEC"):
        flags |= getattr(os, flag, 0)
    try:
        fd = os.open(fpath, flags)
    except FileNotFoundError:
        raise BundleError(missing) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError(f"{fpath}: expected a regular file, found a symbolic link") from None
        raise BundleError(f"{fpath}: cannot be read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between lstat and open
            raise BundleError(f"{fpath}: expected a regular file, found {_kind(st.st_mode)}")
        if st.st_size > limit:
            raise BundleError(f"{fpath}: {st.st_size} bytes, more than the {limit} allowed")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise BundleError(f"{fpath}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise BundleError(f"{fpath}: more than the {limit} bytes allowed (the file grew while it was read)")
    return data


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _parse_manifest(raw: bytes, mpath: str):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{mpath}: not UTF-8 text ({exc})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except RecursionError:
        raise BundleError(f"{mpath}: not a manifest (JSON nested too deeply)") from None
    except ValueError as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
               type(None): "null"}


def _show(value) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} {text}"


class _Schema:
    """Checks of manifest fields; every failure is a BundleError naming the field, what was expected, what came."""

    def __init__(self, mpath):
        self.mpath = mpath

    def fail(self, field_, expected, found):
        raise BundleError(f"{self.mpath}: {field_}: expected {expected}, found {_show(found)}")

    def get(self, obj, key, where, expected):
        if key not in obj:
            raise BundleError(f"{self.mpath}: {where}{key}: missing (expected {expected})")
        return obj[key]

    def obj(self, value, field_):
        if not isinstance(value, dict):
            self.fail(field_, "an object", value)
        return value

    def array(self, value, field_, what, n=None):
        if not isinstance(value, list) or (n is not None and len(value) != n):
            self.fail(field_, f"a list of {n} {what}" if n is not None else f"a list of {what}", value)
        return value

    def name(self, value, field_):
        if not isinstance(value, str) or not value or "\x00" in value:
            self.fail(field_, "a non-empty string without NUL characters", value)
        return value

    def pos_int(self, value, field_):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.fail(field_, "a positive integer", value)
        return value

    def number(self, value, field_):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(field_, "a finite number", value)
        return value

    def shape(self, value, field_, dims: int, expected=None):
        """``["batch", n, ...]`` with ``dims - 1`` positive integers (equal to ``expected`` when given)."""
        what = "[\"batch\", " + ", ".join(str(e) for e in expected) + "]" if expected else \
            "[\"batch\"" + ", n" * (dims - 1) + "] with positive integers n"
        if not isinstance(value, list) or len(value) != dims or value[0] != "batch":
            self.fail(field_, what, value)
        ns = [self.pos_int(v, f"{field_}[{k + 1}]") for k, v in enumerate(value[1:])]
        if expected is not None and ns != list(expected):
            self.fail(field_, what, value)
        return ns

    def columns(self, value, field_, n):
        self.array(value, field_, "column names", n)
        for k, c in enumerate(value):
            self.name(c, f"{field_}[{k}]")
        return value

    def dtype(self, obj, field_):
        if "dtype" in obj and obj["dtype"] not in DTYPES:
            self.fail(f"{field_}.dtype", " or ".join(f'"{d}"' for d in DTYPES), obj["dtype"])
        return obj.get("dtype", "float32")

    def tensor_shape(self, obj, field_, width):
        """Optional ``tensor_shape``: ``["batch", d1, ..., dk]`` with positive integers whose product is width."""
        if "tensor_shape" not in obj:
            return
        v = obj["tensor_shape"]
        what = f"[\"batch\", d1, ...] with positive integers whose product is {width}"
        if not isinstance(v, list) or len(v) < 2 or v[0] != "batch":
            self.fail(f"{field_}.tensor_shape", what, v)
        dims = [self.pos_int(d, f"{field_}.tensor_shape[{k + 1}]") for k, d in enumerate(v[1:])]
        if math.prod(dims) != width:
            self.fail(f"{field_}.tensor_shape", what, v)


def _validate_manifest(m, mpath) -> None:
    """The manifest's schema, checked in one place before anything else reads it (see "Bundle format")."""
    s = _Schema(mpath)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{mpath}: expected format {FORMAT!r}, found "
                          f"{_show(m.get('format')) if isinstance(m, dict) else 'a JSON ' + _show(m)}")
    if m.get("format_version") != FORMAT_VERSION or isinstance(m.get("format_version"), bool):
        raise BundleError(f"{mpath}: expected format_version {FORMAT_VERSION}, found {m.get('format_version')!r}")
    files = s.obj(s.get(m, "files", "", "an object: file name -> {sha256, bytes}"), "files")
    for name in (FORWARD, JACOBIAN):
        if name not in files:
            raise BundleError(f"{mpath}: the file list must name {FORWARD} and {JACOBIAN}; {name} is missing")
    for name, meta in files.items():
        if not _FILE_NAME.fullmatch(name) or name in (MANIFEST, SIGNATURE):
            s.fail("files", "plain file names inside the bundle (letters, digits, '.', '_', '-'; not hidden; not "
                   f"{MANIFEST} or {SIGNATURE})", name)
        s.obj(meta, f"files[{name!r}]")
        sha = s.get(meta, "sha256", f"files[{name!r}].", "64 lowercase hex digits")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            s.fail(f"files[{name!r}].sha256", "64 lowercase hex digits", sha)
        size = s.get(meta, "bytes", f"files[{name!r}].", "the file size, an integer >= 0")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            s.fail(f"files[{name!r}].bytes", "the file size, an integer >= 0", size)

    inputs = s.get(m, "inputs", "", "a list of {name, shape, columns}")
    if not isinstance(inputs, list) or not inputs:
        s.fail("inputs", "a non-empty list of {name, shape, columns}", inputs)
    widths, names, dtypes = [], [], set()
    for k, inp in enumerate(inputs):
        where = f"inputs[{k}]"
        s.obj(inp, where)
        name = s.name(s.get(inp, "name", f"{where}.", "a non-empty string"), f"{where}.name")
        if name in names:
            s.fail(f"{where}.name", "a name different from the other inputs'", name)
        names.append(name)
        (w,) = s.shape(s.get(inp, "shape", f"{where}.", "[\"batch\", width]"), f"{where}.shape", 2)
        widths.append(w)
        s.columns(s.get(inp, "columns", f"{where}.", f"a list of {w} column names"), f"{where}.columns", w)
        dtypes.add(s.dtype(inp, where))
        s.tensor_shape(inp, where, w)
    n_in = sum(widths)

    y = s.obj(s.get(m, "y", "", "an object {shape, columns}"), "y")
    (n_out,) = s.shape(s.get(y, "shape", "y.", "[\"batch\", n_out]"), "y.shape", 2)
    s.columns(s.get(y, "columns", "y.", f"a list of {n_out} column names"), "y.columns", n_out)
    dtypes.add(s.dtype(y, "y"))
    if len(dtypes) > 1:
        s.fail("inputs[].dtype / y.dtype", "one precision for the inputs and y", sorted(dtypes))

    jac = s.obj(s.get(m, "jacobian", "", "an object {mode, layout, outputs}"), "jacobian")
    mode = s.get(jac, "mode", "jacobian.", f"one of {_JACOBIAN_MODES}")
    if mode not in _JACOBIAN_MODES:
        s.fail("jacobian.mode", f"one of {_JACOBIAN_MODES}", mode)
    if "layout" in jac and jac["layout"] != LAYOUT:
        s.fail("jacobian.layout", repr(LAYOUT), jac["layout"])
    outs = s.array(s.get(jac, "outputs", "jacobian.", "one output per input"), "jacobian.outputs",
                   "outputs {name, input, shape} (one per input)", len(inputs))
    for k, (o, name, w) in enumerate(zip(outs, names, widths)):
        where = f"jacobian.outputs[{k}]"
        s.obj(o, where)
        s.name(s.get(o, "name", f"{where}.", "a non-empty string"), f"{where}.name")
        if s.get(o, "input", f"{where}.", repr(name)) != name:
            s.fail(f"{where}.input", f"{name!r} (inputs[{k}].name)", o["input"])
        s.shape(s.get(o, "shape", f"{where}.", f"[\"batch\", {n_out}, {w}]"), f"{where}.shape", 3, (n_out, w))

    if m.get("outputs") is not None:
        outputs = s.array(m["outputs"], "outputs", "{name, width}")
        for k, o in enumerate(outputs):
            s.obj(o, f"outputs[{k}]")
            s.name(s.get(o, "name", f"outputs[{k}].", "a non-empty string"), f"outputs[{k}].name")
            s.pos_int(s.get(o, "width", f"outputs[{k}].", "a positive integer"), f"outputs[{k}].width")
            s.tensor_shape(o, f"outputs[{k}]", o["width"])
        if outputs and sum(o["width"] for o in outputs) != n_out:
            s.fail("outputs", f"widths that add up to y's {n_out} columns", [o["width"] for o in outputs])
    if "opset" in m:
        s.pos_int(m["opset"], "opset")
    norm = m.get("input_normalization")
    if norm is not None:
        s.obj(norm, "input_normalization")
        for key in ("mean", "std"):
            vals = s.array(s.get(norm, key, "input_normalization.", f"{n_in} numbers"), f"input_normalization.{key}",
                           "numbers", n_in)
            for j, v in enumerate(vals):
                s.number(v, f"input_normalization.{key}[{j}]")
                if key == "std" and v <= 0:
                    s.fail(f"input_normalization.std[{j}]", "a positive number", v)
    if m.get("sample_box") is not None:
        for j, pair in enumerate(s.array(m["sample_box"], "sample_box", "[lo, hi] pairs (one per input feature)",
                                         n_in)):
            s.array(pair, f"sample_box[{j}]", "numbers [lo, hi]", 2)
            lo, hi = (s.number(v, f"sample_box[{j}]") for v in pair)
            if lo > hi:
                s.fail(f"sample_box[{j}]", "[lo, hi] with lo <= hi", pair)
    if m.get("c_core") is not None:
        c = s.obj(m["c_core"], "c_core")
        if "available" in c and not isinstance(c["available"], bool):
            s.fail("c_core.available", "true or false", c["available"])
        if c.get("reason") is not None and not isinstance(c["reason"], str):
            s.fail("c_core.reason", "a string or null", c["reason"])
    for key in ("validation", "source", "tools"):
        if m.get(key) is not None:
            s.obj(m[key], key)


def _external_data(model: onnx.ModelProto):
    """(tensor name, where) of the first tensor anywhere in ``model`` that stores its data outside the model, else None.

    Looks at initializers and sparse initializers, every tensor-valued node attribute (Constant values and any
    other TENSOR/TENSORS/SPARSE_TENSOR(S) attribute), and recursively into every subgraph held by a node
    attribute (If branches, Loop/Scan bodies, nested to any depth), function bodies and training graphs,
    whatever the attribute's declared type says."""
    def external(t):
        return t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0

    def sparse(st):
        return [st.values, st.indices]

    stack = [(g, "graph") for g in [model.graph]]
    stack += [(ti.initialization, f"training_info[{k}].initialization") for k, ti in enumerate(model.training_info)]
    stack += [(ti.algorithm, f"training_info[{k}].algorithm") for k, ti in enumerate(model.training_info)]
    node_lists = [(f.node, f"function {f.name!r}") for f in model.functions]
    while stack or node_lists:
        if stack:
            g, where = stack.pop()
            for t in g.initializer:
                if external(t):
                    return t.name, f"{where} {g.name!r} initializer"
            for st in g.sparse_initializer:
                for t in sparse(st):
                    if external(t):
                        return t.name, f"{where} {g.name!r} sparse initializer"
            node_lists.append((g.node, f"{where} {g.name!r}"))
            continue
        nodes, where = node_lists.pop()
        for node in nodes:
            for attr in node.attribute:
                at = f"{where}, node {node.name!r} ({node.op_type}) attribute {attr.name!r}"
                tensors = list(attr.tensors)
                if attr.HasField("t"):
                    tensors.append(attr.t)
                if attr.HasField("sparse_tensor"):
                    tensors += sparse(attr.sparse_tensor)
                for st in attr.sparse_tensors:
                    tensors += sparse(st)
                for t in tensors:
                    if external(t):
                        return t.name, at
                graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
                stack += [(sub, f"{at} > subgraph") for sub in graphs]
    return None


def _check_onnx(name, data, path):
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise BundleError(f"{path}: {name} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    found = _external_data(model)
    if found is not None:
        raise BundleError(f"{path}: {name} references external data (tensor {found[0]!r} in {found[1]}); bundles "
                          f"must be self-contained")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BundleError(f"{path}: {name} fails the ONNX checker: {exc}") from None
    return model


def load_bundle(path, key=None) -> Bundle:
    """Read and verify a bundle folder. Raises :class:`BundleError` with what was expected and what was found.

    Checks, in order: ``manifest.json`` (a regular file of at most :data:`MAX_MANIFEST_BYTES`, valid JSON, the
    schema in "Bundle format"); every listed file (a regular file, not a symbolic link, FIFO, device or folder,
    exactly the listed size, the listed sha256); with ``key`` (path of a PEM elliptic-curve public key) the
    signature ``model.sig`` over ``manifest.json`` and every listed file (needs ``pip install 'nnpartials[sign]'``;
    an unsigned bundle or another key's signature is refused); then both ONNX graphs (no external data anywhere,
    ONNX checker). Files the manifest does not list are never read. A :class:`Bundle` is returned as is without
    ``key``; with ``key`` its folder is loaded and verified again.
    """
    if isinstance(path, Bundle):
        if key is None:
            return path
        path = path.path
    if isinstance(path, (bytes, bytearray, memoryview)) or not isinstance(path, (str, os.PathLike)):
        raise BundleError(f"expected the path of a bundle folder (str or os.PathLike), got {type(path).__name__}"
                          + ("; a signature key verifies a bundle folder, not bare weight bytes" if key else ""))
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not os.path.isdir(path):
        raise BundleError(f"bundle {path!r} is not a folder (expected the folder written by `nnpartials export`)")
    mpath = os.path.join(path, MANIFEST)
    raw_manifest = _read_regular(path, MANIFEST, MAX_MANIFEST_BYTES, f"bundle {path!r} has no {MANIFEST}")
    manifest = _parse_manifest(raw_manifest, mpath)
    _validate_manifest(manifest, mpath)
    files = {}
    for name, meta in manifest["files"].items():
        fpath = os.path.join(path, name)
        data = _read_regular(path, name, meta["bytes"], f"bundle {path!r} is missing {name} (listed in the manifest)")
        digest = _sha256(data)
        if len(data) != meta["bytes"] or digest != meta["sha256"]:
            raise BundleError(f"{fpath}: sha256 mismatch: manifest says {meta['sha256']} ({meta['bytes']} bytes), "
                              f"file has {digest} ({len(data)} bytes); the file was changed or truncated")
        files[name] = data
    if key is not None:
        from nnpartials.exporter.signing import check_signature

        signature = _read_regular(path, SIGNATURE, MAX_SIGNATURE_BYTES,
                                  f"bundle {path!r} is not signed (no {SIGNATURE}), but a key was given to verify it")
        check_signature({MANIFEST: raw_manifest, **files}, signature, key, where=path)
    for name in (FORWARD, JACOBIAN):
        _check_onnx(name, files[name], path)
    return Bundle(path=path, manifest=manifest, files=files, manifest_bytes=raw_manifest)
