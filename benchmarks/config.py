"""Settings of the benchmark suite, read from the environment once.

``NNP_BENCH_TINY=1``    tiny sizes (batches 1, 8, 32; ``cnn`` 1, 4, 8), one call per benchmark: the CI smoke run.
``NNP_BENCH_THREADS``   threads every library may use (default: all cores, ``os.cpu_count()``).
``NNP_BENCH_RECORD``    where the session writes its JSON record (the report reads it).
``NNP_BENCH_MAX_CALL_S`` skip a batch-100,000 case whose time per call, predicted from batch 1,000, exceeds this
                        (default 20 s), so that a full run stays bounded.
``NNP_BENCH_MAX_GB``    skip a case whose largest intermediate tensor (batch × directions × widest layer) would
                        exceed this many GiB (default 2).
``NNP_BENCH_PATHS``     comma-separated path names to run (default: all).
``NNP_BENCH_WORKLOADS`` comma-separated workload names to run (default: all).
"""

from __future__ import annotations

import os

TINY = os.environ.get("NNP_BENCH_TINY", "").strip().lower() not in ("", "0", "false", "no")

#: Batch sizes as (id, batch): the ids name the full-size batches in test ids and the report, so a tiny run has
#: the same test names. These are the dense workloads' batches; :func:`batches` gives any workload's.
BATCHES = ((1, 1), (1000, 8), (100000, 32)) if TINY else ((1, 1), (1000, 1000), (100000, 100000))
BATCH_IDS = tuple(b for b, _ in BATCHES)
LARGE = 100000
#: Workloads with their own batch sizes. ``cnn`` (784 inputs, 10 outputs, 5,408 values per point after the first
#: convolution): 1, 100 and 1,000. Batch 100,000 does not fit: its dy/dx alone is 100,000 × 10 × 784 float32 =
#: 3.1 GB (6.3 GB for the float64 reference), a reverse-mode pass carries 10 cotangents × 5,408 values = 216 KB per
#: point (22 GB), and one call would take tens of seconds per path. At 1,000, reverse mode needs 0.2 GB but
#: forward mode (784 tangents) 17 GB, so the forward-mode paths skip there (NNP_BENCH_MAX_GB); 100 is the largest
#: batch at which both modes fit (1.6 GiB), so that forward and reverse mode are compared on a batch, too.
WORKLOAD_BATCHES = {
    "cnn": ((1, 1), (100, 4), (1000, 8)) if TINY else ((1, 1), (100, 100), (1000, 1000)),
}


def batches(workload: str) -> tuple:
    """(id, batch) pairs of ``workload``."""
    return WORKLOAD_BATCHES.get(workload, BATCHES)


def batch_ids(workload: str) -> tuple:
    return tuple(b for b, _ in batches(workload))

THREADS = int(os.environ.get("NNP_BENCH_THREADS") or os.cpu_count() or 1)
MAX_CALL_S = float(os.environ.get("NNP_BENCH_MAX_CALL_S", "20"))
MAX_GB = float(os.environ.get("NNP_BENCH_MAX_GB", "2"))
RECORD = os.environ.get("NNP_BENCH_RECORD") or None
#: A record of an earlier pass whose medians predict batch-100,000 times when a pass re-runs only some cases.
PRIOR = os.environ.get("NNP_BENCH_PRIOR") or None


def _names(var):
    v = os.environ.get(var, "").strip()
    return tuple(s.strip() for s in v.split(",") if s.strip()) or None


ONLY_PATHS = _names("NNP_BENCH_PATHS")
ONLY_WORKLOADS = _names("NNP_BENCH_WORKLOADS")

# ----- timing policy ----------------------------------------------------------------------------------------
#: One round lasts at least this long (fast calls are repeated within a round; the round's mean is one sample).
MIN_ROUND_S = 0.005
#: Time spent on the timed rounds of one benchmark (batch 1 and 1,000 / batch 100,000).
TARGET_S_SMALL = 1.0
TARGET_S_LARGE = 3.0
MIN_ROUNDS_SMALL, MAX_ROUNDS_SMALL = 7, 300
MIN_ROUNDS_LARGE, MAX_ROUNDS_LARGE = 3, 15
#: A call at least this slow gets MIN_ROUNDS_LARGE rounds whatever the batch.
SLOW_CALL_S = 0.25

#: A case during whose timing other processes used more than this share of the machine is timed again (after a
#: wait for a quiet moment), up to MAX_ATTEMPTS times in all; the least disturbed attempt is kept.
DISTURBED = 0.2
MAX_ATTEMPTS = 3

#: Agreement before timing: |J - J_ref| <= AGREE * max(1, max|J_ref|), J_ref the float64 numpy reference.
AGREE = 1e-5
#: Rows compared at large batches (the first and the last this many).
CHECK_ROWS = 512


def configure_threads():
    """Environment settings that must precede the import of the numeric libraries.

    With fewer threads than CPUs, the process is also pinned to that many CPUs: XLA's CPU runtime does not obey
    its thread flags, and the affinity mask holds every library (and the C program) to the same count."""
    t = str(THREADS)
    if hasattr(os, "sched_setaffinity") and THREADS < len(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:THREADS]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, t)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --xla_cpu_multi_thread_eigen={'true' if THREADS > 1 else 'false'}"
                                   f" intra_op_parallelism_threads={THREADS}").strip()


def thread_settings() -> dict:
    """What each library was told (recorded in the report)."""
    return {
        "threads": THREADS,
        "tensorflow": f"intra_op={THREADS}, inter_op={THREADS}",
        "onnxruntime": f"intra_op_num_threads={THREADS}, sequential execution",
        "jax": os.environ.get("XLA_FLAGS", ""),
        "torch": f"set_num_threads({THREADS}), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "affinity": f"{len(os.sched_getaffinity(0))} CPUs" if hasattr(os, "sched_getaffinity") else "n/a",
        "c_core": f"Kernel(threads={THREADS}): a batch split across threads from about 1.7e7 counted FLOPs (512 points of the seed network's Jacobian, 64 of the physics network's); C alone: one thread",
    }
