"""Reader and writer of the ``model.nnp`` weight file (format version 1, see ``csrc/FORMAT.md``).

Pure Python and numpy (only the activation codes come from the C core's header, through
:mod:`nnpartials.ccore`), so tests can use it as a reference for the C parser::

    blob = write_nnp([Layer(W1, b1, "tanh"), Layer(W2, b2, "linear")], n_in=3)
    layers = read_nnp(blob)
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from nnpartials.ccore import ACTIVATIONS
from nnpartials.errors import WeightFileError

MAGIC = b"NNPK"
VERSION = 1
HEADER_BYTES = 32
RECORD_BYTES = 24
MAX_LAYERS = 4096
MAX_DIM = 65536

#: activation name -> code (FORMAT.md): ``ACTIVATIONS``, from the C core's header through the cffi module
ACTIVATION_NAMES = {v: k for k, v in ACTIVATIONS.items()}

#: which of (p0, p1) each activation uses
PARAMS_USED = {"leaky_relu": (True, False), "elu": (True, False), "selu": (True, True),
               "hard_sigmoid": (True, True)}

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


@dataclass
class Layer:
    """One dense layer ``a(x @ W + b)``; ``W`` is ``[rows, cols]`` (inputs x outputs)."""

    W: np.ndarray
    b: np.ndarray
    activation: str = "linear"
    p0: float = 0.0
    p1: float = 0.0

    def __post_init__(self):
        self.W = np.asarray(self.W, dtype=np.float32)
        self.b = np.asarray(self.b, dtype=np.float32).reshape(-1)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
        if self.W.ndim != 2 or self.b.shape != (self.W.shape[1],):
            raise ValueError(f"layer shapes: W must be [rows, cols] and b [cols], got {self.W.shape}, {self.b.shape}")

    @property
    def rows(self) -> int:
        return int(self.W.shape[0])

    @property
    def cols(self) -> int:
        return int(self.W.shape[1])


def write_nnp(layers, n_in: int | None = None) -> bytes:
    """Serialize layers to the weight-file format. ``n_in`` defaults to the first layer's rows."""
    layers = list(layers)
    if not layers:
        raise ValueError("a weight file needs at least one layer")
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} layers, got {len(layers)}")
    if n_in is None:
        n_in = layers[0].rows
    prev = n_in
    for k, L in enumerate(layers):
        if L.rows != prev:
            raise ValueError(f"layer {k}: {L.rows} inputs, but the previous layer has {prev} outputs")
        if not (1 <= L.rows <= MAX_DIM and 1 <= L.cols <= MAX_DIM):
            raise ValueError(f"layer {k}: dimensions must be in 1..{MAX_DIM}, got {L.W.shape}")
        if not (np.isfinite(L.W).all() and np.isfinite(L.b).all()):
            raise ValueError(f"layer {k}: weights and biases must be finite")
        prev = L.cols
    n_out = prev
    records = []
    params = []
    for k, L in enumerate(layers):
        used = PARAMS_USED.get(L.activation, (False, False))
        p0 = float(np.float32(L.p0)) if used[0] else 0.0
        p1 = float(np.float32(L.p1)) if used[1] else 0.0
        if not (np.isfinite(p0) and np.isfinite(p1)):
            raise ValueError(f"layer {k}: activation parameters must be finite")
        records.append(struct.pack("<IIIIff", L.rows, L.cols, ACTIVATIONS[L.activation], 0, p0, p1))
        params.append(np.ascontiguousarray(L.W, dtype="<f4").tobytes())
        params.append(np.ascontiguousarray(L.b, dtype="<f4").tobytes())
    body = b"".join(records) + b"".join(params)
    size = HEADER_BYTES + len(body) + 4
    header = MAGIC + struct.pack("<IIIIIQ", VERSION, n_in, n_out, len(layers), 0, size)
    data = header + body
    return data + struct.pack("<I", zlib.crc32(data) & 0xFFFFFFFF)


def read_nnp(data: bytes) -> list[Layer]:
    """Parse and fully validate a weight file; raise :class:`WeightFileError` when it is malformed.

    The checks and their order mirror the C parser, so a file the one rejects the other rejects too; the
    ``code`` attribute of the error is the C status code (``csrc/nnp.h``).
    """
    data = bytes(data)
    n = len(data)
    if n < 4:
        raise WeightFileError("weight file is truncated", -2)
    if data[:4] != MAGIC:
        raise WeightFileError("not a weight file (bad magic)", -3)
    if n < HEADER_BYTES:
        raise WeightFileError("weight file is truncated", -2)
    version, n_in, n_out, n_layers, flags, file_size = struct.unpack_from("<IIIIIQ", data, 4)
    if version != VERSION:
        raise WeightFileError(f"unsupported weight file version {version}", -4)
    if file_size > n:
        raise WeightFileError(f"weight file is truncated ({n} of {file_size} bytes)", -2)
    if file_size < n:
        raise WeightFileError(f"weight file size mismatch: header says {file_size} bytes, got {n}", -8)
    if flags != 0:
        raise WeightFileError("weight file flags must be 0", -5)
    for name, v, hi in (("n_in", n_in, MAX_DIM), ("n_out", n_out, MAX_DIM), ("n_layers", n_layers, MAX_LAYERS)):
        if not 1 <= v <= hi:
            raise WeightFileError(f"weight file {name} = {v} outside 1..{hi}", -6)
    body = HEADER_BYTES + RECORD_BYTES * n_layers
    if n < body + 4:
        raise WeightFileError("weight file too small for its layer records", -8)
    prev = n_in
    recs = []
    total_params = 0
    for k in range(n_layers):
        rows, cols, act, reserved, p0, p1 = struct.unpack_from("<IIIIff", data, HEADER_BYTES + RECORD_BYTES * k)
        raw0, raw1 = struct.unpack_from("<II", data, HEADER_BYTES + RECORD_BYTES * k + 16)
        if not (1 <= rows <= MAX_DIM and 1 <= cols <= MAX_DIM):
            raise WeightFileError(f"layer {k}: dimensions {rows}x{cols} outside 1..{MAX_DIM}", -6)
        if rows != prev:
            raise WeightFileError(f"layer {k}: {rows} inputs but {prev} outputs before it", -6)
        if k == n_layers - 1 and cols != n_out:
            raise WeightFileError(f"last layer has {cols} outputs, header says {n_out}", -6)
        if act not in ACTIVATION_NAMES:
            raise WeightFileError(f"layer {k}: unknown activation code {act}", -7)
        if reserved != 0:
            raise WeightFileError(f"layer {k}: reserved field must be 0", -5)
        if not (np.isfinite(p0) and np.isfinite(p1)):
            raise WeightFileError(f"layer {k}: non-finite activation parameter", -10)
        used = PARAMS_USED.get(ACTIVATION_NAMES[act], (False, False))
        if (not used[0] and raw0 & 0x7FFFFFFF) or (not used[1] and raw1 & 0x7FFFFFFF):
            raise WeightFileError(f"layer {k}: unused activation parameter must be 0", -5)
        recs.append((rows, cols, act, p0, p1))
        total_params += rows * cols + cols
        prev = cols
    if body + 4 * total_params + 4 != n:
        raise WeightFileError("weight file size does not match its layer dimensions", -8)
    (crc,) = struct.unpack_from("<I", data, n - 4)
    if zlib.crc32(data[: n - 4]) & 0xFFFFFFFF != crc:
        raise WeightFileError("weight file checksum (CRC-32) mismatch", -9)
    flat = np.frombuffer(data, dtype="<f4", count=total_params, offset=body)
    if not np.isfinite(flat).all():
        raise WeightFileError("weight file holds a NaN or infinite weight or bias", -10)
    layers = []
    off = 0
    for rows, cols, act, p0, p1 in recs:
        W = flat[off: off + rows * cols].reshape(rows, cols).astype(np.float32)
        off += rows * cols
        b = flat[off: off + cols].astype(np.float32)
        off += cols
        layers.append(Layer(W, b, ACTIVATION_NAMES[act], float(p0), float(p1)))
    return layers


def _erf_np(x):
    import math

    return np.vectorize(math.erf, otypes=[np.float64])(x)


def activation_ref(name: str, z, p0: float = 0.0, p1: float = 0.0) -> np.ndarray:
    """Reference activation in float64 numpy (no SciPy needed)."""
    return _activation_np(name, z, p0, p1, _erf_np)


def _activation_np(name, z, p0, p1, erf):
    z = np.asarray(z, dtype=np.float64)
    if name == "linear":
        return z.copy()
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, p0 * z)
    if name == "elu":
        return np.where(z > 0, z, p0 * np.expm1(np.minimum(z, 0)))
    if name == "selu":
        return p1 * np.where(z > 0, z, p0 * np.expm1(np.minimum(z, 0)))
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    if name == "hard_sigmoid":
        return np.clip(p0 * z + p1, 0.0, 1.0)
    if name == "softplus":
        return np.logaddexp(0.0, z)
    if name == "softsign":
        return z / (1.0 + np.abs(z))
    if name == "swish":
        return z * 0.5 * (1.0 + np.tanh(0.5 * z))
    if name == "gelu":
        return 0.5 * z * (1.0 + erf(z / np.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))
    if name == "relu6":
        return np.clip(z, 0.0, 6.0)
    if name == "exponential":
        return np.exp(z)
    raise ValueError(f"unknown activation {name!r}")


def forward_ref(layers, x) -> np.ndarray:
    """float64 forward pass of a list of layers (reference for tests)."""
    a = np.asarray(x, dtype=np.float64)
    for L in layers:
        a = activation_ref(L.activation, a @ L.W.astype(np.float64) + L.b.astype(np.float64), L.p0, L.p1)
    return a
