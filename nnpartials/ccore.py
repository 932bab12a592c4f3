"""The C core's constants, read from the cffi module (``lib.NNP_*``, declared from ``csrc/nnp.h``), and one-shot
calls into it for code that checks a weight file rather than serves it (export-time validation of ``model.nnp``:
:func:`jacobian`; :func:`hessian`, :func:`laplacian` and :func:`hvp` for second derivatives).

The constants have no other home in Python: the weight-file writer, :class:`nnpartials.runtime.kernel.Kernel` and
the tests take activation codes, modes, workspace kinds and status codes from here. Serving goes through ``Kernel``
(thread pool, per-thread workspaces, fast paths); this module has none of that and keeps no state.
"""

from __future__ import annotations

import numpy as np

from nnpartials.errors import NNPartialsError, WeightFileError


def _lib():
    try:
        from nnpartials._core import ffi, lib
    except ImportError as exc:
        raise NNPartialsError(f"the C core extension nnpartials._core is not built ({exc}); reinstall the package "
                              f"(pip install -e .) with a C compiler available") from None
    return ffi, lib


def _constants(prefix: str) -> dict:
    """``{name: value}`` of the ``lib.NNP_<prefix>_*`` constants, names lower-cased without the prefix."""
    _, lib = _lib()
    head = f"NNP_{prefix}_"
    return {k[len(head):].lower(): int(getattr(lib, k)) for k in dir(lib) if k.startswith(head)}


#: activation name -> code in model.nnp (``NNP_ACT_*``), e.g. ``{"linear": 0, "relu": 1, ...}``
ACTIVATIONS = {k: v for k, v in sorted(_constants("ACT").items(), key=lambda kv: kv[1]) if k != "count"}
#: Jacobian mode name -> code (``NNP_MODE_*``): ``auto``, ``forward``, ``reverse``
MODES = dict(sorted(_constants("MODE").items(), key=lambda kv: kv[1]))
#: workspace kind name -> code for ``nnp_workspace`` (``NNP_WS_*``): the first-order ones, and ``hessian``,
#: ``laplacian``, ``hvp`` (float32) and ``fd_hessian_f64`` (float64) for the second derivatives
WORKSPACES = dict(sorted(_constants("WS").items(), key=lambda kv: kv[1]))
#: status name -> code (``NNP_E_*``; 0 is ``NNP_OK``)
STATUS = dict(sorted(_constants("E").items(), key=lambda kv: -kv[1]))
#: Status codes that say a weight file is malformed (the file's fault, not the caller's).
FILE_ERRORS = frozenset(STATUS[k] for k in ("truncated", "bad_magic", "version", "bad_field", "bad_dim",
                                            "bad_activation", "size_mismatch", "checksum", "nonfinite", "too_large"))


def _status(lib, ffi, rc, what):
    if rc != 0:
        raise WeightFileError(f"{what}: {ffi.string(lib.nnp_strerror(rc)).decode()}", rc)


def _load(nnp_bytes: bytes, x):
    """(ffi, lib, storage, model, n_in, n_out, x as a C-contiguous float32 [batch, n_in] array); the storage must be
    kept alive as long as the model is used."""
    ffi, lib = _lib()
    data = bytes(nnp_bytes)
    need = ffi.new("size_t *")
    _status(lib, ffi, lib.nnp_model_bytes(data, len(data), need), "model.nnp")
    storage = ffi.new("char[]", max(1, need[0]))
    mp = ffi.new("nnp_model **")
    _status(lib, ffi, lib.nnp_load(data, len(data), storage, need[0], mp), "model.nnp")
    m = mp[0]
    n_in, n_out = int(lib.nnp_n_in(m)), int(lib.nnp_n_out(m))
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise NNPartialsError(f"model.nnp takes [batch, {n_in}] points, got shape {x.shape}")
    return ffi, lib, storage, m, n_in, n_out, x


def jacobian(nnp_bytes: bytes, x: np.ndarray, mode: int = 0):
    """``(y [batch, n_out], dy_dx [batch, n_out, n_in])`` in float32 from a weight file's bytes and float32 ``x``
    (``mode``: 0 auto, 1 forward, 2 reverse, as ``NNP_MODE_*``). Raises :class:`WeightFileError` when the C core
    refuses the file or the call."""
    ffi, lib, storage, m, n_in, n_out, x = _load(nnp_bytes, x)
    n = x.shape[0]
    y = np.empty((n, n_out), np.float32)
    dy = np.empty((n, n_out, n_in), np.float32)
    if n == 0:
        return y, dy
    wlen = ffi.new("size_t *")
    ws_op = {MODES["auto"]: WORKSPACES["jacobian"], MODES["forward"]: WORKSPACES["jacobian_forward"],
             MODES["reverse"]: WORKSPACES["jacobian_reverse"]}[mode]
    _status(lib, ffi, lib.nnp_workspace(m, ws_op, n, wlen), "workspace")
    work = np.empty(max(1, wlen[0]), np.float32)
    _status(lib, ffi, lib.nnp_jacobian(m, mode, n, ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y),
                                       ffi.from_buffer("float[]", dy), ffi.from_buffer("float[]", work), wlen[0]),
            "nnp_jacobian")
    return y, dy


def has_second_order() -> bool:
    """Whether the built C core has second derivatives (``nnp_hessian``, ``nnp_laplacian``, ``nnp_hvp``)."""
    _, lib = _lib()
    return all(hasattr(lib, f) for f in ("nnp_hessian", "nnp_laplacian", "nnp_hvp"))


def _second(nnp_bytes: bytes, x, what: str, shape, v=None):
    """One float32 second-derivative call (``what``: hessian, laplacian or hvp) on a whole batch; returns its
    second-derivative output of per-point ``shape`` (``shape(n_in, n_out)``)."""
    ffi, lib, storage, m, n_in, n_out, x = _load(nnp_bytes, x)
    n = x.shape[0]
    out = np.empty((n, *shape(n_in, n_out)), np.float32)
    if v is not None:
        v = np.ascontiguousarray(v, dtype=np.float32)
        if v.shape != x.shape:
            raise NNPartialsError(f"v must have the shape of x {x.shape}, got {v.shape}")
    if n == 0:
        return out
    wlen = ffi.new("size_t *")
    _status(lib, ffi, lib.nnp_workspace(m, WORKSPACES[what], n, wlen), "workspace")
    work = np.empty(max(1, wlen[0]), np.float32)
    fb = ffi.from_buffer
    if what == "hvp":
        rc = lib.nnp_hvp(m, n, fb("float[]", x), fb("float[]", v), ffi.NULL, fb("float[]", out), fb("float[]", work),
                         wlen[0])
    else:
        fn = lib.nnp_hessian if what == "hessian" else lib.nnp_laplacian
        rc = fn(m, n, fb("float[]", x), ffi.NULL, ffi.NULL, fb("float[]", out), fb("float[]", work), wlen[0])
    _status(lib, ffi, rc, f"nnp_{what}")
    return out


def hessian(nnp_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """``d2y_dx2 [batch, n_out, n_in, n_in]`` in float32 (``nnp_hessian``) from a weight file's bytes and float32
    ``x``. Raises :class:`WeightFileError` when the C core refuses the file or the call."""
    return _second(nnp_bytes, x, "hessian", lambda n_in, n_out: (n_out, n_in, n_in))


def laplacian(nnp_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """``lap [batch, n_out]`` in float32, the trace of each output's Hessian (``nnp_laplacian``)."""
    return _second(nnp_bytes, x, "laplacian", lambda n_in, n_out: (n_out,))


def hvp(nnp_bytes: bytes, x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``hvp [batch, n_out, n_in]`` in float32, each output's Hessian times ``v[b]`` (``nnp_hvp``; v: x's shape)."""
    return _second(nnp_bytes, x, "hvp", lambda n_in, n_out: (n_out, n_in), v)


__all__ = ["jacobian", "hessian", "laplacian", "hvp", "has_second_order", "ACTIVATIONS", "MODES", "WORKSPACES", "STATUS", "FILE_ERRORS"]
