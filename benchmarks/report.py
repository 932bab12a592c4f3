"""Run the benchmark suite and write ``benchmarks/RESULTS.md`` with a chart of the ratios.

    python -m benchmarks.report                 # the full suite, then the paired ratios (about 12 minutes on a quiet
                                                # 2-core machine)
    python -m benchmarks.report --no-run        # render again from benchmarks/results.json
    python -m benchmarks.report --tiny --out-dir /tmp/r   # tiny sizes, timing disabled (checks the machinery)
    python -m benchmarks.report --no-paired     # without the paired ratios (benchmarks.paired) after the suite

Anything after ``--`` goes to pytest (e.g. ``-- -k seed``). The raw record of the run is ``results.json``. Groups
(workload, batch) that other processes disturbed are measured again, whole, once (``--repasses``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.paired import FORWARD_TARGETS, JAX2ONNX_LIMIT, MATRIX_OPS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PEER = "peer"
#: A group (workload, batch) with a case during which other processes used more than this share of the machine
#: is measured again, whole, by the report command.
DISTURBED_GROUP = 0.25
#: A peer ahead by less than this factor is called level (the run-to-run noise on a shared machine is larger).
TIE = 1.10
ANALYTIC_NNP = ("ort_jac_forward", "ort_jac_reverse", "partials", "c_kernel", "c_alone")
BATCH_LABEL = {1: "1", 100: "100", 1000: "1,000", 10000: "10,000", 100000: "100,000"}
WORKLOAD_ORDER = ("seed", "physics", "wide", "cnn")
PATH_ORDER = ("ort_forward", "c_alone_fwd", "ort_jac_forward", "ort_jac_reverse", "partials", "c_kernel", "c_alone",
              "c_kernel_fd",
              "tf_function", "tf_eager", "jax_jacrev", "jax_jacfwd", "jax2onnx_jacrev", "torch_jacrev")
SHORT = {
    "ort_forward": "ORT forward only",
    "ort_jac_forward": "companion graph, forward mode",
    "ort_jac_reverse": "companion graph, reverse mode",
    "partials": "Partials.jacobian (wrapper)",
    "c_kernel": "C core, Kernel.jacobian",
    "c_alone": "C core, C alone",
    "c_alone_fwd": "C core forward only, C alone",
    "c_kernel_fd": "C core, finite differences (f64)",
    "tf_function": "TF GradientTape, tf.function",
    "tf_eager": "TF GradientTape, eager",
    "jax_jacrev": "JAX jit(vmap(jacrev))",
    "jax_jacfwd": "JAX jit(vmap(jacfwd))",
    "jax2onnx_jacrev": "jax2onnx vmap(jacrev) in onnxruntime",
    "torch_jacrev": "PyTorch vmap(jacrev)",
}
WORKLOAD_TITLE = {
    "seed": "seed network: Normalization + Dense 64, 64, 32, 32, 16, 16, 8 (LeakyReLU), Dense 1; 2 inputs → 1 output",
    "physics": "physics-style network: 3 inputs, 4 × Dense 256 tanh, 2 outputs",
    "wide": "wide-input network: 64 inputs, Dense 256, 256 gelu, 1 output",
    "cnn": "small CNN: 28×28×1 image, Conv2D 8 3×3 relu, MaxPool 2, Conv2D 16 3×3 relu, MaxPool 2, Dense 10 softmax; "
           "784 inputs → 10 outputs",
}


# ----- running ----------------------------------------------------------------------------------------------
def run_suite(record, command, tiny=False, extra=(), prior=None):
    env = dict(os.environ, NNP_BENCH_RECORD=record, NNP_BENCH_COMMAND=command)
    if prior:
        env["NNP_BENCH_PRIOR"] = prior
    if tiny:
        env["NNP_BENCH_TINY"] = "1"
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE), "-p", "no:cacheprovider", "-q", "-rs",
           "--benchmark-sort=name", "--benchmark-columns=median,iqr,rounds,iterations"]
    cmd += ["--benchmark-disable"] if tiny else ["--benchmark-only"]
    cmd += list(extra)
    print("running:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def run_paired(record):
    """``python -m benchmarks.paired --record RECORD``: the ratio targets' graphs alternated in one process."""
    cmd = [sys.executable, "-m", "benchmarks.paired", "--record", record]
    print("running:", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        print(f"the paired measurement exited with {rc}; the targets use the separately timed cases",
              file=sys.stderr)
    return rc


def disturbed_groups(data, threshold=DISTURBED_GROUP):
    """(workload, batch) groups with a timed case during which other processes used > threshold of the machine."""
    out = set()
    for r in data.get("results", []):
        if r.get("status") == "ok" and (r.get("others_cpu") or 0) > threshold:
            out.add((r["workload"], int(r["batch"])))
    return sorted(out, key=lambda g: (WORKLOAD_ORDER.index(g[0]) if g[0] in WORKLOAD_ORDER else 99, g[1]))


def _group_others(data, group):
    vals = [r.get("others_cpu") or 0.0 for r in data.get("results", [])
            if (r["workload"], int(r["batch"])) == group and r.get("status") == "ok"]
    return max(vals) if vals else 1.0


def _split_k(extra):
    """(pytest arguments without -k EXPR, EXPR or None)."""
    rest, expr, it = [], None, iter(extra)
    for a in it:
        if a == "-k":
            expr = next(it, None)
        elif a.startswith("-k") and len(a) > 2:
            expr = a[2:]
        else:
            rest.append(a)
    return rest, expr


def remeasure(record, command, extra, passes):
    """Run the disturbed (workload, batch) groups again, whole, and keep each group's less disturbed pass."""
    for k in range(passes):
        with open(record) as f:
            data = json.load(f)
        groups = disturbed_groups(data)
        if not groups:
            return
        print(f"re-measuring groups disturbed by other processes: {groups}", flush=True)
        sub = f"{record}.pass{k + 2}.json"
        sel = " or ".join(f"{w}-b{b}-" for w, b in groups)
        rest, user_k = _split_k(extra)
        run_suite(sub, command, extra=rest + ["-k", f"({user_k}) and ({sel})" if user_k else sel], prior=record)
        if not os.path.exists(sub):
            return
        with open(sub) as f:
            new = json.load(f)
        os.remove(sub)
        data.setdefault("passes", [])
        for g in groups:
            before, after = _group_others(data, g), _group_others(new, g)
            kept = after < before
            data["passes"].append({"pass": k + 2, "workload": g[0], "batch": g[1], "others_before": before,
                                   "others_after": after, "kept": "new" if kept else "first"})
            if kept:
                data["results"] = [r for r in data["results"] if (r["workload"], int(r["batch"])) != g] + \
                    [r for r in new["results"] if (r["workload"], int(r["batch"])) == g]
        data["machine"]["finished"] = new["machine"].get("finished")
        data["machine"]["loadavg_end"] = new["machine"].get("loadavg_end")
        data["config"]["quiet_spent_s"] = data["config"].get("quiet_spent_s", 0) + new["config"].get("quiet_spent_s", 0)
        with open(record, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")


# ----- formatting -------------------------------------------------------------------------------------------
def fmt_time(s):
    if s is None:
        return "—"
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs" if s < 1e-4 else f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.3g} s"


def fmt_ratio(r):
    if r is None:
        return "—"
    if r < 0.1:
        return f"{r:.2g}×"
    return f"{r:.2f}×" if r < 10 else f"{r:.3g}×" if r < 1000 else f"{r:.0f}×"


def fmt_pct(v):
    return "—" if v is None else f"{100 * v:.0f}%"


def fmt_gflops(g):
    if g is None:
        return "—"
    return f"{g:.3g}" if g >= 0.01 else f"{g:.1e}"


class Results:
    def __init__(self, data):
        self.data = data
        self.machine = data.get("machine", {})
        self.rows = {(r["workload"], int(r["batch"]), r["path"]): r for r in data.get("results", [])}
        self.workloads = [w for w in WORKLOAD_ORDER if any(k[0] == w for k in self.rows)]
        self.workloads += sorted({k[0] for k in self.rows} - set(self.workloads))
        #: every batch size of the run (workloads have their own: see batches_of)
        self.batches = sorted({k[1] for k in self.rows})

    def batches_of(self, w):
        """The batch sizes workload ``w`` ran at."""
        return sorted({k[1] for k in self.rows if k[0] == w})

    def get(self, w, b, p):
        return self.rows.get((w, b, p))

    def t(self, w, b, p):
        r = self.get(w, b, p)
        return r.get("median_s") if r and r.get("status") == "ok" else None

    def paths(self, w, b):
        present = {k[2] for k in self.rows if k[0] == w and k[1] == b}
        return [p for p in PATH_ORDER if p in present] + sorted(present - set(PATH_ORDER))

    def fastest_peer(self, w, b):
        best = None
        for p in self.paths(w, b):
            r = self.get(w, b, p)
            if r.get("family") == PEER and self.t(w, b, p) is not None:
                if best is None or self.t(w, b, p) < self.t(w, b, best):
                    best = p
        return best

    def best_nnp(self, w, b):
        best = None
        for p in ANALYTIC_NNP:
            if self.t(w, b, p) is not None and (best is None or self.t(w, b, p) < self.t(w, b, best)):
                best = p
        return best

    def ratio_peer(self, w, b, p):
        fp = self.fastest_peer(w, b)
        t = self.t(w, b, p)
        return t / self.t(w, b, fp) if fp and t is not None else None

    def ratio_fwd(self, w, b, p):
        f = self.t(w, b, "ort_forward")
        t = self.t(w, b, p)
        return t / f if f and t is not None else None

    def gflops(self, w, b, p):
        r = self.get(w, b, p)
        t = self.t(w, b, p)
        return r["flops_per_call"] / t / 1e9 if t and r.get("flops_per_call") else None

    def peak_per_core(self):
        """The machine's single-core multiply-add peak measured in the run (GFLOP/s), None when not measured."""
        return (self.machine.get("fma_peak") or {}).get("peak_gflops")

    def peak_fraction(self, w, b, p):
        """GFLOP/s ÷ (measured single-core peak × the cores the path may use: 1 for the C program, else the
        suite's thread count)."""
        r = self.get(w, b, p)
        peak = self.peak_per_core()
        g = self.gflops(w, b, p)
        if g is None or not peak:
            return None
        cores = r.get("peak_cores") or (self.machine.get("thread_settings") or {}).get("threads") or 1
        return g / (peak * cores)

    def paired(self, w, b, baseline):
        """The paired measurement (``benchmarks.paired``) of companion ÷ ``baseline`` ("forward" or "jax2onnx") at
        (w, b), when the run has one that ran."""
        for r in self.data.get("paired", []):
            if (r["workload"], int(r["batch"]), r["baseline"]) == (w, b, baseline) and r.get("status") == "ok":
                return r
        return None

    def auto_path(self, w):
        """The companion graph a default (auto mode) export ships."""
        info = self.data.get("workloads", {}).get(w, {})
        return f"ort_jac_{info.get('auto_mode', 'reverse')}"


# ----- sections ---------------------------------------------------------------------------------------------
def section_machine(res, command):
    m = res.machine
    v = m.get("versions", {})
    cfg = res.data.get("config", {})
    lines = ["## Machine and settings", ""]
    lines.append(f"- Command: `{command}`")
    dirty = m.get("uncommitted")
    lines.append(f"- Run: {m.get('started')} → {m.get('finished')} (UTC), commit `{m.get('git_commit')}`"
                 + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else ""))
    lines.append(f"- CPU: {m.get('cpu')} ({m.get('cpu_flags')}), {m.get('logical_cpus')} logical CPUs "
                 f"({m.get('affinity_cpus')} usable), {m.get('memory_gib')} GiB memory; {m.get('platform')}")
    la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
    loads = [r["loadavg_1m"] for r in res.rows.values() if r.get("loadavg_1m") is not None]
    if la0 and la1:
        span = f", between {min(loads):.2f} and {max(loads):.2f} during the cases" if loads else ""
        lines.append(f"- Load average (1 min) at start {la0[0]:.2f}, at end {la1[0]:.2f}{span}, on "
                     f"{m.get('logical_cpus')} CPUs. A load above the CPU count means other work shared the machine "
                     f"and single numbers carry that noise; every ratio compares cases of the same run.")
    others = [r["others_cpu"] for r in res.rows.values() if r.get("others_cpu") is not None]
    if others:
        srt = sorted(others)
        busy = sum(1 for o in others if o > 0.25)
        lines.append(f"- Other processes during the timed regions: median {100 * srt[len(srt) // 2]:.0f}%, max "
                     f"{100 * srt[-1]:.0f}% of the machine; {busy} of {len(others)} cases above 25%. Before each "
                     f"case the suite waited (at most {cfg.get('quiet_per_case_s'):g} s, {cfg.get('quiet_budget_s'):g} s "
                     f"in all; {cfg.get('quiet_spent_s', 0):.0f} s spent) for other processes to use less than "
                     f"{100 * cfg.get('quiet_threshold', 0):.0f}% of it. A case during which they used more than "
                     f"{100 * cfg.get('disturbed', 0.2):.0f}% was timed again the same way (up to "
                     f"{cfg.get('max_attempts', 3)} attempts), keeping the least disturbed attempt "
                     f"({sum(1 for r in res.rows.values() if len(r.get('others_cpu_attempts') or []) > 1)} cases).")
    reps = [p for p in res.data.get("passes", [])]
    if reps:
        lines.append("- Groups re-measured whole in a later pass because other processes disturbed them: " + ", ".join(
            f"{p['workload']} batch {BATCH_LABEL.get(p['batch'], p['batch'])} (pass {p['pass']}: worst case "
            f"{100 * p['others_before']:.0f}% → {100 * p['others_after']:.0f}%, kept the {p['kept']} pass)"
            for p in reps) + ".")
    order = ["python", "numpy", "tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "jax",
             "jaxlib", "jax2onnx", "torch", "pytest-benchmark", "nnpartials"]
    lines.append("- Versions: " + ", ".join(f"{k} {v[k]}" for k in order if k in v))
    lines.append(f"- C compiler: {m.get('c_compiler')}, flags `{m.get('c_flags')}` for the C-alone program (the C "
                 f"library's own defaults, no `-march`; the library picks its AVX2+FMA matrix kernels at run time "
                 f"where the CPU has them)")
    fp = m.get("fma_peak") or {}
    if fp.get("peak_gflops"):
        per_isa = ", ".join(f"{d['isa']} {d['gflops']:.3g}" for d in fp.get("isas", []))
        lines.append(f"- Measured float32 multiply-add peak of one core (`csrc/bench/fma_peak.c`, same run, same C "
                     f"flags; independent accumulator chains, median sample): **{fp['peak_gflops']:.3g} GFLOP/s** "
                     f"({fp.get('isa')}); per instruction set: {per_isa}")
        end = (m.get("fma_peak_end") or {}).get("peak_gflops")
        if end:
            drift = end / fp["peak_gflops"] - 1
            reading = (". **The machine slowed down during the run**: cases timed late ran on a slower machine than "
                       "the fractions of peak (start value) assume." if drift < -0.05 else
                       "; fractions of peak use the start value.")
            lines.append(f"- The same peak measured again at the end of the run: {end:.3g} GFLOP/s "
                         f"({100 * drift:+.0f} %){reading}")
    elif fp.get("unavailable"):
        lines.append(f"- Multiply-add peak not measured: {fp['unavailable']}")
    ts = m.get("thread_settings", {})
    lines.append(f"- Threads: every library may use {ts.get('threads')} threads (all cores). "
                 + "; ".join(f"{k}: {val}" for k, val in ts.items() if k != "threads"))
    cfg = res.data.get("config", {})
    lines.append(f"- Timing: inputs built and converted outside the timed region; first call (tracing, "
                 f"compilation, allocation) timed separately; then warm-up and pytest-benchmark rounds of "
                 f"≥ {cfg.get('min_round_s', 0) * 1e3:g} ms each (fast calls repeated within a round), "
                 f"≥ {cfg.get('min_rounds_small')} rounds / ~{cfg.get('target_s_small')} s per case at batch 1 and "
                 f"1,000, ≥ {cfg.get('min_rounds_large')} rounds / ~{cfg.get('target_s_large')} s at batch 100,000. "
                 f"**Time per call = median over rounds**, for the whole batch.")
    lines.append(f"- Agreement: before timing, every path's y and dy/dx are compared with a float64 numpy reference "
                 f"(same weights): max |J − J_ref| ≤ {cfg.get('agree')} · max(1, max|J_ref|) on up to "
                 f"{2 * cfg.get('check_rows', 0)} rows (the finite-difference path may also stay within its own "
                 f"error estimate); a disagreeing path fails instead of being timed.")
    lines.append("")
    return lines


def section_flops(res):
    f = ", ".join(f"{w} {v['forward_flops_per_point']:,}" for w, v in res.data.get("workloads", {}).items())
    return [
        "## FLOP convention",
        "",
        "Only the multiply-adds of the dense and convolution layers count: 2·in·out FLOPs per dense layer per point, "
        "2·k_h·k_w·c_in·c_out per output position of a convolution (out_h·out_w positions per point; normalization, "
        "bias additions, activations, pooling and softmax are not counted). "
        f"One forward pass costs F per point ({f}). y with dy/dx "
        "computed with K directions counts F·(1 + K) per point, with K as each path works: K = n_in for forward mode "
        "(companion graph in forward mode, jacfwd), K = n_out for reverse mode (companion graph in reverse mode, "
        "GradientTape, jacrev), K = min(n_in, n_out) for the C core's automatic mode. The float64 "
        "finite-difference Jacobian counts F·(1 + 4·n_in) (central differences with steps h and h/2). "
        "GFLOP/s = counted FLOPs of the whole batch ÷ time per call; the forward pass alone counts F. A rate above "
        "what the hardware can deliver means the path skipped counted work (the C core reuses the exact Jacobian of "
        "an activation pattern shared by several points of a piecewise-linear network such as the seed network).",
        "",
    ]


def section_tables(res):
    lines = ["## Results", "",
             "Time per call is for the whole batch. ×peer: time / fastest peer (TensorFlow, JAX, jax2onnx, PyTorch) in the same "
             "run and case (below 1 is faster than every peer). ×fwd: time / onnxruntime forward pass alone "
             "(the floor of the onnxruntime path). First call: setup (session, tf.function, jit, kernel) + first "
             "call (tracing, compilation), excluded from the time per call. (fastest round): the fastest round's time per "
             "call, for spotting bimodal timings. Others' CPU: share of the machine that "
             "other processes used while the case was timed (0% = the case had the machine to itself). Of peak: GFLOP/s "
             "÷ the float32 multiply-add peak measured in the same run (`csrc/bench/fma_peak.c`, one core) × the cores "
             "the path may use (one for the C program, the suite's thread count for the others).", ""]
    for w in res.workloads:
        lines += [f"### {WORKLOAD_TITLE.get(w, w)}", ""]
        for b in res.batches_of(w):
            fp = res.fastest_peer(w, b)
            lines.append(f"**batch {BATCH_LABEL.get(b, b)}** — fastest peer: {SHORT.get(fp, fp) if fp else 'none measured'}")
            lines.append("")
            lines.append("| path | time per call | (fastest round) | ×peer | ×fwd | GFLOP/s | of peak | first call | "
                         "others' CPU | note |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            for p in res.paths(w, b):
                r = res.get(w, b, p)
                first = None
                if r.get("first_call_s") is not None:
                    first = (r.get("setup_s") or 0) + r["first_call_s"]
                note = ""
                if r["status"] == "skipped":
                    note = "skipped: " + (r.get("reason") or "")
                elif r["status"] == "n/a":
                    note = r.get("reason") or "not applicable"
                    if not note.startswith("not applicable"):
                        note = "not applicable: " + note
                elif r["status"] == "failed":
                    note = "**failed**: " + (r.get("reason") or "")
                elif r.get("timer", "").startswith("C program"):
                    note = "timed by the C program"
                if r.get("note") and r["status"] == "ok":
                    note = (note + "; " if note else "") + "weights written by the suite†"
                name = SHORT.get(p, p)
                if p in ANALYTIC_NNP or p == "c_kernel_fd":
                    name = f"**{name}**"
                tmin = r.get("min_s") if r.get("status") == "ok" else None
                lines.append(f"| {name} | {fmt_time(res.t(w, b, p))} | {fmt_time(tmin)} | "
                             f"{fmt_ratio(res.ratio_peer(w, b, p))} | "
                             f"{fmt_ratio(res.ratio_fwd(w, b, p))} | {fmt_gflops(res.gflops(w, b, p))} | "
                             f"{fmt_pct(res.peak_fraction(w, b, p))} | "
                             f"{fmt_time(first)} | {fmt_pct(r.get('others_cpu'))} | {note.replace('|', '/')} |")
            lines.append("")
    return lines


def summary_table(res):
    """The compact table for the README."""
    lines = ["| workload | batch | ORT forward only | companion graph (auto mode) | best nnpartials | fastest peer | "
             "best nnpartials ÷ fastest peer |",
             "|---|---:|---:|---:|---|---|---:|"]
    for w in res.workloads:
        ap = res.auto_path(w)
        for b in res.batches_of(w):
            bn, fp = res.best_nnp(w, b), res.fastest_peer(w, b)
            ratio = res.t(w, b, bn) / res.t(w, b, fp) if bn and fp else None
            lines.append(f"| {w} | {BATCH_LABEL.get(b, b)} | {fmt_time(res.t(w, b, 'ort_forward'))} | "
                         f"{fmt_time(res.t(w, b, ap))} | "
                         f"{(SHORT.get(bn, bn) + ' ' + fmt_time(res.t(w, b, bn))) if bn else '—'} | "
                         f"{(SHORT.get(fp, fp) + ' ' + fmt_time(res.t(w, b, fp))) if fp else '—'} | "
                         f"{fmt_ratio(ratio)} |")
    return lines


def _verdict(ok):
    return "met" if ok else "not met"


def targets(res):
    """[(target, measured, verdict)] for the stated targets."""
    out = []
    # every cell of the summary: the best analytic nnpartials path against the fastest peer
    cells, over = 0, []
    for w in res.workloads:
        for b in res.batches_of(w):
            bn, fp = res.best_nnp(w, b), res.fastest_peer(w, b)
            if bn and fp:
                cells += 1
                r = res.t(w, b, bn) / res.t(w, b, fp)
                if r > 1.0:
                    over.append(f"{w} {BATCH_LABEL.get(b, b)}: {r:.2f}× ({SHORT.get(fp, fp)} faster)")
    out.append(("every cell of the summary: best nnpartials path ≤ 1.0× the fastest peer",
                (f"{cells - len(over)} of {cells} cells; above: " + "; ".join(over)) if over else
                f"all {cells} cells", _verdict(not over) if cells else "not measured"))
    # the C core's fraction of one core's measured multiply-add peak, wide smooth networks, batch >= 1,000
    for w in ("physics", "wide"):
        for b in [b for b in res.batches_of(w) if b >= 1000]:
            for p, what in (("c_alone_fwd", "forward"), ("c_alone", "y + Jacobian")):
                f = res.peak_fraction(w, b, p)
                name = (f"C core alone, {w} network, batch {BATCH_LABEL.get(b, b)}, {what}: ≥ 75% of one core's "
                        f"multiply-add peak")
                if f is None:
                    out.append((name, "not measured", _why(res, w, b, p) or "no peak measured"))
                else:
                    out.append((name, f"{fmt_gflops(res.gflops(w, b, p))} GFLOP/s of {res.peak_per_core():.3g} = "
                                      f"{100 * f:.0f}%", _verdict(f >= 0.75)))
    # one point of the seed network stays where it was
    w = "seed"
    for p, limit, what in (("c_alone", 0.5e-6, "C alone (`nnp_jacobian`)"),
                           ("c_kernel", 3e-6, "`Kernel.jacobian` from Python")):
        t = res.t(w, 1, p)
        out.append((f"C core, seed network, one point, y + dy/dx through {what} ≤ {fmt_time(limit)}",
                    fmt_time(t) if t is not None else "not measured",
                    _verdict(t <= limit) if t is not None else _why(res, w, 1, p)))
    # the companion graph against onnxruntime's forward graph: the paired measurement where the run has it (both
    # graphs alternated in the same rounds), else the two separately timed cases
    for w, b, limit in FORWARD_TARGETS:
        if w not in res.workloads:
            continue
        ap = res.auto_path(w)
        tj, tf = res.t(w, b, ap), res.t(w, b, "ort_forward")
        pr = res.paired(w, b, "forward")
        name = (f"companion graph ({ap.split('_')[-1]} mode, what auto export ships), {w} network, batch "
                f"{BATCH_LABEL.get(b, b)}: ≤ {limit}× the forward graph's time per call")
        separate = f"{fmt_time(tj)} vs {fmt_time(tf)} = {tj / tf:.2f}×" if tj is not None and tf else None
        if pr:
            out.append((name, f"paired {_paired_text(pr)}" + (f"; timed apart {separate}" if separate else ""),
                        _verdict(pr["ratio"] <= limit)))
        elif separate:
            out.append((name, f"timed apart {separate}", _verdict(tj / tf <= limit)))
        else:
            out.append((name, "not measured", _why(res, w, b, ap) or _why(res, w, b, "ort_forward")))
    # the companion graph against the other Jacobian-as-ONNX-graph: jax2onnx's jacrev, in the same onnxruntime
    cells, over, how = [], [], set()
    for w in res.workloads:
        ap = res.auto_path(w)
        for b in res.batches_of(w):
            tj, tx = res.t(w, b, ap), res.t(w, b, "jax2onnx_jacrev")
            pr = res.paired(w, b, "jax2onnx")
            r = pr["ratio"] if pr else (tj / tx if tj is not None and tx else None)
            if r is None:
                continue
            how.add("paired" if pr else "timed apart")
            cells.append(r)
            if r > JAX2ONNX_LIMIT:
                over.append(f"{w} {BATCH_LABEL.get(b, b)}: {r:.2f}×")
    out.append((f"companion graph ≤ {JAX2ONNX_LIMIT}× jax2onnx's jacrev graph (same onnxruntime settings) in every "
                "cell",
                (f"{len(cells) - len(over)} of {len(cells)} cells ({', '.join(sorted(how))}), worst "
                 f"{max(cells):.2f}×" + ("; above: " + "; ".join(over) if over else "")) if cells else
                "not measured",
                _verdict(not over) if cells else "not measured"))
    return out


def _paired_text(pr):
    return (f"{fmt_time(pr['companion_s'])} vs {fmt_time(pr['baseline_s'])} = {pr['ratio']:.2f}× (rounds "
            f"{pr['ratio_min']:.2f}–{pr['ratio_max']:.2f}×)")


def section_paired(res):
    """The paired ratios with onnxruntime's profile of both graphs, and for each missed target what the profile
    shows."""
    rows = [r for r in res.data.get("paired", []) if r.get("status") in ("ok", "failed")]
    if not rows:
        return []
    lines = ["## Companion graph ratios, paired, with onnxruntime's profile", "",
             "Measured after the suite by `python -m benchmarks.paired`: both graphs of a ratio alternated in the "
             "same rounds in one process (A B, B A, ...; a 0.5 s pause and one untimed call before each timed "
             "round), so that both see the same state of the machine; ratio = median over rounds of the round's "
             "ratio. Matrix products: their share of the graph's kernel time under onnxruntime's profiler (same "
             f"session options; {', '.join(MATRIX_OPS[:6])}). Floor = ratio × the companion graph's matrix-product "
             "share: the ratio it would reach if its other nodes cost nothing (from 1,000 points up; at one point "
             "the profiler's cost per node dominates the shares).", "",
             "| workload | batch | ÷ | target | paired ratio (rounds) | timed apart | nodes after optimisation, "
             "companion / baseline | matrix products, companion / baseline | floor | verdict |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    misses = []
    for r in rows:
        w, b, base = r["workload"], int(r["batch"]), r["baseline"]
        ap = res.auto_path(w)
        other = "ort_forward" if base == "forward" else "jax2onnx_jacrev"
        tj, tx = res.t(w, b, ap), res.t(w, b, other)
        apart = f"{tj / tx:.2f}×" if tj is not None and tx else "—"
        if r["status"] != "ok":
            lines.append(f"| {w} | {BATCH_LABEL.get(b, b)} | {base} | {r['limit']}× | {r['status']}: "
                         f"{r.get('reason')} | {apart} | | | | |")
            continue
        pc, pb = r["profile"]["companion"], r["profile"]["baseline"]
        ok = r["ratio"] <= r["limit"]
        floor = f"{r['floor']:.2f}×" if b >= 1000 else "—"
        lines.append(f"| {w} | {BATCH_LABEL.get(b, b)} | {base} | {r['limit']}× | {r['ratio']:.2f}× "
                     f"({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {apart} | {pc['nodes_optimised']} / "
                     f"{pb['nodes_optimised']} | {100 * pc['matrix_share']:.0f}% / {100 * pb['matrix_share']:.0f}% | "
                     f"{floor} | **{_verdict(ok)}** |")
        if not ok:
            misses.append(r)
    lines.append("")
    for r in misses:
        b = int(r["batch"])
        pc, pb = r["profile"]["companion"], r["profile"]["baseline"]
        base = "the forward graph" if r["baseline"] == "forward" else "the jax2onnx graph"
        head = (f"- *{r['workload']} {BATCH_LABEL.get(b, b)}, companion ÷ {r['baseline']}: {r['ratio']:.2f}× against "
                f"{r['limit']}× ({r['ratio'] / r['limit'] - 1:+.0%}; rounds {r['ratio_min']:.2f}–"
                f"{r['ratio_max']:.2f}×).*")
        if b < 1000:
            lines.append(f"{head} The companion graph runs {pc['nodes_optimised']} nodes after onnxruntime's "
                         f"optimiser, {base} {pb['nodes_optimised']} (`python -m benchmarks.node_cost` measures what "
                         f"one node costs at this size).")
            continue
        rest = sorted(((k, v) for k, v in pc["share"].items() if k not in MATRIX_OPS), key=lambda kv: -kv[1])
        top = ", ".join(f"{k} {100 * v:.0f}%" for k, v in rest[:5])
        text = (f"{head} The companion graph spends {100 * pc['matrix_share']:.0f}% of its kernel time in matrix "
                f"products ({base}: {100 * pb['matrix_share']:.0f}%); the rest is {top}. With those other nodes free "
                f"it would be at {r['floor']:.2f}×")
        if r["floor"] > r["limit"]:
            text += ", above the target: no change to the other nodes meets it; the matrix products would have to."
        else:
            need = (r["limit"] - r["floor"]) / (r["ratio"] - r["floor"])
            text += f"; the target needs them at {100 * need:.0f}% of their present time."
        lines.append(text)
    if misses:
        lines.append("")
    return lines


def _why(res, w, b, p):
    r = res.get(w, b, p)
    if r is None:
        return "not run"
    if r["status"] == "ok" and r.get("median_s") is None:
        return "not timed (timing disabled)"
    return f"not measured ({r['status']}: {r.get('reason')})" if r["status"] != "ok" else None


def section_targets(res):
    lines = ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    for t, m, v in targets(res):
        vv = f"**{v}**" if v in ("met", "not met") else v
        lines.append(f"| {t} | {m} | {vv} |")
    lines.append("")
    return lines


def section_overheads(res):
    """Fixed costs per call at batch 1: what the Python wrappers add to the graph or the C call."""
    lines = ["## Where the time goes at batch 1", "",
             "The same call with and without the Python layer, measured in the same run: `Partials.jacobian` against "
             "the bare onnxruntime session on the same companion graph (input validation, chunking, output copies), "
             "and `Kernel.jacobian` against the C program calling `nnp_jacobian` (input validation, cffi, "
             "allocation of the outputs).", "",
             "| workload | ORT forward only | companion graph (auto mode) | Partials.jacobian | wrapper adds | "
             "C alone | Kernel.jacobian | wrapper adds |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    b = 1
    if b not in res.batches:
        return []
    for w in res.workloads:
        ap = res.auto_path(w)
        tg, tp = res.t(w, b, ap), res.t(w, b, "partials")
        tc, tk = res.t(w, b, "c_alone"), res.t(w, b, "c_kernel")
        lines.append(f"| {w} | {fmt_time(res.t(w, b, 'ort_forward'))} | {fmt_time(tg)} | {fmt_time(tp)} | "
                     f"{fmt_time(tp - tg) if tp is not None and tg is not None else '—'} | {fmt_time(tc)} | "
                     f"{fmt_time(tk)} | {fmt_time(tk - tc) if tk is not None and tc is not None else '—'} |")
    lines.append("")
    return lines


def weight_notes(res):
    per = {}
    for r in res.rows.values():
        if r.get("note") and r.get("status") == "ok":
            per.setdefault(r["workload"], r["note"])
    if not per:
        return []
    return ["† C core weight file: " + "; ".join(f"{w}: {n}" for w, n in sorted(per.items())) + ". The suite then "
            "writes the same network with the C core's own writer (`nnpartials.exporter.nnp.write_nnp`, "
            "normalization folded into the first layer); the C paths are otherwise unchanged and pass the same "
            "agreement check.", ""]


def section_first_call(res):
    lines = ["## First-call cost", "",
             "Setup (session creation, `tf.function` / `jit` wrapping, kernel load) plus the first call (tracing, XLA "
             "compilation, allocation), per batch size; a new shape is a new trace for tf.function and jit. Not in "
             "the times per call above. Module imports are excluded. The one-off export of a bundle (tf2onnx "
             "conversion, Jacobian graph, validation against GradientTape on 1,000 points) is listed below.", ""]
    for w in res.workloads:
        lines.append(f"**{w}**")
        lines.append("")
        bs = res.batches_of(w)
        lines.append("| path | " + " | ".join(f"batch {BATCH_LABEL.get(b, b)}" for b in bs) + " |")
        lines.append("|---|" + "---:|" * len(bs))
        for p in res.paths(w, bs[0]):
            cells = []
            for b in bs:
                r = res.get(w, b, p)
                if r and r.get("first_call_s") is not None:
                    cells.append(fmt_time((r.get("setup_s") or 0) + r["first_call_s"]))
                else:
                    cells.append("—")
            lines.append(f"| {SHORT.get(p, p)} | " + " | ".join(cells) + " |")
        lines.append("")
    ex = res.data.get("exports", {})
    if ex:
        lines.append("Export (one-off, `nnpartials.export`, per workload and mode): " + ", ".join(
            f"{k} {v['seconds']:.1f} s" for k, v in sorted(ex.items())) + ".")
        lines.append("")
        lines.append("Graph sizes (ONNX nodes): " + "; ".join(
            f"{w}: forward graph {ex[f'{w}/forward']['nodes']['model.onnx']}, companion graph "
            f"{ex[f'{w}/forward']['nodes']['model.jac.onnx']} (forward mode) / "
            f"{ex[f'{w}/reverse']['nodes']['model.jac.onnx']} (reverse mode)"
            for w in res.workloads if f"{w}/forward" in ex and f"{w}/reverse" in ex and "nodes" in ex[f"{w}/forward"])
            + ".")
        lines.append("")
    return lines


def behind(res):
    """[(workload, batch, best nnpartials path, [(peer, ratio)], facts)] where a peer beats every nnpartials path."""
    out = []
    for w in res.workloads:
        for b in res.batches_of(w):
            bn = res.best_nnp(w, b)
            if bn is None:
                continue
            tb = res.t(w, b, bn)
            faster = []
            for p in res.paths(w, b):
                r = res.get(w, b, p)
                if r.get("family") == PEER and res.t(w, b, p) is not None and res.t(w, b, p) < tb:
                    faster.append((p, tb / res.t(w, b, p)))
            if faster:
                out.append((w, b, bn, sorted(faster, key=lambda x: -x[1])))
    return out


def _explain(res, w, b, bn, faster):
    """Facts from the same run that say where the time goes."""
    facts = []
    fp, ratio = faster[0]
    t_peer = res.t(w, b, fp)
    t_fwd = res.t(w, b, "ort_forward")
    if t_fwd is not None and t_fwd > t_peer:
        facts.append(f"onnxruntime's forward pass alone takes {fmt_time(t_fwd)}, more than {SHORT[fp]}'s whole "
                     f"y + dy/dx ({fmt_time(t_peer)}): the gap lies in how onnxruntime runs the same layers "
                     + ("(a fixed cost per call and per node at this size)" if b == 1 else
                        "(its matrix and elementwise kernels at this size)") + ", not in the derivative graph")
    elif t_fwd is not None:
        facts.append(f"the companion graph costs {res.t(w, b, res.auto_path(w)) / t_fwd:.2f}× onnxruntime's own "
                     f"forward pass ({fmt_time(t_fwd)})" if res.t(w, b, res.auto_path(w)) else "")
    gp, gb = res.gflops(w, b, fp), res.gflops(w, b, bn)
    if gp and gb:
        facts.append(f"{SHORT[fp]} sustains {gp:.3g} GFLOP/s on the counted work against {gb:.3g} for "
                     f"{SHORT[bn]}")
    tc = res.t(w, b, "c_alone")
    if tc is not None and bn != "c_alone":
        facts.append(f"the C core alone takes {fmt_time(tc)}")
    return [f for f in facts if f]


USER_PATHS = ("auto", "partials", "c_kernel")


def paths_behind(res):
    """[(workload, batch, [(path, ratio to the fastest peer)])] for the user-facing nnpartials paths (the companion
    graph a default export ships, Partials, Kernel) that are slower than the fastest peer."""
    out = []
    for w in res.workloads:
        for b in res.batches_of(w):
            slow = []
            for p in USER_PATHS:
                p = res.auto_path(w) if p == "auto" else p
                r = res.ratio_peer(w, b, p)
                if r is not None and r > 1.0:
                    slow.append((p, r))
            if slow:
                out.append((w, b, slow))
    return out


def section_behind(res):
    lines = ["## Where nnpartials is behind", ""]
    slow = paths_behind(res)
    items = behind(res)
    if slow:
        lines.append("User-facing nnpartials paths (the companion graph an auto-mode export ships, `Partials`, "
                     "`Kernel`) slower than the fastest peer, as time ÷ fastest peer: " + "; ".join(
                         f"{w} batch {BATCH_LABEL.get(b, b)}: " + ", ".join(f"{SHORT[p]} {fmt_ratio(r)}" for p, r in ps)
                         for w, b, ps in slow) + ".")
        lines.append("")
    if not items:
        lines += ["In this run, at every workload and batch size, some nnpartials path (companion graph, `Partials`, "
                  "or the C core) was at least as fast as every peer measured.", ""]
        return lines
    lines.append("Cases in this run where a peer beats every analytic nnpartials path (companion graph in either "
                 "mode, `Partials`, the C core from Python or from C), with facts from the same run:")
    lines.append("")
    for w, b, bn, faster in items:
        peers = ", ".join(f"{SHORT[p]} {fmt_time(res.t(w, b, p))} ({r:.2f}× faster)" for p, r in faster)
        tie = " Within 10%: level at this run's noise." if faster[0][1] < TIE else ""
        facts = _explain(res, w, b, bn, faster)
        lines.append(f"- **{w}, batch {BATCH_LABEL.get(b, b)}**: best nnpartials path {SHORT[bn]} "
                     f"{fmt_time(res.t(w, b, bn))}; faster: {peers}.{tie}"
                     + (" " + "; ".join(f[0].upper() + f[1:] for f in facts[:1])
                        + ("; " + "; ".join(facts[1:]) if facts[1:] else "") + "." if facts else ""))
    lines.append("")
    return lines


def _count(n):
    return {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}.get(n, str(n))


def render(data, out_dir, command, notes_path=None):
    res = Results(data)
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "ratios.png")
    chart_ok = chart(res, png)
    lines = ["# nnpartials benchmark results", ""]
    lines.append(f"y and all partial derivatives dy_i/dx_j of {_count(len(res.workloads))} networks, per call, on the "
                 "machine below. "
                 "Reproduce with `python -m benchmarks.report` (see `benchmarks/README.md`).")
    if res.machine.get("tiny"):
        lines.append("")
        lines.append("**Tiny run (CI smoke): sizes reduced, timing disabled; no number here is a measurement.**")
    lines.append("")
    lines += ["## Summary", ""] + summary_table(res) + [""]
    lines += section_targets(res)
    lines += section_paired(res)
    if chart_ok:
        lines += ["![time per call ÷ fastest peer, per workload and batch size (log scale)](ratios.png)", ""]
    lines += section_tables(res)
    lines += weight_notes(res)
    lines += section_overheads(res)
    lines += section_first_call(res)
    lines += section_flops(res)
    lines += section_machine(res, command)
    lines += section_behind(res)
    if notes_path and os.path.exists(notes_path) and not res.machine.get("tiny"):
        with open(notes_path) as f:
            lines += [f.read().rstrip(), ""]
    path = os.path.join(out_dir, "RESULTS.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


# ----- chart ------------------------------------------------------------------------------------------------
COLORS = {"floor": "#9e9e9e", "nnpartials": "#1f77b4", "check": "#9ecae1", "peer": "#ff7f0e"}


def chart(res, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return False
    ws = res.workloads
    ncols = max((len(res.batches_of(w)) for w in ws), default=0)
    if not ws or not ncols:
        return False
    fig, axes = plt.subplots(len(ws), ncols, figsize=(5.2 * ncols, 0.42 * len(PATH_ORDER) * len(ws) + 1.2),
                             squeeze=False, sharey="row")
    allv = [res.ratio_peer(w, b, p) for w in ws for b in res.batches_of(w) for p in PATH_ORDER]
    allv = [v for v in allv if v]
    lo = min(allv + [0.5]) / 2.5
    hi = max(allv + [2.0]) * 4
    from matplotlib.ticker import LogLocator, NullFormatter

    for i, w in enumerate(ws):
        bs = res.batches_of(w)
        for j in range(len(bs), ncols):  # a workload with fewer batch sizes than the widest row
            axes[i][j].set_visible(False)
        for j, b in enumerate(bs):
            ax = axes[i][j]
            names = list(PATH_ORDER)
            ypos = range(len(names))
            for y, p in zip(ypos, names):
                v = res.ratio_peer(w, b, p)
                r = res.get(w, b, p)
                fam = (r or {}).get("family", "peer")
                if v:
                    # bars grow from the fastest peer (1.0): to the left is faster, to the right slower
                    ax.barh(y, v - 1.0, left=1.0, color=COLORS.get(fam, "#777"), height=0.7)
                    ax.text(max(v, 1.0) * 1.12, y, fmt_ratio(v), va="center", fontsize=7)
                else:
                    why = "skipped" if r and r["status"] == "skipped" else "failed" if r and r["status"] == "failed" \
                        else "n/a" if r and r["status"] == "n/a" else "not timed" if r else "—"
                    ax.text(1.12, y, why, va="center", fontsize=7, color="#777")
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            ax.xaxis.set_major_locator(LogLocator(base=10))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yticks(list(ypos))
            ax.set_yticklabels([SHORT[p] for p in names], fontsize=7)
            ax.set_ylim(len(names) - 0.5, -0.5)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="x", which="major", color="#ddd", lw=0.6)
            ax.set_axisbelow(True)
            ax.set_title(f"{w}, batch {BATCH_LABEL.get(b, b)}", fontsize=9)
            if i == len(ws) - 1:
                ax.set_xlabel("time per call ÷ fastest peer (log; left of 1 = faster)", fontsize=8)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=COLORS[k], label=lab) for k, lab in
                        (("nnpartials", "nnpartials (analytic)"), ("check", "nnpartials finite differences"),
                         ("floor", "onnxruntime forward only"), ("peer", "peers"))],
               loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----- command line -----------------------------------------------------------------------------------------
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("--no-run", action="store_true", help="render from an existing record instead of running")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, timing disabled (checks the machinery)")
    ap.add_argument("--out-dir", default=HERE, help="where RESULTS.md, ratios.png and results.json go")
    ap.add_argument("--record", default=None, help="the JSON record (default: OUT_DIR/results.json)")
    ap.add_argument("--no-paired", action="store_true",
                    help="skip the paired measurement of the companion graph's ratios (benchmarks.paired)")
    ap.add_argument("--repasses", type=int, default=1,
                    help="re-measure groups disturbed by other processes up to this many times (default 1)")
    args = ap.parse_args(argv)
    record = args.record or os.path.join(args.out_dir, "results.json")
    command = "python -m benchmarks.report" + (" --tiny" if args.tiny else "") + \
        (f" -- {' '.join(extra)}" if extra else "")
    if not args.no_run:
        record = os.path.abspath(record)
        rc = run_suite(record, command, tiny=args.tiny, extra=extra)
        if rc not in (0,):
            print(f"the benchmark suite exited with {rc}; rendering what was recorded", file=sys.stderr)
        if not args.tiny:
            remeasure(record, command, extra, args.repasses)
            if not args.no_paired:
                run_paired(record)
    with open(record) as f:
        data = json.load(f)
    command = data.get("machine", {}).get("report_command") or command
    path = render(data, args.out_dir, command, notes_path=os.path.join(HERE, "NOTES.md"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
