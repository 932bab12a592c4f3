"""nnpartials demo [--out DIR] [--quick]"""

from __future__ import annotations

NAME = "demo"
HELP = "train the network of the x2 = 1.5·x1 question, compute and diagnose its partials, write a report"
DESCRIPTION = """\
Why GradientTape's dy/dx1 of a network trained on x2 = 1.5·x1 does not match cos(x1).

Scenario 1 trains the question's Keras MLP on x1 = linspace(0, 6π, 2000), x2 = 1.5·x1,
y = sin(x1) + cos(x2); exports the bundle; computes the partials with onnxruntime; cross-checks them
with GradientTape and the C core's finite differences; and diagnoses them: which partials, and whether
the derivative along (1, 1.5), the data identify. Scenario 2 trains the same network on independent
(x1, x2). For each scenario the report states separately whether a quantity is identified (from the
rank of the training inputs) and how accurately it was learned (its RMS and largest error against
the analytic truth, graded with the thresholds in nnpartials/demo_config.py).

Both bundles are exported with second derivatives (order 2): the report compares the Hessian along the
line (onnxruntime, cross-checked with nested GradientTape) with -sin(x1), -cos(x2) and 0, and the second
derivative along the data line with -sin t - 2.25 cos 1.5t, and says that the network's LeakyReLU
activations make its second derivatives zero almost everywhere.

Writes DIR/report.md, PNG plots, summary.json and both bundles. Run time is measured in README.md
("The demo" section): minutes for the default run on two CPU cores, well under one for --quick
(fewer epochs and points, x1 in [0, 2π], no ensemble).
"""


def add_arguments(p):
    from nnpartials.demo_config import (DEFAULT_ENSEMBLE, DEFAULT_EPOCHS, DEFAULT_LINE_POINTS, DEFAULT_OUT,
                                        DEFAULT_RANDOM_POINTS, DEFAULT_SEED, X1_MAX_PI)

    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"report folder (default {DEFAULT_OUT}/)")
    p.add_argument("--quick", action="store_true", help="a small fast run (for tests and a first look)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--line-points", type=int, default=None,
                   help=f"points on the data line, scenario 1 (default {DEFAULT_LINE_POINTS})")
    p.add_argument("--random-points", type=int, default=None,
                   help=f"independent points, scenario 2 (default {DEFAULT_RANDOM_POINTS})")
    p.add_argument("--ensemble", type=int, default=None,
                   help=f"networks per scenario for the seed spread, 0 for none (default {DEFAULT_ENSEMBLE})")
    p.add_argument("--x1-max-pi", type=float, default=None,
                   help=f"x1 ranges over [0, X·π] and x2 over [0, 1.5·X·π] (default {X1_MAX_PI:g})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"training seed (default {DEFAULT_SEED})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args) -> int:
    from nnpartials.demo import run_demo
    from nnpartials.demo_config import DemoConfig

    cfg = DemoConfig.quick_config() if args.quick else DemoConfig()
    cfg.out = args.out
    for name in ("epochs", "line_points", "random_points", "ensemble", "x1_max_pi"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    cfg.seed = args.seed
    cfg.progress = not args.no_progress
    cfg.plots = not args.no_plots
    result = run_demo(cfg)
    ok = all(c["passed"] for s in result.scenarios for c in s.checks.values() if c.get("available", True))
    return 0 if ok else 1
