"""Where onnxruntime spends its time in the forward and companion graphs (its own profiler, per op type).

    python -m benchmarks.profile_ort                  # the dense workloads, reverse mode, at the batches below
    python -m benchmarks.profile_ort seed:100000 wide:1000 cnn:1000

Prints, per graph, the node count before and after onnxruntime's graph optimisation and the share of kernel time
per op type (a few runs after a warm-up, the profiled session's first run left out). Used to explain the results in
NOTES.md; not part of the timed suite. Read the shares, not the absolute times: under the profiler the kernel times
add up to more than the suite's wall-clock time per call (the CNN's companion graph at 1,000 points: 483 ms of
kernel time per run against 247-259 ms per call in the timed suite).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile

DEFAULT = ("seed:1", "seed:100000", "physics:1000", "wide:100000")


def profile(name: str, batch: int, mode: str = "reverse", runs: int = 5, threads: int | None = None):
    from benchmarks import config

    config.configure_threads()
    import onnx
    import onnxruntime as ort

    import nnpartials
    from benchmarks import workloads

    w = workloads.build(name)
    out = []
    with tempfile.TemporaryDirectory(prefix="nnp-prof-") as tmp:
        b = nnpartials.export(w.keras_model, os.path.join(tmp, "bundle"), mode=mode, overwrite=True,
                              **w.export_options(mode))
        x = w.shaped(w.inputs(batch))  # the model's own input shape ([batch, 28, 28, 1] for cnn)
        feed = {b.manifest["inputs"][0]["name"]: x}
        for f in ("model.onnx", "model.jac.onnx"):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads or config.THREADS
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = os.path.join(tmp, f"opt-{f}")
            sess = ort.InferenceSession(os.path.join(b.path, f), so, providers=["CPUExecutionProvider"])
            sess.run(None, feed)
            so2 = ort.SessionOptions()
            so2.intra_op_num_threads = so.intra_op_num_threads
            so2.graph_optimization_level = so.graph_optimization_level
            so2.enable_profiling = True
            so2.profile_file_prefix = os.path.join(tmp, f"prof-{f}")
            sess = ort.InferenceSession(os.path.join(b.path, f), so2, providers=["CPUExecutionProvider"])
            sess.run(None, feed)
            for _ in range(runs):
                sess.run(None, feed)
            with open(sess.end_profiling()) as fh:
                events = json.load(fh)
            # the first run of the profiled session (allocation, first touch of its buffers) is left out
            run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session"
                              and e.get("name") == "model_run")
            after = run_ends[0] if len(run_ends) > runs else -1
            per_op = collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= after:
                    per_op[e["args"]["op_name"]] += e["dur"]
            total = sum(per_op.values())
            nodes = len(onnx.load_model_from_string(b.read(f)).graph.node)
            nodes_opt = len(onnx.load(os.path.join(tmp, f"opt-{f}")).graph.node)
            out.append({"workload": name, "batch": batch, "graph": f, "mode": mode, "nodes": nodes,
                        "nodes_optimised": nodes_opt,
                        "kernel_ms_per_run": total / (runs if after >= 0 else runs + 1) / 1000,
                        "share": {k: v / total for k, v in per_op.most_common()} if total else {}})
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv) or list(DEFAULT)
    for spec in argv:
        name, _, batch = spec.partition(":")
        for r in profile(name, int(batch or 1000)):
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(r["share"].items())[:8])
            print(f"{r['workload']} batch {r['batch']:,} {r['graph']} ({r['mode']}): {r['nodes']} nodes, "
                  f"{r['nodes_optimised']} after optimisation; kernel time {r['kernel_ms_per_run']:.3g} ms per run: "
                  f"{shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
