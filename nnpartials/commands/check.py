"""nnpartials check BUNDLE [--data points] [--n-points N]"""

from __future__ import annotations

NAME = "check"
HELP = "cross-check onnxruntime, the C core and float64 finite differences on a bundle"
DESCRIPTION = """\
Compute y and dy/dx in independent ways and compare them:

  * onnxruntime on the companion Jacobian graph (model.jac.onnx) and on the forward graph (model.onnx), float32:
    the two y must agree;
  * float64 central differences of the forward graph, evaluated by onnx's reference implementation in float64
    (Richardson-extrapolated, with an error estimate), against the companion graph's dy/dx;
  * when the bundle has a C core (model.nnp): its analytic y and dy/dx (float32) against onnxruntime, and both
    analytic Jacobians against the C core's own float64 central differences;
  * for a bundle exported with --order 2: the Hessian, Laplacian and Hessian-vector product graphs against float64
    central differences of the Jacobian graph, and (with a C core) the C core's analytic Hessian, Laplacian and
    Hessian-vector product against onnxruntime and against its own float64 finite differences. A piecewise-linear
    network's second derivatives are zero almost everywhere: the check says so.

Points: --data (a .csv with an optional header naming the model's columns, or a .npy [N, n_in]); otherwise
--n-points N points drawn uniformly from the bundle's sample box (manifest.json). Finite-difference entries whose
error estimate shows a kink of a piecewise activation (ReLU and the like) within a step are left out of the
float64 comparisons and counted. Tolerances are the named ones in nnpartials.tolerances.

Exit status: 0 when every comparison is within tolerance, 1 otherwise (or on an error).
"""


def add_arguments(p):
    p.add_argument("bundle", help="bundle folder written by `nnpartials export`")
    p.add_argument("--data", metavar="POINTS", help="points to check at (.csv or .npy); default: the sample box")
    import argparse

    from nnpartials.cli import deprecated_alias, positive_int

    p.add_argument("--n-points", dest="points", type=positive_int, default=None, metavar="N",
                   help="number of points drawn from the sample box (default 1000; ignored with --data)")
    p.add_argument("--points", dest="points", type=positive_int, default=argparse.SUPPRESS,
                   action=deprecated_alias("--n-points"), help=argparse.SUPPRESS)  # old name of --n-points
    p.add_argument("--seed", type=int, default=0, help="seed for the drawn points (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (written whole or not at all)")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing --json file")


def run(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from nnpartials.errors import InputError
    from nnpartials.bundle import load_bundle
    from nnpartials.runtime.check import DEFAULT_POINTS, check_bundle

    if args.json:
        from nnpartials.io import check_output_path

        check_output_path(args.json, (".json",), overwrite=args.force)
    b = load_bundle(args.bundle)
    x = None
    if args.data:
        from nnpartials.io import read_points

        x = read_points(args.data, b.input_columns)
    n = DEFAULT_POINTS if args.points is None else args.points
    if n < 1:
        raise InputError(f"--points must be positive, got {n}")
    rep = check_bundle(b, x=x, n_points=n, seed=args.seed)

    console = Console()
    table = Table(title=f"{rep.bundle}: {rep.n_points} points ({rep.points_from}), "
                        f"{rep.n_out} output(s) x {rep.n_in} input(s)")
    for col, just in (("comparison", "left"), ("max |diff|", "right"), ("scaled", "right"),
                      ("tolerance", "left"), ("", "left")):
        table.add_column(col, justify=just)
    for c in rep.comparisons:
        table.add_row(f"{c.quantity}: {c.tested} vs {c.reference}", f"{c.max_abs:.3g}", f"{c.max_rel:.3g}",
                      f"{c.tolerance:g} {c.tolerance_name}", "[green]ok[/green]" if c.ok else "[red]FAIL[/red]")
    console.print(table)
    console.print(f"float64 FD of model.onnx: error estimate max {rep.fd_error_max:.3g}, median "
                  f"{rep.fd_error_median:.3g}; {rep.fd_entries_near_kink} of {rep.fd_entries} entries next to a kink "
                  f"(left out of the comparisons with it)")
    if rep.c_core:
        console.print(f"float64 FD of the C core: error estimate max {rep.c_fd_error_max:.3g}, median "
                      f"{rep.c_fd_error_median:.3g}; {rep.c_fd_entries_near_kink} of {rep.fd_entries} entries next "
                      f"to a kink")
    else:
        console.print(f"no C core in this bundle ({rep.c_core_reason or 'model.nnp absent'}): onnxruntime checked "
                      f"against the float64 reference only")
    if rep.order == 2:
        console.print(f"float64 FD of model.jac.onnx (second derivatives): {rep.hessian_fd_entries_near_kink} of "
                      f"{rep.hessian_fd_entries} entries next to a kink (left out)")
        if rep.second_derivatives_vanish:
            console.print(f"[yellow]note[/yellow]: {rep.second_order_note}; a zero Hessian or Laplacian here is the "
                          f"network's true value, not a failure (a smooth activation such as tanh gives nonzero "
                          f"second derivatives)")
    console.print("scaled = max |diff| / max(1, max |reference|)")
    if args.json:
        from nnpartials.io import atomic_output

        with atomic_output(args.json, "w", overwrite=args.force) as f:
            json.dump(rep.to_dict(), f, indent=2)
    if rep.ok:
        console.print("[green]all paths agree within tolerance[/green]")
        return 0
    console.print("[red]the paths disagree beyond tolerance[/red]")
    return 1
