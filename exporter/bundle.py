"""Bundle writer and loader.

A bundle is a folder::

    manifest.json     format version, inputs/outputs/columns, Jacobian layout, sha256 of every file,
                      tool versions, validation summary, sample box, C-core availability
    model.onnx        forward graph (frozen, self-contained)
    model.jac.onnx    companion graph with outputs y [batch, n_out] and dy_dx [batch, n_out, n_in]
    model.nnp         C-core weight file (only when the network is in the C subset)
    validation.json   export-time comparison against TensorFlow's GradientTape

Loading verifies every hash, refuses ONNX files that reference external data, and checks both graphs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
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
LAYOUT = "dy_dx[b, i, j] = d y[b, i] / d x[b, j]"

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
def _split_data(data, widths, names):
    from nnpartials.runtime.validate import as_batch

    if isinstance(data, dict):
        return [as_batch(data[n], w, name=f"data[{n!r}]") for n, w in zip(names, widths)]
    if isinstance(data, (list, tuple)) and len(widths) > 1 and len(data) == len(widths) \
            and all(np.ndim(d) == 2 for d in data):
        return [as_batch(d, w, name=f"data[{k}]") for k, (d, w) in enumerate(zip(data, widths))]
    arr = as_batch(data, sum(widths), name="data")
    return np.split(arr, np.cumsum(widths)[:-1], axis=1)


def sample_box(traced) -> list:
    if traced.normalization is not None:
        m = np.asarray(traced.normalization["mean"])
        s = np.asarray(traced.normalization["std"])
        return [[float(a - NORMALIZATION_BOX_STDS * b), float(a + NORMALIZATION_BOX_STDS * b)] for a, b in zip(m, s)]
    return [list(DEFAULT_BOX) for _ in range(sum(traced.input_widths))]


def sample_points(traced, data=None, n: int = 1000, seed: int = 0):
    """Validation points: ``n`` rows of ``data`` (random subset if larger), else uniform in :func:`sample_box`."""
    rng = np.random.default_rng(seed)
    if data is not None:
        parts = _split_data(data, traced.input_widths, traced.input_names)
        rows = parts[0].shape[0]
        if rows == 0:
            raise ExportError("validation data is empty")
        idx = np.sort(rng.choice(rows, size=n, replace=False)) if rows > n else np.arange(rows)
        return [np.ascontiguousarray(p[idx]) for p in parts], "data"
    box = np.asarray(sample_box(traced), dtype=np.float64)
    pts = rng.uniform(box[:, 0], box[:, 1], size=(n, box.shape[0])).astype(np.float32)
    return np.split(pts, np.cumsum(traced.input_widths)[:-1], axis=1), \
        ("normalization statistics" if traced.normalization is not None else "default box")


# ----- validation --------------------------------------------------------------------------------------------
def validate_jacobian(traced, jac_model: onnx.ModelProto, xs, tolerance=tolerances.EXPORT_VALIDATION) -> dict:
    """Compare the companion graph (onnxruntime, CPU) with GradientTape on the points ``xs``."""
    import onnxruntime as ort

    from nnpartials.exporter.reference import tf_jacobian

    y_ref, j_ref = tf_jacobian(traced, xs)
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


# ----- export ------------------------------------------------------------------------------------------------
def _columns(names, widths, single_prefix=None):
    cols = []
    for n, w in zip(names, widths):
        cols.append([f"{n}{j + 1}" for j in range(w)])
    return cols


def export(model_or_path, out_dir, *, data=None, mode: str = "auto", opset: int | None = None,
           n_validation: int = 1000, tolerance: float = tolerances.EXPORT_VALIDATION, overwrite: bool = False,
           progress: bool = False, seed: int = 0) -> Bundle:
    """Export a Keras model (object, ``.keras`` file or SavedModel directory) to a bundle folder ``out_dir``.

    ``data``: points for export-time validation (array [N, n_in], or one array per input, or a dict by input
    name); without it, points are drawn from the Normalization statistics or :data:`DEFAULT_BOX`.
    ``mode``: ``"auto"`` (cheaper of forward/reverse by shape), ``"forward"`` or ``"reverse"``.
    Raises :class:`ValidationError` (and writes nothing) when the Jacobian disagrees with GradientTape.
    """
    from nnpartials.exporter.jacobian import build_jacobian_model
    from nnpartials.exporter.keras_export import DEFAULT_OPSET, load_model, to_onnx

    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not overwrite and os.listdir(out_dir):
        raise ExportError(f"output folder {out_dir!r} exists and is not empty (pass overwrite=True / --force)")
    steps = _Steps(progress)
    with steps:
        steps.next("loading the model")
        traced = load_model(model_or_path)
        steps.next("converting to ONNX (tf2onnx, frozen)")
        fwd = to_onnx(traced, opset=opset or DEFAULT_OPSET)
        steps.next("building the Jacobian graph")
        jac, info = build_jacobian_model(fwd, mode=mode)
        steps.next(f"validating against GradientTape ({n_validation} points)")
        xs, origin = sample_points(traced, data, n_validation, seed)
        validation = validate_jacobian(traced, jac, xs, tolerance)
        validation["points_from"] = origin
        validation["mode"] = info["mode"]
        if not validation["passed"]:
            raise ValidationError(
                f"the exported Jacobian differs from GradientTape: max relative error {validation['max_rel']:.3g} "
                f"> tolerance {tolerance:g} on {validation['points']} points ({origin}); nothing was written")
        steps.next("lowering to the C core weight file")
        nnp_bytes, c_note = None, None
        try:
            from nnpartials.exporter.lower import lower_onnx

            nnp_bytes = lower_onnx(fwd)
        except NotLowerableError as exc:
            c_note = str(exc)
        except ImportError as exc:  # pragma: no cover - C lowering not installed
            c_note = f"C lowering unavailable: {exc}"
        steps.next("writing the bundle")
        files = {FORWARD: fwd.SerializeToString(), JACOBIAN: jac.SerializeToString()}
        if nnp_bytes is not None:
            files[WEIGHTS] = nnp_bytes
        files[VALIDATION] = (json.dumps(validation, indent=2) + "\n").encode()
        in_cols = _columns(traced.input_names, traced.input_widths)
        n_out = info["n_out"]
        y_cols = ["y"] if n_out == 1 else [f"y{i + 1}" for i in range(n_out)]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"kind": traced.source, "name": getattr(traced.keras_model, "name", None)},
            "opset": next(o.version for o in fwd.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": [{"name": n, "shape": ["batch", w], "dtype": "float32", "columns": c}
                       for n, w, c in zip(traced.input_names, traced.input_widths, in_cols)],
            "outputs": [{"name": o["name"], "width": o["width"]} for o in info["outputs"]],
            "y": {"shape": ["batch", n_out], "dtype": "float32", "columns": y_cols,
                  "note": "the model's outputs flattened and concatenated in order"},
            "jacobian": {
                "mode": info["mode"],
                "layout": LAYOUT,
                "outputs": [{"name": jn, "input": i["name"], "shape": ["batch", n_out, i["width"]]}
                            for jn, i in zip(info["jacobian_outputs"], info["inputs"])],
            },
            "input_normalization": traced.normalization,
            "sample_box": sample_box(traced),
            "c_core": {"available": nnp_bytes is not None, "file": WEIGHTS if nnp_bytes is not None else None,
                       "reason": c_note},
            "validation": {k: validation[k] for k in ("points", "points_from", "max_rel", "tolerance", "passed")},
            "tools": tool_versions(),
            "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
        }
        _write_atomically(out_dir, files, manifest, overwrite)
    return load_bundle(out_dir)


def _write_atomically(out_dir, files, manifest, overwrite):
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".nnp-export-", dir=parent)
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        if os.path.exists(out_dir):
            if not overwrite and os.listdir(out_dir):
                raise ExportError(f"output folder {out_dir!r} appeared while exporting")
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
def _check_onnx(name, data, path):
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise BundleError(f"{path}: {name} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or init.external_data:
            raise BundleError(f"{path}: {name} references external data (tensor {init.name!r}); bundles must be "
                              f"self-contained")
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and (attr.t.external_data or
                                                            attr.t.data_location == onnx.TensorProto.EXTERNAL):
                raise BundleError(f"{path}: {name} references external data (node {node.name!r}); bundles must be "
                                  f"self-contained")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BundleError(f"{path}: {name} fails the ONNX checker: {exc}") from None
    return model


def load_bundle(path) -> Bundle:
    """Read and verify a bundle folder. Raises :class:`BundleError` with what was expected and what was found."""
    if isinstance(path, Bundle):
        return path
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise BundleError(f"bundle {path!r} is not a folder (expected the folder written by `nnpartials export`)")
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise BundleError(f"bundle {path!r} has no {MANIFEST}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: expected format {FORMAT!r}, found {manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{mpath}: expected format_version {FORMAT_VERSION}, found {manifest.get('format_version')!r}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or FORWARD not in listed or JACOBIAN not in listed:
        raise BundleError(f"{mpath}: the file list must name {FORWARD} and {JACOBIAN}")
    files = {}
    for name, meta in listed.items():
        if os.path.basename(name) != name or name in (".", ".."):
            raise BundleError(f"{mpath}: file name {name!r} is not a plain name inside the bundle")
        fpath = os.path.join(path, name)
        try:
            with open(fpath, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BundleError(f"bundle {path!r} is missing {name} (listed in the manifest)") from None
        digest = _sha256(data)
        if not isinstance(meta, dict) or digest != meta.get("sha256"):
            raise BundleError(f"{fpath}: sha256 mismatch: manifest says {meta.get('sha256') if isinstance(meta, dict) else meta}, "
                              f"file has {digest} ({len(data)} bytes); the file was changed or truncated")
        files[name] = data
    for name in (FORWARD, JACOBIAN):
        _check_onnx(name, files[name], path)
    for key in ("inputs", "y", "jacobian"):
        if key not in manifest:
            raise BundleError(f"{mpath}: missing key {key!r}")
    return Bundle(path=path, manifest=manifest, files=files)
