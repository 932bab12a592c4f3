"""The companion graph's ratio targets, measured in pairs: the two graphs of each ratio alternated in one process,
with onnxruntime's own profile of both.

    python -m benchmarks.paired                         # every target cell; prints the ratios
    python -m benchmarks.paired wide:1000:jax2onnx      # one cell (BASELINE: forward or jax2onnx)
    python -m benchmarks.paired --record benchmarks/results.json   # adds them to a suite record ("paired")

``python -m benchmarks.report`` runs this after the suite. The suite times each case on its own, one after another;
on a shared VM onnxruntime's two-thread times move by up to 1.7x between minutes (``NOTES.md``: the latency between
the two vCPUs changes), so a ratio of two cases timed minutes apart carries that drift. Here both graphs of a ratio
run in the same rounds: A B B A A B ..., each round after a pause and one untimed call. The pause is long: after
one session's calls, the other session's calls stay slow for a while (at one point, wide network: 38 against
25 us after 50 ms, 24 us after 0.5 s; at 1,000 points the forward graph took up to 3x its time after a 10 ms
pause). The ratio is the median over rounds of the round's A ÷ B time; its spread is the lowest and highest round
ratio.

Per cell, both graphs also run under onnxruntime's profiler (same session options): each operator type's share of
the graph's kernel time, matrix products (MatMul, Gemm, FusedGemm, Einsum, Conv, ConvTranspose) apart from the rest.
Only shares are kept: under the profiler the kernel times of a two-thread session add up to more than its time per
call (the wide network's companion graph at 100,000 points: 1.16 s of kernel time against 0.44 s per call), and at
one point the profiler's own cost per node dominates. ``floor`` = the ratio × the companion graph's matrix-product
share: the ratio it would reach if every other node cost nothing (meaningful from 1,000 points up). A target below
the floor needs faster matrix products, not a leaner graph.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time

from benchmarks import config
from benchmarks.paths import _ort_session  # the suite's session options

#: (workload, batch, limit): companion graph (the mode auto export ships) ÷ onnxruntime's forward graph.
FORWARD_TARGETS = (("seed", 100000, 2.3), ("wide", 100000, 2.3), ("physics", 100000, 3.2),
                   ("seed", 1, 2.2), ("physics", 1, 2.2), ("wide", 1, 2.2))
#: companion graph ÷ jax2onnx's vmap(jacrev) graph, in every cell jax2onnx can export.
JAX2ONNX_LIMIT = 0.8
MATRIX_OPS = ("MatMul", "Gemm", "FusedGemm", "Einsum", "Conv", "FusedConv", "ConvTranspose", "FusedMatMul",
              "MatMulInteger", "QLinearMatMul")
PAUSE_S = 0.5
ROUND_S = 0.02


def cells(workloads=None):
    """[(workload, batch, baseline, limit)]: every ratio target of the report."""
    from benchmarks.workloads import NAMES

    names = [w for w in NAMES if workloads is None or w in workloads]
    out = [(w, b, "forward", lim) for w, b, lim in FORWARD_TARGETS if w in names]
    for w in names:
        out += [(w, b, "jax2onnx", JAX2ONNX_LIMIT) for _, b in config.batches(w)]
    return out


class _Files:
    """The graphs of each workload: the auto-mode bundle's model.onnx and model.jac.onnx, and the jax2onnx file."""

    def __init__(self, tmp):
        self.tmp = tmp
        self._bundles = {}

    def skip(self, reason):  # the jax2onnx exporter's way of saying it cannot export a network
        raise _Skip(reason)

    def graph(self, w, which):
        if which == "jax2onnx":
            from benchmarks.paths import BY_NAME, jax2onnx_file

            reason = BY_NAME["jax2onnx_jacrev"].available()  # JAX and jax2onnx are an optional extra
            if reason:
                raise _Skip(reason)
            return jax2onnx_file(self, w)
        if w.name not in self._bundles:
            import nnpartials
            from benchmarks.paths import auto_mode

            mode = auto_mode(w)
            self._bundles[w.name] = nnpartials.export(w.keras_model, os.path.join(self.tmp, w.name), mode=mode,
                                                      overwrite=True, **w.export_options(mode))
        return os.path.join(self._bundles[w.name].path, "model.jac.onnx" if which == "companion" else "model.onnx")


class _Skip(Exception):
    pass


def _per_call(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def alternate(call_a, call_b, rounds, pause_s=PAUSE_S, round_s=ROUND_S):
    """Time two calls in alternating rounds (A B, B A, A B, ...): ``{"a": [s per call], "b": [...]}`` per round."""
    iters = []
    for fn in (call_a, call_b):
        fn()
        t = max(min(_per_call(fn, 1) for _ in range(2)), 1e-7)
        iters.append(max(1, math.ceil(round_s / t)))
    times = ([], [])
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            fn = (call_a, call_b)[k]
            time.sleep(pause_s)
            fn()  # untimed: wakes this session's threads
            times[k].append(_per_call(fn, iters[k]))
    return {"a": times[0], "b": times[1], "iterations": iters}


def profile(path, feed, runs=None):
    """onnxruntime's profile of one graph: {"matrix_share": the matrix products' share of kernel time, "share":
    {op type: share of kernel time}, "nodes_optimised": nodes after onnxruntime's optimiser, "runs": n}."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="nnp-paired-") as tmp:
        opt = os.path.join(tmp, "opt.onnx")  # the graph after onnxruntime's optimiser, for its node count
        sess = _ort_session(path, profile_prefix=os.path.join(tmp, "prof"), optimized_path=opt)
        t = _per_call(lambda: sess.run(None, feed), 1)
        runs = runs or max(3, min(30, int(0.3 / max(t, 1e-6))))
        for _ in range(runs):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
        nodes = len(onnx.load(opt, load_external_data=False).graph.node)
    ends = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = ends[0] if len(ends) > runs else -1  # the session's first run (allocation) is left out
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= after:
            per_op[e["args"]["op_name"]] += e["dur"] * 1e-6 / runs
    total = sum(per_op.values()) or 1.0
    return {"matrix_share": sum(v for k, v in per_op.items() if k in MATRIX_OPS) / total,
            "share": {k: v / total for k, v in per_op.most_common()}, "nodes_optimised": nodes, "runs": runs}


def measure(w, batch, baseline, limit, files, quiet=True, rounds=None, pause_s=PAUSE_S):
    """One cell: the pair alternated, both profiled; a dict for the record."""
    import numpy as np

    from benchmarks.contention import Meter, QuietGate

    rec = {"workload": w.name, "batch": batch, "baseline": baseline, "limit": limit}
    try:
        comp = files.graph(w, "companion")
        base = files.graph(w, baseline)
    except _Skip as exc:
        return dict(rec, status="skipped", reason=str(exc))
    x = w.shaped(w.inputs(batch))
    sa, sb = _ort_session(comp), _ort_session(base)
    fa = {sa.get_inputs()[0].name: x}
    fb = {sb.get_inputs()[0].name: x}
    ya, yb = sa.run(None, fa), sb.run(None, fb)
    # the two graphs must compute the same thing before their times are compared
    err = float(np.max(np.abs(np.asarray(ya[0], np.float64) - np.asarray(yb[0], np.float64))))
    if baseline == "jax2onnx":
        ja = np.asarray(ya[1], np.float64).reshape(batch, -1)
        jb = np.asarray(yb[1], np.float64).reshape(batch, -1)
        scale = max(1.0, float(np.max(np.abs(jb))))
        err = max(err, float(np.max(np.abs(ja - jb))) / scale)
    if err > 1e-4:
        return dict(rec, status="failed", reason=f"the two graphs disagree: max scaled difference {err:.3g}")
    rounds = rounds or (5 if batch >= config.LARGE else 9)
    if quiet:
        QuietGate().wait()
    with Meter() as m:
        t = alternate(lambda: sa.run(None, fa), lambda: sb.run(None, fb), rounds, pause_s=pause_s)
    del sa, sb
    ratios = [a / b for a, b in zip(t["a"], t["b"])]
    rec.update(status="ok", rounds=rounds, iterations=t["iterations"], others_cpu=m.others, agree=err,
               companion_s=float(np.median(t["a"])), baseline_s=float(np.median(t["b"])),
               ratio=float(np.median(ratios)), ratio_min=float(min(ratios)), ratio_max=float(max(ratios)),
               threads=config.THREADS)
    rec["profile"] = {"companion": profile(comp, fa), "baseline": profile(base, fb)}
    rec["floor"] = rec["ratio"] * rec["profile"]["companion"]["matrix_share"]
    return rec


def run(selected, progress=print):
    from benchmarks import workloads

    out = []
    built = {}
    with tempfile.TemporaryDirectory(prefix="nnp-paired-") as tmp:
        files = _Files(tmp)
        for name, batch, baseline, limit in selected:
            if name not in built:
                built[name] = workloads.build(name)
            batch_run = dict(config.batches(name))[batch]
            rec = measure(built[name], batch_run, baseline, limit, files)
            rec["batch"] = batch  # the batch id (the tiny run's ids name the full-size batches)
            rec["batch_run"] = batch_run
            out.append(rec)
            progress(describe(rec))
    return out


def describe(r):
    head = f"{r['workload']} {r['batch']:,} companion ÷ {r['baseline']}"
    if r.get("status") != "ok":
        return f"{head}: {r.get('status')} ({r.get('reason')})"
    pc, pb = r["profile"]["companion"], r["profile"]["baseline"]
    return (f"{head}: {r['ratio']:.2f}x (rounds {r['ratio_min']:.2f}-{r['ratio_max']:.2f}, target {r['limit']}x); "
            f"{r['companion_s'] * 1e3:.3g} vs {r['baseline_s'] * 1e3:.3g} ms; matrix products "
            f"{100 * pc['matrix_share']:.0f}% vs {100 * pb['matrix_share']:.0f}% of kernel time, nodes "
            f"{pc['nodes_optimised']} vs {pb['nodes_optimised']}; floor {r['floor']:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="*", help="WORKLOAD:BATCH:BASELINE (baseline forward or jax2onnx); default: all")
    ap.add_argument("--record", help="a suite record (results.json) to add the results to, under \"paired\"")
    args = ap.parse_args(argv)
    config.configure_threads()
    wanted = config.ONLY_WORKLOADS
    if args.cells:
        selected = []
        for c in args.cells:
            name, batch, baseline = c.split(":")
            limit = JAX2ONNX_LIMIT if baseline == "jax2onnx" else dict(((w, b), lim) for w, b, lim in
                                                                     FORWARD_TARGETS).get((name, int(batch)))
            selected.append((name, int(batch), baseline, limit))
    elif args.record:  # the cells of the workloads the suite ran
        with open(args.record) as f:
            ran = {r["workload"] for r in json.load(f).get("results", []) if r.get("status") == "ok"}
        selected = cells([w for w in ran if not wanted or w in wanted])
    else:
        selected = cells(wanted)
    out = run(selected)
    if args.record:
        with open(args.record) as f:
            data = json.load(f)
        data["paired"] = out
        data.setdefault("machine", {})["paired_command"] = "python -m benchmarks.paired " + " ".join(argv or sys.argv[1:])
        tmp = args.record + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
