"""nnpartials: fast, exact partial derivatives dy_i/dx_j of trained neural networks.

Public API::

    nnpartials.export(model_or_path, out_dir, ...)   # Keras -> bundle (model.onnx, model.jac.onnx, model.nnp, ...)
    nnpartials.Partials(bundle, providers=None)       # batched y and dy_dx with onnxruntime (or backend="c")
    nnpartials.Kernel(bundle_or_nnp)                  # the C core: forward, jacobian, fd_jacobian
    nnpartials.diagnose(...)                          # which partials the training data identify

Heavy dependencies (TensorFlow, onnxruntime, the C core) are imported lazily.
"""

from nnpartials.errors import (  # noqa: F401
    BundleError,
    ExportError,
    InputError,
    InputTypeError,
    NNPartialsError,
    NotLowerableError,
    UnsupportedOpError,
    ValidationError,
    WeightFileError,
)

__version__ = "0.1.0"

_LAZY = {
    "export": ("nnpartials.exporter.bundle", "export"),
    "load_bundle": ("nnpartials.bundle", "load_bundle"),
    "Partials": ("nnpartials.runtime.serve", "Partials"),
    "Kernel": ("nnpartials.runtime.kernel", "Kernel"),
    "diagnose": ("nnpartials.runtime.diagnostics", "diagnose"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'nnpartials' has no attribute {name!r}")


def __dir__():
    """The module's names including the lazy ones (export, Partials, Kernel, diagnose, ...), for dir() and
    tab completion."""
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(list(_LAZY) + ["NNPartialsError", "InputError", "InputTypeError", "BundleError", "ExportError",
                                "UnsupportedOpError", "ValidationError", "WeightFileError", "NotLowerableError"])
