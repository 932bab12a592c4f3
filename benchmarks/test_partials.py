"""y and dy/dx per workload, batch size and path (see benchmarks/README.md).

One parametrized benchmark per (workload, batch, path), ordered workload → batch → path so that the paths
compared with each other run next to each other in time. Each case:

1. builds its runner (session, tf.function, jit, kernel: *setup*) and its input, outside the timed region;
2. makes the first call, timed separately (*first call*: tracing, compilation, allocation);
3. checks y and dy/dx against the float64 numpy reference before any timing (the case fails otherwise);
4. warms up, calibrates iterations per round, and times ``rounds × iterations`` calls with pytest-benchmark;
   time per call = the median over rounds.

With ``--benchmark-disable`` steps 1–3 run and the timed call runs once.

Each workload has its own batch sizes (``config.batches``). A path that does not apply to a workload
(``Path.applies``: the C core on the convolutional workload) has no case; the record lists it as "n/a".
"""

from __future__ import annotations

import importlib
import math
import os
import time

import numpy as np
import pytest

from benchmarks import config
from benchmarks.contention import Meter
from benchmarks.conftest import SkipCase
from benchmarks.paths import BY_NAME, PATHS
from benchmarks.workloads import NAMES


def _cases():
    out = []
    for w in NAMES:
        if config.ONLY_WORKLOADS and w not in config.ONLY_WORKLOADS:
            continue
        for b in config.batch_ids(w):
            for p in PATHS:
                if config.ONLY_PATHS and p.name not in config.ONLY_PATHS:
                    continue
                if p.applies(w):  # not applicable: recorded as "n/a" by the session (conftest), not collected
                    continue
                # a self-timed path (the C program) leaves pytest-benchmark's fixture unused, by design
                marks = [pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")] if p.self_timed else []
                out.append(pytest.param(w, b, p.name, id=f"{w}-b{b}-{p.name}", marks=marks))
    return out


def _scaled(a, ref):
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        raise AssertionError(f"shape {a.shape}, expected {ref.shape}")
    diff = np.abs(a - ref)
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    return diff, scale


def check_agreement(bench, w, batch, got):
    """Compare (y, J[, fd_err]) on the checked rows with the float64 reference; returns the worst scaled error."""
    rows = bench.check_rows(batch)
    y_ref, j_ref = bench.reference(w.name, batch)
    y, j = got[0], got[1]
    fd_err = got[2] if len(got) > 2 else None
    worst = 0.0
    problems = []
    if y is not None:
        d, s = _scaled(np.asarray(y)[rows], y_ref)
        worst = max(worst, float(d.max()) / s)
        if d.max() > config.AGREE * s:
            problems.append(f"y: max |y - y_ref| = {d.max():.3g} > {config.AGREE:g} × {s:.3g}")
    if j is not None:
        d, s = _scaled(np.asarray(j)[rows], j_ref)
        worst = max(worst, float(d.max()) / s)
        allowed = config.AGREE * s
        if fd_err is not None:
            # finite differences: within tolerance, or within the path's own error estimate (kinks)
            allowed = allowed + 10.0 * np.asarray(fd_err, np.float64)[rows]
        bad = d > allowed
        if np.any(bad):
            problems.append(f"dy_dx: {int(bad.sum())} entries off; max |J - J_ref| = {d.max():.3g}, "
                            f"tolerance {config.AGREE:g} × {s:.3g}")
    if problems:
        raise AssertionError(f"{w.name}, batch {batch}: disagrees with the float64 reference: " + "; ".join(problems))
    return worst


def _timed(fn, x):
    t0 = time.perf_counter()
    out = fn(x)
    return time.perf_counter() - t0, out


@pytest.mark.parametrize("workload,batch_id,path", _cases())
def test_partials(benchmark, bench, workload, batch_id, path):
    p = BY_NAME[path]
    batch = dict(config.batches(workload))[batch_id]
    rec = {"workload": workload, "batch": batch_id, "batch_run": batch, "path": path, "label": p.label,
           "family": p.family, "computes": p.computes, "dtype": p.dtype, "status": "failed", "reason": None}
    bench.records[f"{workload}/{batch_id}/{path}"] = rec
    benchmark.group = f"{workload} batch {batch_id}"
    try:
        reason = p.available()
        if reason:
            raise SkipCase(reason)
        w = bench.workload(workload)
        k = p.directions(w)
        rec["directions"] = k
        rec["flops_per_call"] = p.flops_per_point(w) * batch
        if not p.blocked:
            itemsize = 8 if p.dtype == "float64" else 4
            gib = itemsize * batch * max(1, k) * w.max_width / 2 ** 30
            if gib > config.MAX_GB:
                raise SkipCase(f"its largest intermediate (batch {batch:,} × {max(1, k)} directions × width "
                               f"{w.max_width}) needs {gib:.1f} GiB > NNP_BENCH_MAX_GB={config.MAX_GB:g}")
        if batch_id == config.LARGE and not config.TINY:
            mid = bench.median(workload, 1000, path)
            if mid is not None and mid * batch / 1000 > config.MAX_CALL_S:
                raise SkipCase(f"predicted {mid * batch / 1000:.0f} s per call (batch 1,000 × 100) exceeds "
                               f"NNP_BENCH_MAX_CALL_S={config.MAX_CALL_S:g}")
        x = bench.inputs(workload, batch)
        bench.reference(workload, batch)
        if p.family != "peer":  # exports are an offline step, reported separately
            bench.bundle(workload, "forward")
            bench.bundle(workload, "reverse")
        for mod in p.preload:
            importlib.import_module(mod)
        t0 = time.perf_counter()
        runner = p.make(bench, w)
        rec["setup_s"] = time.perf_counter() - t0
        rec["note"] = getattr(runner, "note", None)
        if p.self_timed:
            _run_self_timed(benchmark, bench, rec, runner, w, x, batch)
        else:
            _run_timed(benchmark, bench, rec, runner, w, x, batch, batch_id)
        rec["status"] = "ok"
        _add_peak_fraction(bench, rec, p)
        rec["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    except SkipCase as exc:
        rec["status"], rec["reason"] = "skipped", str(exc)
        pytest.skip(str(exc))
    except BaseException as exc:
        rec["reason"] = f"{type(exc).__name__}: {exc}"[:500]
        raise


def _add_peak_fraction(bench, rec, p):
    """GFLOP/s of a timed case and its fraction of the machine's measured multiply-add peak (cbench.measure_peak,
    single core, times the cores the path may use)."""
    from benchmarks import cbench

    t = rec.get("median_s")
    if not t or not rec.get("flops_per_call"):
        return
    rec["gflops"] = rec["flops_per_call"] / t / 1e9
    rec["peak_cores"] = p.cores()
    rec["peak_fraction"] = cbench.peak_fraction(rec["gflops"], bench.peak_per_core(), p.cores())


def _run_timed(benchmark, bench, rec, runner, w, x, batch, batch_id):
    xin = runner.prepare(x)
    rec["first_call_s"], out = _timed(runner.call, xin)
    rec["max_err"] = check_agreement(bench, w, batch, runner.to_numpy(out))
    del out
    if not benchmark.enabled:
        benchmark.pedantic(runner.call, args=(xin,))
        return
    large = batch_id == config.LARGE
    rec["quiet_wait_s"] = bench.gate.wait()
    # warm-up, then a rough time per call for calibration
    t, _ = _timed(runner.call, xin)
    for _ in range(0 if large else 3):
        if t > 0.05:
            break
        t = min(t, _timed(runner.call, xin)[0])
    t = max(t, 1e-7)
    iterations = 1 if t >= config.MIN_ROUND_S else int(math.ceil(config.MIN_ROUND_S / t))
    target = config.TARGET_S_LARGE if large else config.TARGET_S_SMALL
    lo, hi = ((config.MIN_ROUNDS_LARGE, config.MAX_ROUNDS_LARGE) if large
              else (config.MIN_ROUNDS_SMALL, config.MAX_ROUNDS_SMALL))
    if t >= config.SLOW_CALL_S:  # a slow call at a small batch (finite differences): fewer rounds suffice
        lo = min(lo, config.MIN_ROUNDS_LARGE)
    rounds = int(min(hi, max(lo, round(target / (t * iterations)))))
    with Meter() as m:
        benchmark.pedantic(runner.call, args=(xin,), rounds=rounds, iterations=iterations)
    st = benchmark.stats.stats
    best = dict(median_s=st.median, min_s=st.min, max_s=st.max, iqr_s=st.iqr, mean_s=st.mean, rounds=st.rounds,
                iterations=iterations, others_cpu=m.others, timer="pytest-benchmark (perf_counter)")
    attempts = [m.others]
    while _disturbed(best["others_cpu"]) and len(attempts) < config.MAX_ATTEMPTS:
        # other processes took a large share of the machine: wait for a quiet moment and time again, the same way
        bench.gate.wait()
        with Meter() as m:
            samples = _time_rounds(runner.call, xin, rounds, iterations)
        attempts.append(m.others)
        if m.others is not None and m.others < best["others_cpu"]:
            best = dict(_stats(samples), rounds=rounds, iterations=iterations, others_cpu=m.others,
                        timer="perf_counter rounds (repeated: an earlier attempt was disturbed)")
    rec.update(best)
    rec["others_cpu_attempts"] = attempts
    benchmark.extra_info.update({k: rec.get(k) for k in ("setup_s", "first_call_s", "max_err", "flops_per_call",
                                                         "others_cpu", "median_s")})


def _disturbed(others):
    return others is not None and others > config.DISTURBED


def _time_rounds(fn, x, rounds, iterations):
    perf = time.perf_counter
    samples = []
    for _ in range(rounds):
        t0 = perf()
        for _ in range(iterations):
            fn(x)
        samples.append((perf() - t0) / iterations)
    return samples


def _stats(samples):
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return dict(median_s=float(med), min_s=float(a.min()), max_s=float(a.max()), iqr_s=float(q3 - q1),
                mean_s=float(a.mean()))


def _run_self_timed(benchmark, bench, rec, prog, w, x, batch):
    """The C program times itself (clock_gettime around repeated calls); pytest-benchmark is not used here."""
    if not benchmark.enabled:
        stats, y, j = prog.run(x, min_sample_s=0.0, samples=1)
        rec["max_err"] = check_agreement(bench, w, batch, (y, j))
        return
    best, attempts = None, []
    while best is None or (_disturbed(best[0]) and len(attempts) < config.MAX_ATTEMPTS):
        rec["quiet_wait_s"] = bench.gate.wait()
        with Meter() as m:
            stats, y, j = prog.run(x, min_sample_s=0.02 if batch > 1000 else 0.05,
                                   samples=5 if batch > 1000 else 15)
        attempts.append(m.others)
        if best is None or (m.others is not None and m.others < best[0]):
            best = (m.others, stats, y, j)
    others, stats, y, j = best
    rec["max_err"] = check_agreement(bench, w, batch, (y, j))
    rec.update(median_s=stats["median_ns"] * 1e-9, min_s=stats["min_ns"] * 1e-9, max_s=stats["max_ns"] * 1e-9,
               rounds=stats["samples"], iterations=stats["reps"], timer="C program (clock_gettime)",
               others_cpu=others, others_cpu_attempts=attempts)
    benchmark.extra_info.update(c_program=stats)
