"""Exception types. Every error nnpartials raises on purpose derives from :class:`NNPartialsError`."""


class NNPartialsError(Exception):
    """Base class of all nnpartials errors."""


class InputError(NNPartialsError, ValueError):
    """An input array has the wrong rank, width, values (NaN/Inf) or is otherwise unusable."""


class InputTypeError(NNPartialsError, TypeError):
    """An input has a type or dtype that cannot be converted to a numeric array."""


class BundleError(NNPartialsError, ValueError):
    """A bundle is missing a file, has a changed file (hash mismatch), or holds an unusable graph."""


class ExportError(NNPartialsError, ValueError):
    """A model cannot be exported (unsupported op, wrong inputs, validation failure)."""


class UnsupportedOpError(ExportError):
    """The forward graph holds an op that has no derivative rule, or one its rule cannot differentiate here."""

    def __init__(self, op_type: str, node_name: str, detail: str = "", *, has_rule: bool = False):
        self.op_type = op_type
        self.node_name = node_name
        if has_rule:
            msg = f"ONNX op {op_type!r} (node {node_name!r}) cannot be differentiated here"
        else:
            msg = f"no derivative rule for ONNX op {op_type!r} (node {node_name!r})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class ValidationError(ExportError):
    """The exported Jacobian disagrees with TensorFlow's GradientTape beyond tolerance."""


class WeightFileError(NNPartialsError, ValueError):
    """A C weight file (model.nnp) was rejected by the C core's parser."""

    def __init__(self, message: str, code: int = 0):
        self.code = code
        super().__init__(message)


class NotLowerableError(NNPartialsError, ValueError):
    """The forward graph is outside the subset the C core evaluates (dense layers + activations)."""


class InternalError(NNPartialsError, RuntimeError):
    """nnpartials called its own C core wrongly (a bad argument, a workspace too small): a bug to report."""


class OrderNotAvailableError(NNPartialsError, NotImplementedError):
    """A derivative order that nnpartials does not compute yet (second derivatives)."""
