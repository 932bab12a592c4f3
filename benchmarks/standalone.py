"""What the standalone benchmark scripts (``python -m benchmarks.mixed_load``, ``python -m benchmarks.scale``) share:
the workloads' bundles and Parquet inputs, cached in a folder outside the repository, and the machine's description
and load.

Cache folder: ``$NNP_BENCH_CACHE``, else ``<temp dir>/nnpartials-bench-cache``. A bundle is exported from the
suite's own workload (``benchmarks/workloads.py``: the same Keras model, weights and export options as the pytest
suite uses) in the mode ``export(mode="auto")`` picks, and kept under a name that includes a digest of the files it
is made from (``workloads.py``, ``exporter/``, ``nnpartials/bundle.py``), so a change to any of them exports it
again. TensorFlow is imported only when a bundle has to be exported.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def cache_dir() -> str:
    d = os.environ.get("NNP_BENCH_CACHE") or os.path.join(tempfile.gettempdir(), "nnpartials-bench-cache")
    os.makedirs(d, exist_ok=True)
    return d


def _source_digest() -> str:
    files = [os.path.join(HERE, "workloads.py"), os.path.join(ROOT, "nnpartials", "bundle.py")]
    exp = os.path.join(ROOT, "exporter")
    files += sorted(os.path.join(exp, f) for f in os.listdir(exp) if f.endswith(".py"))
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(os.path.relpath(f, ROOT).encode() + b"\0" + fh.read())
    return h.hexdigest()[:12]


def auto_mode(name: str) -> str:
    """The mode ``export(mode="auto")`` picks for workload ``name`` (without building it)."""
    from nnpartials.exporter.jacobian import choose_mode

    from benchmarks.workloads import SPECS

    spec = SPECS[name]
    return choose_mode(spec["n_in"], spec["n_out"], "auto")


def bundle(name: str, log=print) -> str:
    """The path of workload ``name``'s bundle (auto mode), exported into the cache on first use."""
    mode = auto_mode(name)
    path = os.path.join(cache_dir(), f"bundle-{name}-{mode}-{_source_digest()}")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    log(f"exporting the {name} bundle ({mode} mode) into {path} ...")
    from benchmarks import config

    config.configure_threads()  # before TensorFlow is imported
    from nnpartials.cli import _native_stderr_filtered, _quiet_tensorflow

    _quiet_tensorflow()  # TensorFlow's start-up lines, as the command line keeps them off stderr
    with _native_stderr_filtered():
        import tensorflow  # noqa: F401  (imported here, its start-up lines filtered)
    import nnpartials
    from benchmarks import workloads

    w = workloads.build(name)
    tmp = tempfile.mkdtemp(prefix=f".bundle-{name}-", dir=cache_dir())
    try:
        nnpartials.export(w.keras_model, os.path.join(tmp, "b"), mode=mode, overwrite=True, **w.export_options(mode))
        os.rename(os.path.join(tmp, "b"), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in os.listdir(cache_dir()):  # the same workload exported from older sources
        if old.startswith(f"bundle-{name}-{mode}-") and old != os.path.basename(path):
            shutil.rmtree(os.path.join(cache_dir(), old), ignore_errors=True)
    return path


def inputs(name: str, n: int, seed: int = 1234) -> np.ndarray:
    """``n`` points of workload ``name`` (float32 ``[n, n_in]``), drawn as the suite draws them
    (``Workload.inputs``), without building the Keras model."""
    from benchmarks.workloads import SPECS

    spec = SPECS[name]
    rng = np.random.default_rng(seed + n)
    x = rng.normal(size=(n, spec["n_in"])) * np.asarray(spec["std"]) + np.asarray(spec["mean"])
    return np.ascontiguousarray(x, dtype=np.float32)


def parquet_points(name: str, columns, n: int, row_group: int, seed: int = 7) -> str:
    """A Parquet file of ``n`` points of workload ``name`` (float64 columns named as the model's inputs, drawn from
    its input distribution), written once in row groups of ``row_group`` rows and kept in the cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.workloads import SPECS

    spec = SPECS[name]
    path = os.path.join(cache_dir(), f"points-{name}-{n}-rg{row_group}-s{seed}.parquet")
    if os.path.isfile(path):
        return path
    mean, std = np.asarray(spec["mean"], np.float64), np.asarray(spec["std"], np.float64)
    schema = pa.schema([pa.field(c, pa.float64()) for c in columns])
    fd, tmp = tempfile.mkstemp(prefix=".points-", suffix=".parquet", dir=cache_dir())
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for k, s in enumerate(range(0, n, row_group)):
                m = min(row_group, n - s)
                x = np.random.default_rng([seed, k]).normal(size=(m, len(columns))) * std + mean
                writer.write_table(pa.table({c: x[:, j] for j, c in enumerate(columns)}, schema=schema),
                                   row_group_size=row_group)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# ---- the machine -------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("nnpartials", "numpy", "onnxruntime", "pyarrow", "pandas", "dask", "distributed"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=ROOT).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "nnpartials", "runtime", "exporter", "csrc"],
                               capture_output=True, text=True, timeout=10, cwd=ROOT).stdout
        dirty = [line[3:] for line in dirty.splitlines() if line.strip()]
    except Exception:  # noqa: BLE001 - not a git checkout
        commit, dirty = None, None
    return {
        "cpu": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem,
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "uncommitted": dirty,
        "argv": [os.path.basename(sys.executable)] + sys.argv,
        "started": now(),
        "loadavg_start": loadavg(),
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def machine_lines(m: dict, others=None) -> list:
    """Markdown lines describing the machine and how loaded it was (``others``: the others' CPU shares measured)."""
    la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
    v = m.get("versions", {})
    lines = [f"- Machine: {m.get('cpu')}, {m.get('nproc')} CPUs usable (nproc; {m.get('logical_cpus')} logical), "
             f"{m.get('memory_gib')} GiB memory; {m.get('platform')}",
             "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- Run: {m.get('started')} → {m.get('finished')} (UTC), commit `{m.get('git_commit')}`"
             + (f" with uncommitted changes to {', '.join(m['uncommitted'])}" if m.get("uncommitted") else "")]
    if la0 and la1:
        lines.append(f"- Load average (1, 5, 15 min) at the start {la0[0]:.2f}, {la0[1]:.2f}, {la0[2]:.2f}; at the end "
                     f"{la1[0]:.2f}, {la1[1]:.2f}, {la1[2]:.2f} (on {m.get('nproc')} CPUs)")
    vals = [o for o in (others or []) if o is not None]
    if vals:
        lines.append(f"- Other processes' share of the machine while the cases ran (`benchmarks/contention.py`): "
                     f"median {100 * sorted(vals)[len(vals) // 2]:.0f}%, max {100 * max(vals):.0f}% "
                     f"(0% = the benchmark had the machine to itself)")
    return lines
