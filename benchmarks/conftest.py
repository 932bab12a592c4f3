"""Session fixtures of the benchmark suite: workloads, bundles, inputs, references, the JSON record."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import config

config.configure_threads()  # before TensorFlow, JAX or PyTorch is imported


class SkipCase(Exception):
    """A case that cannot run here; the reason goes to the record and to pytest's skip."""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16",
                                                "avx512_vnni", "amx_tile") if x in have)
    except OSError:
        pass
    return ""


def _mem_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        return None


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("nnpartials", "numpy", "tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime",
                 "jax", "jaxlib", "jax2onnx", "torch", "pytest-benchmark", "scipy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    except Exception:  # pragma: no cover
        return None


def _dirty(paths):
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *paths], capture_output=True, text=True,
                             timeout=10, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
        return [line[3:] for line in out.splitlines() if line.strip()]
    except Exception:  # pragma: no cover
        return None


def machine_info() -> dict:
    from benchmarks import cbench

    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _mem_gib(),
        "platform": platform.platform(),
        "versions": _versions(),
        "c_compiler": cbench.compiler_version() if cbench.compiler() else None,
        "c_flags": cbench.cflags(),
        "thread_settings": config.thread_settings(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "uncommitted": _dirty(["csrc", "exporter", "runtime", "nnpartials"]),
        "tiny": config.TINY,
        "batches": {w: dict((str(k), v) for k, v in config.batches(w)) for w in _workload_names()},
        "argv": sys.argv,
        "report_command": os.environ.get("NNP_BENCH_COMMAND"),
    }


def _workload_names():
    from benchmarks.workloads import NAMES

    return NAMES


class BenchContext:
    def __init__(self, tmp_dir):
        self.tmp = tmp_dir
        self._workloads, self._bundles, self._inputs, self._refs = {}, {}, {}, {}
        self._c_exe = None
        self._peak_exe = None
        self.records = {}
        self.exports = {}
        self.workload_info = {}
        self.machine = machine_info()
        self._tf_configured = False
        from benchmarks.contention import QuietGate

        self.gate = QuietGate()

    # -- setup ---------------------------------------------------------------------------------------------
    def _configure_tf(self):
        if self._tf_configured:
            return
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(config.THREADS)
            tf.config.threading.set_inter_op_parallelism_threads(config.THREADS)
        except RuntimeError:  # already initialised (another import touched it): keep, but say so
            self.machine["thread_settings"]["tensorflow"] += " (not applied: TensorFlow was already initialised)"
        self._tf_configured = True

    def workload(self, name):
        if name not in self._workloads:
            self._configure_tf()
            from benchmarks import workloads

            w = self._workloads[name] = workloads.build(name)
            from benchmarks.paths import auto_mode

            self.workload_info[name] = {"title": w.title, "kind": w.kind, "architecture": w.describe(),
                                        "input_shape": list(w.input_shape), "n_in": w.n_in, "n_out": w.n_out,
                                        "auto_mode": auto_mode(w), "forward_flops_per_point": w.forward_flops}
        return self._workloads[name]

    def bundle(self, name, mode):
        key = (name, mode)
        if key not in self._bundles:
            import nnpartials

            w = self.workload(name)
            t0 = time.perf_counter()
            opts = w.export_options(mode)
            b = nnpartials.export(w.keras_model, os.path.join(self.tmp, f"{name}-{mode}"), mode=mode, overwrite=True,
                                  **opts)
            secs = time.perf_counter() - t0
            import onnx

            nodes = {f: len(onnx.load_model_from_string(b.read(f)).graph.node) for f in ("model.onnx", "model.jac.onnx")}
            c_core = b.manifest.get("c_core", {})
            self.exports[f"{name}/{mode}"] = {"seconds": secs, "nodes": nodes, "c_core": c_core.get("available"),
                                              "c_core_reason": c_core.get("reason"),
                                              "validation_points": b.manifest.get("validation", {}).get("points")}
            self._bundles[key] = b
        return self._bundles[key]

    def inputs(self, name, batch):
        key = (name, batch)
        if key not in self._inputs:
            self._inputs[key] = self.workload(name).inputs(batch)
        return self._inputs[key]

    def check_rows(self, batch):
        n = config.CHECK_ROWS
        if batch <= 2 * n:
            return np.arange(batch)
        return np.concatenate([np.arange(n), np.arange(batch - n, batch)])

    def reference(self, name, batch):
        key = (name, batch)
        if key not in self._refs:
            from benchmarks import workloads

            rows = self.check_rows(batch)
            self._refs[key] = workloads.reference(self.workload(name), self.inputs(name, batch)[rows])
        return self._refs[key]

    def c_program(self):
        if self._c_exe is None:
            from benchmarks import cbench

            d = os.path.join(self.tmp, "c")
            os.makedirs(d, exist_ok=True)
            self._c_exe = cbench.build(d)
        return self._c_exe

    def fma_peak(self):
        """The single-core float32 multiply-add peak of this machine (``csrc/bench/fma_peak.c``), measured once per
        session and kept in the record's ``machine["fma_peak"]``; ``{"unavailable": reason}`` when it cannot be built
        or run here (no C compiler), so that no case fails for it."""
        if "fma_peak" not in self.machine:
            from benchmarks import cbench

            reason = cbench.unavailable()
            self.machine["fma_peak"] = {"unavailable": reason} if reason else self._measure_peak()
        return self.machine["fma_peak"]

    def _measure_peak(self):
        """One measurement of the peak (the program built once per session), or ``{"unavailable": why}``."""
        from benchmarks import cbench

        try:
            if self._peak_exe is None:
                d = os.path.join(self.tmp, "c")
                os.makedirs(d, exist_ok=True)
                self._peak_exe = cbench.build_peak(d)
            if config.TINY:
                return cbench.measure_peak(self._peak_exe, min_sample_s=0.002, samples=3)
            self.gate.wait()
            return cbench.measure_peak(self._peak_exe)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
            return {"unavailable": f"{type(exc).__name__}: {exc}"[:500]}

    def peak_per_core(self):
        return self.fma_peak().get("peak_gflops")

    def fma_peak_again(self):
        """The peak measured once more at the end of the session (``machine["fma_peak_end"]``): a shared machine can
        slow down during a run (another tenant of the host, a lower clock), which the start value alone would hide.
        The fractions of peak keep the start value; the report shows both."""
        start = self.machine.get("fma_peak") or {}
        if start.get("peak_gflops") and "fma_peak_end" not in self.machine:
            self.machine["fma_peak_end"] = self._measure_peak()

    def suite_nnp(self, w):
        """A C weight file of workload ``w`` written with ``nnpartials.exporter.nnp`` (cached)."""
        path = os.path.join(self.tmp, f"{w.name}.suite.nnp")
        if not os.path.exists(path):
            from nnpartials.exporter.nnp import write_nnp

            from benchmarks import workloads

            with open(path, "wb") as f:
                f.write(write_nnp(workloads.nnp_layers(w), n_in=w.n_in))
        return path

    @staticmethod
    def skip(reason):
        raise SkipCase(reason)

    # -- record --------------------------------------------------------------------------------------------
    def median(self, workload, batch_id, path):
        """Median of a case of this session, else of the prior record (``NNP_BENCH_PRIOR``), else None."""
        key = f"{workload}/{batch_id}/{path}"
        for r in (self.records.get(key), self._prior().get(key)):
            if r and r.get("status") == "ok" and r.get("median_s") is not None:
                return r["median_s"]
        return None

    def _prior(self):
        if not hasattr(self, "_prior_records"):
            self._prior_records = {}
            if config.PRIOR and os.path.exists(config.PRIOR):
                with open(config.PRIOR) as f:
                    for r in json.load(f).get("results", []):
                        self._prior_records[f"{r['workload']}/{r['batch']}/{r['path']}"] = r
        return self._prior_records

    def add_not_applicable(self):
        """Record the cases not collected because their path does not apply to the workload (``Path.applies``), for
        every workload this session ran: status "n/a" with the reason (not a skip)."""
        from benchmarks.paths import PATHS

        for name in sorted({r["workload"] for r in self.records.values() if r.get("status") != "n/a"}):
            for batch_id, batch in config.batches(name):
                for p in PATHS:
                    reason = p.applies(name)
                    key = f"{name}/{batch_id}/{p.name}"
                    if not reason or key in self.records or (config.ONLY_PATHS and p.name not in config.ONLY_PATHS):
                        continue
                    self.records[key] = {"workload": name, "batch": batch_id, "batch_run": batch, "path": p.name,
                                         "label": p.label, "family": p.family, "computes": p.computes,
                                         "dtype": p.dtype, "status": "n/a", "reason": reason}

    def dump(self, path):
        self.add_not_applicable()
        self.machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        self.machine["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        data = {"machine": self.machine, "workloads": self.workload_info, "exports": self.exports, "results": list(self.records.values()),
                "config": {"min_round_s": config.MIN_ROUND_S, "target_s_small": config.TARGET_S_SMALL,
                           "target_s_large": config.TARGET_S_LARGE, "min_rounds_small": config.MIN_ROUNDS_SMALL,
                           "min_rounds_large": config.MIN_ROUNDS_LARGE, "max_call_s": config.MAX_CALL_S,
                           "max_gb": config.MAX_GB, "agree": config.AGREE, "check_rows": config.CHECK_ROWS,
                           "disturbed": config.DISTURBED, "max_attempts": config.MAX_ATTEMPTS,
                           "quiet_threshold": self.gate.threshold, "quiet_per_case_s": self.gate.per_case_s,
                           "quiet_budget_s": self.gate.budget_s, "quiet_spent_s": self.gate.spent}}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")


_CTX = None


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    global _CTX
    _CTX = BenchContext(str(tmp_path_factory.mktemp("nnp-bench")))
    _CTX.fma_peak()  # the machine's multiply-add peak, in the same run as the timings
    return _CTX


def pytest_sessionfinish(session, exitstatus):
    if _CTX is not None and config.RECORD:
        _CTX.fma_peak_again()
        _CTX.dump(config.RECORD)
