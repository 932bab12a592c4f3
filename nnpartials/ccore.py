"""One-shot calls into the C core (``nnpartials._core``), for code that checks a weight file rather than serves it:
export-time validation of ``model.nnp`` and the tests. Serving goes through :class:`nnpartials.runtime.Kernel`
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


def _status(lib, ffi, rc, what):
    if rc != 0:
        raise WeightFileError(f"{what}: {ffi.string(lib.nnp_strerror(rc)).decode()}", rc)


def jacobian(nnp_bytes: bytes, x: np.ndarray, mode: int = 0):
    """``(y [batch, n_out], dy_dx [batch, n_out, n_in])`` in float32 from a weight file's bytes and float32 ``x``
    (``mode``: 0 auto, 1 forward, 2 reverse, as ``NNP_MODE_*``). Raises :class:`WeightFileError` when the C core
    refuses the file or the call."""
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
    n = x.shape[0]
    y = np.empty((n, n_out), np.float32)
    dy = np.empty((n, n_out, n_in), np.float32)
    if n == 0:
        return y, dy
    wlen = ffi.new("size_t *")
    ws_op = {0: lib.NNP_WS_JACOBIAN, 1: lib.NNP_WS_JACOBIAN_FORWARD, 2: lib.NNP_WS_JACOBIAN_REVERSE}[mode]
    _status(lib, ffi, lib.nnp_workspace(m, ws_op, n, wlen), "workspace")
    work = np.empty(max(1, wlen[0]), np.float32)
    _status(lib, ffi, lib.nnp_jacobian(m, mode, n, ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y),
                                       ffi.from_buffer("float[]", dy), ffi.from_buffer("float[]", work), wlen[0]),
            "nnp_jacobian")
    return y, dy


__all__ = ["jacobian"]
