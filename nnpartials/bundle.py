"""The bundle format, shared by the writer (:mod:`nnpartials.exporter.bundle`) and every reader (the runtime,
the command line, the diagnostics): file names, the manifest schema, and the loader.

A bundle is a folder::

    manifest.json     format version, inputs/outputs/columns, Jacobian layout, sha256 of every file,
                      tool versions, validation summary, sample box, C-core availability
    model.onnx        forward graph (self-contained)
    model.jac.onnx    companion graph with outputs y [batch, n_out] and dy_dx [batch, n_out, n_in]
    model.nnp         C-core weight file (only when the network is in the C subset)
    model.hess.onnx   (order 2) outputs y, dy_dx and d2y_dx2 [batch, n_out, n_in, n_in]
    model.lap.onnx    (order 2) outputs y, dy_dx and laplacian [batch, n_out] (forward-Laplacian pass)
    model.hvp.onnx    (order 2) inputs x and v [batch, n_in], outputs y and hvp [batch, n_out, n_in]
    validation.json   export-time comparison against an independent reference
    model.sig         (with ``--sign``) signature over manifest.json and every listed file (OpenSSF model-signing)

Loading reads only regular files (no links, FIFOs, devices) of the listed size, validates the manifest schema,
verifies every hash (and, given a public key, the signature), refuses ONNX files that reference external data
anywhere (subgraphs included), and checks both graphs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

import onnx

from nnpartials.errors import BundleError
from nnpartials.files import _read_regular, _write_file  # noqa: F401  (the writer uses them too)
from nnpartials.signing import SIGNATURE  # noqa: F401

FORMAT = "nnpartials-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FORWARD = "model.onnx"
JACOBIAN = "model.jac.onnx"
WEIGHTS = "model.nnp"
HESSIAN = "model.hess.onnx"
LAPLACIAN = "model.lap.onnx"
HVP = "model.hvp.onnx"
#: The second-order graphs (``export(..., order=2)``), by kind.
SECOND_ORDER_FILES = {"hessian": HESSIAN, "laplacian": LAPLACIAN, "hvp": HVP}
VALIDATION = "validation.json"
#: Signature written by ``export(..., sign=KEY)`` / ``nnpartials export --sign``; never listed in the manifest
#: (it signs the manifest).
LAYOUT = "dy_dx[b, i, j] = d y[b, i] / d x[b, j]"
HESSIAN_LAYOUT = "d2y_dx2[b, i, j, k] = d2 y[b, i] / dx[b, j] dx[b, k]"
HVP_LAYOUT = "hvp[b, i, j] = sum_k d2 y[b, i] / dx[b, j] dx[b, k] * v[b, k]"
LAPLACIAN_LAYOUT = "laplacian[b, i] = sum_j d2 y[b, i] / dx[b, j]^2"
LAPLACIAN_METHODS = ("forward-laplacian", "hessian-trace")
#: Precisions a bundle's inputs and outputs may have (the companion graph computes in the model's own).
DTYPES = ("float32", "float64")

#: Points drawn for validation when neither data nor Normalization statistics are available: x_j ~ U[-1, 1].
DEFAULT_BOX = (-1.0, 1.0)
#: With Normalization statistics the box is mean ± NORMALIZATION_BOX_STDS · std per feature.
NORMALIZATION_BOX_STDS = 2.0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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

    @property
    def order(self) -> int:
        """Highest derivative order the bundle serves: 2 when it holds the second-order graphs, else 1."""
        return 2 if self.manifest.get("second_order") is not None else 1

    @property
    def second_derivatives_vanish(self) -> bool:
        """True for a piecewise-linear network (relu, leaky_relu, ...): its second derivatives are zero wherever
        they exist (almost everywhere). Read from the manifest of an order-2 bundle; False otherwise."""
        so = self.manifest.get("second_order") or {}
        return bool(so.get("zero_almost_everywhere", False))

    def read(self, name: str) -> bytes:
        if name not in self.files:
            raise BundleError(f"bundle {self.path!r} has no file {name!r}"
                              + (f" ({self.manifest.get('c_core', {}).get('reason')})" if name == WEIGHTS else ""))
        return self.files[name]


# ----- loading -----------------------------------------------------------------------------------------------
#: Largest manifest.json the loader reads (a real one is a few KiB; the cap keeps a hostile one from filling memory).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
#: Largest signature file (model.sig) the loader reads (a real one is under 2 KiB).
MAX_SIGNATURE_BYTES = 1024 * 1024
#: File names a manifest may list: plain names inside the bundle folder, no path separators, not hidden.
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_JACOBIAN_MODES = ("forward", "reverse")


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
    if m.get("second_order") is not None:
        _validate_second_order(s, m["second_order"], files, n_in, n_out)
    for key in ("validation", "source", "tools"):
        if m.get(key) is not None:
            s.obj(m[key], key)


def _validate_second_order(s, so, files, n_in, n_out):
    so = s.obj(so, "second_order")
    expect = {"hessian": ("d2y_dx2", (n_out, n_in, n_in), HESSIAN_LAYOUT),
              "laplacian": ("laplacian", (n_out,), LAPLACIAN_LAYOUT),
              "hvp": ("hvp", (n_out, n_in), HVP_LAYOUT)}
    for kind, fname in SECOND_ORDER_FILES.items():
        where = f"second_order.{kind}"
        e = s.obj(s.get(so, kind, "second_order.", "an object {file, output, shape, layout}"), where)
        if s.get(e, "file", f"{where}.", repr(fname)) != fname:
            s.fail(f"{where}.file", repr(fname), e["file"])
        if fname not in files:
            s.fail("files", f"an entry for {fname} (named by {where}.file)", sorted(files))
        out, dims, layout = expect[kind]
        if s.get(e, "output", f"{where}.", repr(out)) != out:
            s.fail(f"{where}.output", repr(out), e["output"])
        s.shape(s.get(e, "shape", f"{where}.", f"[\"batch\", {', '.join(map(str, dims))}]"), f"{where}.shape",
                1 + len(dims), dims)
        if e.get("layout", layout) != layout:
            s.fail(f"{where}.layout", repr(layout), e["layout"])
    method = so["laplacian"].get("method")
    if method not in LAPLACIAN_METHODS:
        s.fail("second_order.laplacian.method", f"one of {LAPLACIAN_METHODS}", method)
    v = s.get(so["hvp"], "input", "second_order.hvp.", "the name of the direction input")
    s.name(v, "second_order.hvp.input")
    zae = s.get(so, "zero_almost_everywhere", "second_order.", "true or false")
    if not isinstance(zae, bool):
        s.fail("second_order.zero_almost_everywhere", "true or false", zae)


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
        from nnpartials.signing import check_signature

        signature = _read_regular(path, SIGNATURE, MAX_SIGNATURE_BYTES,
                                  f"bundle {path!r} is not signed (no {SIGNATURE}), but a key was given to verify it")
        check_signature({MANIFEST: raw_manifest, **files}, signature, key, where=path)
    for name in (FORWARD, JACOBIAN, *(SECOND_ORDER_FILES.values() if manifest.get("second_order") else ())):
        _check_onnx(name, files[name], path)
    return Bundle(path=path, manifest=manifest, files=files, manifest_bytes=raw_manifest)


def sign_bundle(path, private_key, *, password: str | None = None) -> str:
    """Sign the bundle folder ``path`` with ``private_key`` (path of a PEM elliptic-curve private key): verify the
    bundle (hashes, graphs), sign the bytes just verified, and write ``path/model.sig`` (replacing any older one
    atomically). Returns the signature's path."""
    import contextlib

    from nnpartials.signing import signature_for

    bundle = load_bundle(path)
    signature = signature_for({MANIFEST: bundle.manifest_bytes, **bundle.files}, private_key, password)
    tmp = os.path.join(bundle.path, f".{SIGNATURE}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        _write_file(bundle.path, os.path.basename(tmp), signature)
        os.replace(tmp, os.path.join(bundle.path, SIGNATURE))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return os.path.join(bundle.path, SIGNATURE)


def verify_bundle(path, public_key) -> Bundle:
    """Load the bundle folder ``path`` and verify its signature with ``public_key`` (path of a PEM public key);
    returns the :class:`Bundle`, raises :class:`BundleError` when the bundle is unsigned, signed with another key,
    or changed since it was signed."""
    return load_bundle(path, key=public_key)
