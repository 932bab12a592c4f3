"""Forward and Jacobian calls alternated on the same model: what the other session's spinning threads cost a Jacobian.

    python -m benchmarks.mixed_load                  # batch 100,000, seed and physics networks; writes
                                                     # benchmarks/MIXED_LOAD.md and benchmarks/mixed_load.json
    python -m benchmarks.mixed_load --quick --out-dir /tmp/m   # tiny sizes (checks the machinery; the smoke test)

An onnxruntime session's thread pool spins for a while after each call. A caller that alternates forward and
Jacobian calls holds two sessions, and the one that just ran keeps its threads spinning on the cores the other one
needs. ``Partials`` rebuilds both sessions once with ``session.force_spinning_stop`` after
``ALTERNATIONS_BEFORE_QUIET`` changes of kind (``runtime/serve.py``); a caller of one kind keeps spinning sessions.

Timed in one run, per workload (the suite's seed and physics networks, bundles exported in auto mode, as the
benchmark suite exports them), each a time per Jacobian call on the whole batch:

* ``bare``: two ``onnxruntime.InferenceSession`` made as ``Partials`` makes them before the fix applies
  (``ORT_ENABLE_ALL``, onnxruntime's default thread count, CPU provider), from the bundle's ``model.onnx`` and
  ``model.jac.onnx``: the baseline that shows the problem;
* ``bare, force_spinning_stop``: the same two sessions with ``session.force_spinning_stop`` (what the fix switches
  to);
* ``Partials``: ``nnpartials.Partials(bundle, max_batch=batch)`` (one onnxruntime call per Jacobian, as the bare
  session; the fix included). Its "alone" object only ever computes Jacobians; its "alternated" object has
  alternated before timing starts, so its sessions have been rebuilt.

"alone": Jacobian calls back to back. "alternated": a forward call, then the timed Jacobian call, repeated (the
forward calls are timed too, separately). Each configuration runs in blocks of ``--calls`` timed calls after one
untimed warm-up; a round is one block of every configuration in turn, with a pause of 0.2 s before each block (no
spinning thread of the previous block left), after waiting (at most 10 s, 240 s in all) for other processes to use
less than 15% of the machine. A round is quiet when other processes used at most 15% of the machine during each of
its blocks (``benchmarks/contention.py``); rounds run until ``--reps`` of them were quiet (seed 5, physics 3), at
most three times that many. Reported: the median over the timed calls of the quiet rounds (of all rounds, and said
so, when none was quiet), and the ratios alternated / alone and Partials alone / bare alone (what a caller of one
kind pays for the wrapper and the fix). Benchmarks are not tests: nothing here fails on a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import standalone
from benchmarks.contention import Meter, QuietGate

WORKLOADS = ("seed", "physics")
CONFIGS = (
    ("bare", "alone"), ("bare", "alternated"),
    ("bare_quiet", "alone"), ("bare_quiet", "alternated"),
    ("partials", "alone"), ("partials", "alternated"),
)
LABEL = {
    "bare": "two bare onnxruntime sessions, made as Partials makes them (no fix)",
    "bare_quiet": "two bare onnxruntime sessions with session.force_spinning_stop",
    "partials": "nnpartials.Partials (with the fix)",
}
PAUSE_S = 0.2
#: A round (one block of every configuration) counts as quiet when other processes used at most this share of the
#: machine during each of its blocks; rounds run until ``--reps`` of them were quiet, at most this many times --reps.
QUIET = 0.15
MAX_ROUNDS_FACTOR = 3
#: Blocks and timed calls per block by workload (a physics Jacobian at batch 100,000 takes about 0.7 s).
DEFAULT_REPS = {"seed": (5, 4), "physics": (3, 3)}


def _bare_sessions(path, quiet):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as Partials._make_sessions
    if quiet:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    sess = {k: ort.InferenceSession(os.path.join(path, f), sess_options=so, providers=["CPUExecutionProvider"])
            for k, f in (("forward", "model.onnx"), ("jacobian", "model.jac.onnx"))}
    name = sess["jacobian"].get_inputs()[0].name
    return (lambda x: sess["forward"].run(None, {name: x}), lambda x: sess["jacobian"].run(None, {name: x}))


def _callers(path, batch):
    """(forward, jacobian) callables per path; the 'alternated' Partials has already alternated."""
    import nnpartials
    from nnpartials.runtime import serve

    out = {"bare": _bare_sessions(path, False), "bare_quiet": _bare_sessions(path, True)}
    alone = nnpartials.Partials(path, max_batch=batch)
    alt = nnpartials.Partials(path, max_batch=batch)
    out[("partials", "alone")] = (alone.forward, alone.jacobian)
    out[("partials", "alternated")] = (alt.forward, alt.jacobian)
    return out, alone, alt, serve.ALTERNATIONS_BEFORE_QUIET


def _block(fwd, jac, x, kind, calls):
    """One block: a pause, one untimed warm-up, then ``calls`` timed Jacobian calls (each after a timed forward call
    when ``kind`` is "alternated"). Returns (Jacobian times, forward times)."""
    perf = time.perf_counter
    time.sleep(PAUSE_S)
    if kind == "alternated":
        fwd(x)
    jac(x)
    tj, tf = [], []
    for _ in range(calls):
        if kind == "alternated":
            t0 = perf()
            fwd(x)
            tf.append(perf() - t0)
        t0 = perf()
        jac(x)
        tj.append(perf() - t0)
    return tj, tf


def measure(name, batch, reps, calls, gate, log=print, max_rounds=None):
    path = standalone.bundle(name, log=log)
    x = standalone.inputs(name, batch)
    callers, alone, alt, quiet_after = _callers(path, batch)
    # the same numbers from every path (Partials makes one onnxruntime call per Jacobian here, as the bare session)
    ref = callers["bare"][1](x)
    for key in ("bare_quiet", ("partials", "alone"), ("partials", "alternated")):
        got = callers[key][1](x)
        if not (np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])):
            raise AssertionError(f"{name}: {key} disagrees with the bare session")
    for _ in range(quiet_after):  # the 'alternated' Partials rebuilds its sessions here, before any timing
        alt.forward(x)
        alt.jacobian(x)
    rounds = []  # each: {config: (Jacobian times, forward times, others' share during the block)}
    waited = gate.wait()
    with Meter() as whole:
        while sum(map(_quiet, rounds)) < reps and len(rounds) < (max_rounds or reps * MAX_ROUNDS_FACTOR):
            rd = {}
            for path_name, kind in CONFIGS:
                f, j = callers[(path_name, kind)] if path_name == "partials" else callers[path_name]
                waited += gate.wait()  # a quiet moment before each block, within the gate's budget
                with Meter() as m:
                    tj, tf = _block(f, j, x, kind, calls)
                rd[(path_name, kind)] = (tj, tf, m.others)
            rounds.append(rd)
            log(f"  {name}: round {len(rounds)} ({'quiet' if _quiet(rd) else 'disturbed'}; "
                f"{sum(map(_quiet, rounds))} of {reps} quiet rounds)")
    used = [rd for rd in rounds if _quiet(rd)] or rounds
    rows = []
    for c in CONFIGS:
        tj = [t for rd in used for t in rd[c][0]]
        tf = [t for rd in used for t in rd[c][1]]
        o = [rd[c][2] for rd in used if rd[c][2] is not None]
        rows.append({"path": c[0], "label": LABEL[c[0]], "calls": c[1], "jacobian_median_s": _median(tj),
                     "jacobian_min_s": min(tj), "jacobian_max_s": max(tj), "jacobian_samples_s": tj,
                     "forward_median_s": _median(tf) if tf else None, "timed_calls": len(tj),
                     "others_cpu_max": max(o) if o else None,
                     "all_rounds": [{"jacobian_s": rd[c][0], "forward_s": rd[c][1], "others_cpu": rd[c][2]}
                                    for rd in rounds]})
    t = {(r["path"], r["calls"]): r["jacobian_median_s"] for r in rows}
    ratios = {p: t[(p, "alternated")] / t[(p, "alone")] for p in LABEL}
    return {"workload": name, "batch": batch, "bundle": path, "reps": reps, "calls_per_block": calls,
            "rounds_run": len(rounds), "quiet_rounds": sum(map(_quiet, rounds)),
            "rounds_used": "quiet" if any(map(_quiet, rounds)) else "all (none was quiet)",
            "partials_rebuilt": bool(alt._quiet), "partials_alone_rebuilt": bool(alone._quiet),
            "alternations_before_quiet": quiet_after, "rows": rows,
            "alternated_over_alone": ratios,
            "partials_alone_over_bare_alone": t[("partials", "alone")] / t[("bare", "alone")],
            "partials_alternated_over_bare_alone": t[("partials", "alternated")] / t[("bare", "alone")],
            "quiet_wait_s": waited, "others_cpu": whole.others, "wall_s": whole.wall,
            "loadavg_after": standalone.loadavg()}


def _quiet(rd) -> bool:
    """A round during each of whose blocks other processes used at most QUIET of the machine."""
    return all(o is not None and o <= QUIET for _, _, o in rd.values())


def _median(v):
    return float(np.median(v)) if v else None


def _ms(s):
    return "—" if s is None else f"{s * 1e3:.1f} ms"


def _pct(v):
    return "—" if v is None else f"{100 * v:.0f}%"


def render(data, out_md, command):
    m = data["machine"]
    lines = ["# Mixed load: forward and Jacobian calls alternated", "",
             f"Written by `{command}` (`benchmarks/mixed_load.py`; its docstring says what is timed and how). Times "
             "are per Jacobian call on the whole batch, medians over the timed calls of the quiet rounds (each "
             "workload's section says how many), all from one run; ratios compare configurations of that run.", ""]
    if data.get("quick"):
        lines += ["**Quick run** (`--quick`): tiny sizes, for checking the machinery; the numbers mean nothing.", ""]
    lines += ["## Machine and load", ""] + standalone.machine_lines(
        m, [x["others_cpu"] for r in data["results"] for row in r["rows"] for x in row["all_rounds"]])
    lines.append("- onnxruntime sessions: CPU provider, `ORT_ENABLE_ALL`, onnxruntime's default thread count "
                 "(what `Partials` uses when `threads` is not given)")
    lines.append("")
    for res in data["results"]:
        b = res["batch"]
        lines += [f"## {res['workload']} network, batch {b:,}", "",
                  f"{res['quiet_rounds']} of {res['rounds_run']} rounds were quiet (wanted {res['reps']}); medians "
                  f"over {'the quiet rounds' if res['rounds_used'] == 'quiet' else 'all rounds (none was quiet)'}: "
                  f"{res['rows'][0]['timed_calls']} timed Jacobian calls per configuration "
                  f"({res['calls_per_block']} per block).", "",
                  "| path | Jacobian alone | Jacobian alternated with forward | alternated ÷ alone | forward call "
                  "(alternated) | fastest / slowest Jacobian (alone; alternated) | others' CPU (max per block used) |",
                  "|---|---:|---:|---:|---:|---|---:|"]
        by = {(r["path"], r["calls"]): r for r in res["rows"]}
        for p in LABEL:
            a, alt = by[(p, "alone")], by[(p, "alternated")]
            lines.append(f"| {LABEL[p]} | {_ms(a['jacobian_median_s'])} | {_ms(alt['jacobian_median_s'])} | "
                         f"{res['alternated_over_alone'][p]:.2f}× | {_ms(alt['forward_median_s'])} | "
                         f"{_ms(a['jacobian_min_s'])} / {_ms(a['jacobian_max_s'])}; {_ms(alt['jacobian_min_s'])} / "
                         f"{_ms(alt['jacobian_max_s'])} | "
                         f"{_pct(max(a['others_cpu_max'] or 0, alt['others_cpu_max'] or 0))} |")
        r = res["alternated_over_alone"]
        lines += ["",
                  f"- Alternated ÷ alone: bare sessions {r['bare']:.2f}×, bare sessions with force_spinning_stop "
                  f"{r['bare_quiet']:.2f}×, Partials {r['partials']:.2f}×.",
                  f"- Jacobian alone through Partials ÷ through the bare session: "
                  f"{res['partials_alone_over_bare_alone']:.2f}× (a caller of one kind: Partials keeps spinning "
                  f"sessions; its rebuild {'did not happen' if not res['partials_alone_rebuilt'] else 'happened'}). "
                  f"Partials alternated ÷ bare session alone: {res['partials_alternated_over_bare_alone']:.2f}×.",
                  f"- The alternated Partials had rebuilt its sessions before timing: "
                  f"{'yes' if res['partials_rebuilt'] else 'no'} (after {res['alternations_before_quiet']} changes "
                  f"of kind). Other processes used {_pct(res['others_cpu'])} of the machine over this workload's "
                  f"{res['wall_s']:.0f} s (all rounds, waits included); load average (1 min) after it "
                  f"{res['loadavg_after'][0]:.2f}.", ""]
    with open(out_md, "w") as f:
        f.write("\n".join(lines))
    return out_md


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mixed_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="points per call (default 100,000; --quick: 2,000)")
    ap.add_argument("--reps", type=int, default=None,
                    help="quiet rounds wanted (default: seed 5, physics 3; --quick: 1 round, quiet or not)")
    ap.add_argument("--calls", type=int, default=None,
                    help="timed calls per block (default: seed 4, physics 3; --quick: 2)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list (default: seed,physics)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery, the numbers mean nothing")
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)),
                    help="where MIXED_LOAD.md and mixed_load.json go (default: benchmarks/)")
    args = ap.parse_args(argv)
    batch = args.batch or (2000 if args.quick else 100_000)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    command = "python -m benchmarks.mixed_load" + ("".join(f" {a}" for a in (argv if argv is not None
                                                                               else sys.argv[1:])))
    data = {"machine": standalone.machine(), "quick": args.quick, "command": command, "results": []}
    gate = QuietGate(per_case_s=0.0 if args.quick else 10.0, budget_s=0.0 if args.quick else 240.0)
    for name in names:
        reps = args.reps or (1 if args.quick else DEFAULT_REPS.get(name, (5, 4))[0])
        calls = args.calls or (2 if args.quick else DEFAULT_REPS.get(name, (5, 4))[1])
        print(f"{name}: batch {batch:,}, {reps} quiet rounds x {calls} calls per configuration wanted", flush=True)
        data["results"].append(measure(name, batch, reps, calls, gate, log=lambda s: print(s, flush=True),
                                       max_rounds=1 if args.quick else None))
    data["machine"]["loadavg_end"] = standalone.loadavg()
    data["machine"]["finished"] = standalone.now()
    os.makedirs(args.out_dir, exist_ok=True)
    standalone.write_json(os.path.join(args.out_dir, "mixed_load.json"), data)
    md = render(data, os.path.join(args.out_dir, "MIXED_LOAD.md"), command)
    print(f"wrote {md}")
    for res in data["results"]:
        r = res["alternated_over_alone"]
        print(f"{res['workload']}: alternated/alone bare {r['bare']:.2f}x, bare+force_spinning_stop "
              f"{r['bare_quiet']:.2f}x, Partials {r['partials']:.2f}x; Partials alone / bare alone "
              f"{res['partials_alone_over_bare_alone']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
