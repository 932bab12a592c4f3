"""The ``nnpartials`` command line. Each subcommand lives in ``nnpartials/commands/<name>.py`` and exposes
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import tempfile
import warnings

from nnpartials.errors import NNPartialsError

# Order is the order shown by --help.
COMMANDS = ("demo", "export", "partials", "check", "diagnose", "verify")


def _load(name):
    return importlib.import_module(f"nnpartials.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnpartials",
        description="Partial derivatives dy_i/dx_j of trained neural networks: export a Keras model to an ONNX "
                    "bundle with a companion Jacobian graph, serve batched partials, cross-check them with the "
                    "C core, and diagnose which partials the training data can identify.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = _load(name)
        except ModuleNotFoundError as exc:  # a subcommand whose module is absent from this install
            if exc.name != f"nnpartials.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from nnpartials import __version__

    return __version__


# ---- argument types shared by the subcommands --------------------------------------------------------------------

def positive_int(text: str) -> int:
    """argparse ``type`` of a count option: an integer >= 1, else a usage error at parsing time."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1 or more), got {value}")
    return value


def deprecated_alias(new_option: str):
    """An argparse ``action`` for an old spelling of ``new_option`` (hide it with ``help=argparse.SUPPRESS``):
    stores like ``new_option`` and prints a one-line note to stderr."""

    class _DeprecatedAlias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog}: note: {option_string} is deprecated, use {new_option}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return _DeprecatedAlias


# ---- quiet start-up ---------------------------------------------------------------------------------------------

# Subcommands that import TensorFlow: it is imported up front, with its native start-up chatter filtered.
_TENSORFLOW_COMMANDS = ("demo", "export")

# Lines TensorFlow's native libraries write to fd 2 while loading, whatever TF_CPP_MIN_LOG_LEVEL says: absl's
# pre-initialisation notice, INFO/WARNING lines (oneDNN, CPU instructions), CUDA/TensorRT probing on CPU machines.
_NATIVE_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "                           # absl: I0000 00:00:17...  6819 port.cc:153]
    r"|\d{4}-\d\d-\d\d [\d:.]+: [IW] \S+:\d+\] "                    # older TF: 2024-01-01 12:00:00.123: I x.cc:1]
    r"|.*(Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered"
    r"|failed call to cuInit|Could not find cuda drivers|TF-TRT Warning: Could not find TensorRT"
    r"|rebuild TensorFlow with the appropriate compiler flags"
    r"|This TensorFlow binary is optimized to use available CPU instructions)")


def _quiet_tensorflow():
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    for name in ("tensorflow", "tf2onnx", "absl", "keras"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category,
                                module=r"(tensorflow|tf2onnx|keras|tf_keras|absl|google\.protobuf|flatbuffers)")


@contextlib.contextmanager
def _native_stderr_filtered():
    """Send file descriptor 2 to a temporary file for the block, then pass on every line but known start-up
    noise (_NATIVE_NOISE): errors stay visible. Does nothing when the user asked for TensorFlow's logs
    (TF_CPP_MIN_LOG_LEVEL 0 or 1)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3").strip() in ("0", "1"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            keep = [line for line in text.splitlines(keepends=True) if not _NATIVE_NOISE.match(line)]
            if keep:
                sys.stderr.write("".join(keep))
                sys.stderr.flush()


def _preload_tensorflow():
    if "tensorflow" in sys.modules:
        return
    with _native_stderr_filtered():
        try:
            import tensorflow  # noqa: F401
        except Exception:  # noqa: BLE001 - missing or broken: the command reports it when it imports TensorFlow
            pass


def main(argv=None) -> int:
    _quiet_tensorflow()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        if args.command in _TENSORFLOW_COMMANDS:
            _preload_tensorflow()
        return int(args._run(args) or 0)
    except NNPartialsError as exc:
        print(f"nnpartials {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
