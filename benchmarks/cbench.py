"""Build and run ``csrc/bench/nnp_bench.c``: the C core timed from C alone, without Python.

The program is compiled with the C library's units (``csrc/nnp*.c``, the files of ``SOURCES`` in ``csrc/build_ffi.py``)
and its own optimisation flags (``csrc/Makefile`` and the cffi build: ``-O3 -ffp-contract=fast -fno-trapping-math``,
no ``-march``), so it measures what a user linking the library gets by default.
``NNP_BENCH_CFLAGS`` replaces those flags (e.g. ``-O3 -march=native``).

It also builds and runs ``csrc/bench/fma_peak.c`` (:func:`build_peak`, :func:`measure_peak`): the single-core float32
multiply-add peak of the same machine, measured in the same run, so that every GFLOP/s can be read as a fraction of
what one core (or the cores a path uses) can deliver.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CSRC = os.path.join(ROOT, "csrc")
SOURCE = os.path.join(CSRC, "bench", "nnp_bench.c")
PEAK_SOURCE = os.path.join(CSRC, "bench", "fma_peak.c")
# the C core's units, as csrc/build_ffi.py and csrc/Makefile list them (tests/test_c_build.py checks that they agree)
LIBRARY_SOURCES = ("nnp.c", "nnp_format.c", "nnp_batch.c", "nnp_point.c", "nnp_fd.c", "nnp_second.c")
DEFAULT_CFLAGS = "-std=c99 -O3 -ffp-contract=fast -fno-trapping-math"


def cflags() -> str:
    return os.environ.get("NNP_BENCH_CFLAGS") or DEFAULT_CFLAGS


def compiler():
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def unavailable():
    """None when the C-alone benchmark can be built here, else why not."""
    if compiler() is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    for f in ("nnp.h", *LIBRARY_SOURCES):
        if not os.path.exists(os.path.join(CSRC, f)):
            return f"csrc/{f} is missing"
    return None


def compiler_version() -> str:
    try:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0].strip()
    except Exception:  # pragma: no cover
        return "unknown"


def build(out_dir: str) -> str:
    """Compile the program into ``out_dir``; returns the executable's path."""
    exe = os.path.join(out_dir, "nnp_bench")
    cmd = [compiler(), *shlex.split(cflags()), "-I", CSRC, SOURCE, *(os.path.join(CSRC, f) for f in LIBRARY_SOURCES),
           "-lm", "-o", exe]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"building the C benchmark failed: {' '.join(cmd)}\n{res.stderr}")
    return exe


def build_peak(out_dir: str) -> str:
    """Compile the peak-FMA microbenchmark (``csrc/bench/fma_peak.c``, no library units) into ``out_dir``."""
    exe = os.path.join(out_dir, "fma_peak")
    cmd = [compiler(), *shlex.split(cflags()), PEAK_SOURCE, "-o", exe]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"building the FMA peak benchmark failed: {' '.join(cmd)}\n{res.stderr}")
    return exe


def measure_peak(exe: str, *, min_sample_s: float = 0.05, samples: int = 7) -> dict:
    """Run the peak-FMA program: ``{"peak_gflops": single-core GFLOP/s of the fastest instruction set, "isa": that
    instruction set, "isas": [one dict per instruction set measured: isa, lanes, chains, gflops (median sample),
    max_gflops (fastest sample)]}``."""
    cmd = [exe, repr(float(min_sample_s)), str(int(samples))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    summary = lines[-1]
    return {"peak_gflops": float(summary["peak_gflops"]), "isa": summary["isa"], "isas": lines[:-1],
            "min_sample_s": min_sample_s, "samples": samples}


def peak_fraction(gflops, peak_per_core, cores):
    """GFLOP/s as a fraction of the measured peak of the ``cores`` a path may use (None when either is unknown)."""
    if gflops is None or not peak_per_core or not cores:
        return None
    return gflops / (peak_per_core * cores)


class Program:
    """The C program bound to one model file: ``run(x)`` times nnp_jacobian on ``x`` and returns its outputs."""

    def __init__(self, exe: str, nnp_path: str, workload, op: str = "jacobian"):
        self.exe = exe
        self.nnp = nnp_path
        self.w = workload
        self.op = op  # nnp_bench's OP: "jacobian" (nnp_jacobian, auto mode) or "forward" (nnp_forward, y only)

    def run(self, x: np.ndarray, *, min_sample_s: float = 0.05, samples: int = 15, op: str | None = None):
        """Returns ``(stats dict, y, dy_dx)`` (dy_dx None for the forward op); stats has ``median_ns`` and
        ``min_ns`` per call."""
        op = op or self.op
        x = np.ascontiguousarray(x, dtype="<f4")
        b = x.shape[0]
        with tempfile.TemporaryDirectory(prefix="nnp-bench-") as tmp:
            xp, op_path = os.path.join(tmp, "x.f32"), os.path.join(tmp, "out.f32")
            x.tofile(xp)
            cmd = [self.exe, self.nnp, xp, str(b), op, repr(float(min_sample_s)), str(int(samples)), op_path]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
            stats = json.loads(res.stdout.strip().splitlines()[-1])
            out = np.fromfile(op_path, dtype="<f4")
        ny = b * self.w.n_out
        y = out[:ny].reshape(b, self.w.n_out)
        J = out[ny:].reshape(b, self.w.n_out, self.w.n_in) if op.startswith("jacobian") else None
        return stats, y, J
