"""nnpartials diagnose BUNDLE --data train.{csv,npy} [--points query]"""

from __future__ import annotations

NAME = "diagnose"
HELP = "report which partials dy/dx_j the training data can identify (global rank, local rank per point)"
DESCRIPTION = """\
Identifiability diagnostics for a bundle's partial derivatives.

Global: singular values of the training inputs after the model's own normalisation (its Normalization
layer, from manifest.json; the data's standardisation when it has none), the effective rank, and the
directions (in input units) along which the data carry no information.

Local (with --points): per query point, the distance to the nearest training point, the rank of its
neighbourhood (local PCA of the nearest training points), the supported directions, and the partials
dy/dx_j at the point, each flagged as identified only where e_j lies in the span of the supported
directions and the point lies inside the data. Outside the data nothing is supported: local rank 0.

Training rows with a feature more than --outlier-z robust standard deviations from that feature's median
are outliers: they are listed and set aside, and everything else is computed from the remaining rows (one
gross outlier would otherwise dominate the largest singular value and hide every real direction). Spread
below the float32 resolution of the inputs (identical rows, a constant column divided by a tiny stored std)
counts as no spread.

--data and --points take .csv (header optional; named columns are matched to the model's) or .npy files;
--points also takes inline points such as '1,1.5;2,3' (features separated by ',', points by ';').

Second order (--order, default auto: on when the bundle was exported with `--order 2`): a second partial
d2y/dx_j dx_k is identified only where both e_j and e_k lie in the supported span (per query point, and
globally likewise), so on data along a line none of the axis-aligned second partials is, only the second
derivative along the line. With --points, the bundle's Hessian is evaluated at the points and shown with
each entry flagged, together with the second derivatives along the supported directions (d_a' H d_b). When
the bundle's second derivatives are zero almost everywhere (a piecewise-linear network: relu, leaky_relu,
...), the output says so instead of printing zeros. --order 2 refuses a bundle without second derivatives;
--order 1 leaves second order out.

Exit status: 0; with --fail-unidentified, 3 when some query point has an unidentified (first-order) partial.
"""


def add_arguments(p):
    from nnpartials.runtime.diagnostics import (DEFAULT_FAR_FACTOR, DEFAULT_LOCAL_RTOL, DEFAULT_NEIGHBORS,
                                                DEFAULT_OUTLIER_Z, DEFAULT_RANK_RTOL, DEFAULT_SPAN_TOL)

    p.add_argument("bundle", help="bundle folder written by `nnpartials export`")
    p.add_argument("--data", required=True, metavar="TRAIN", help="the training inputs (.csv or .npy)")
    p.add_argument("--points", metavar="QUERY", help="query points: .csv, .npy, or inline '1,1.5;2,3'")
    p.add_argument("--rank-rtol", type=float, default=DEFAULT_RANK_RTOL,
                   help="relative singular-value tolerance of the global rank: directions with s_i < rank_rtol * "
                        f"s_max carry no information (default {DEFAULT_RANK_RTOL:g})")
    p.add_argument("--local-rtol", type=float, default=DEFAULT_LOCAL_RTOL,
                   help=f"the same for the local PCA at each query point (default {DEFAULT_LOCAL_RTOL:g})")
    p.add_argument("--span-tol", type=float, default=DEFAULT_SPAN_TOL,
                   help="dy/dx_j is identified where the distance of e_j from the supported span (sine of the "
                        f"angle) is at most this (default {DEFAULT_SPAN_TOL:g})")
    p.add_argument("--far-factor", type=float, default=DEFAULT_FAR_FACTOR,
                   help="a point farther than this many typical neighbourhood radii from the nearest training "
                        f"point is outside the data (default {DEFAULT_FAR_FACTOR:g})")
    p.add_argument("--neighbors", type=int, default=None,
                   help=f"neighbourhood size of the local PCA (default {DEFAULT_NEIGHBORS}, at least 3*n_in+1)")
    p.add_argument("--outlier-z", type=float, default=DEFAULT_OUTLIER_Z, metavar="Z",
                   help="training rows with a feature more than Z robust std (median absolute deviation) from its "
                        f"median are outliers, listed and set aside (default {DEFAULT_OUTLIER_Z:g}; 'inf' keeps every "
                        "row)")
    p.add_argument("--max-rows", type=int, default=20, help="query points shown in the table (default 20)")
    p.add_argument("--json", metavar="FILE", help="also write the full diagnosis as JSON (written whole or not at all)")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing --json file")
    p.add_argument("--no-partials", action="store_true", help="do not evaluate the partials at the query points")
    p.add_argument("--fail-unidentified", action="store_true",
                   help="exit with status 3 when a partial dy/dx_j is not identified at some query point")
    p.add_argument("--order", choices=("auto", "1", "2"), default="auto",
                   help="second partials d2y/dx_j dx_k too: 'auto' (default) when the bundle was exported with "
                        "--order 2, '2' always (an error for a bundle without second derivatives), '1' never")


def parse_points(text: str, columns):
    """A points argument: an existing .csv/.npy file, or inline numbers '1,1.5;2,3'."""
    import os

    import numpy as np

    from nnpartials.errors import InputError
    from nnpartials.io import read_points

    if os.path.exists(text) or text.lower().endswith((".csv", ".npy", ".npz", ".txt")):
        return read_points(text, columns)
    rows = [r for r in text.replace("\n", ";").split(";") if r.strip()]
    try:
        data = [[float(v) for v in r.replace(" ", ",").split(",") if v.strip()] for r in rows]
    except ValueError:
        raise InputError(f"--points: {text!r} is neither a file nor inline numbers like '1,1.5;2,3'") from None
    widths = {len(r) for r in data}
    if len(widths) != 1:
        raise InputError(f"--points: inline points have different numbers of features: {sorted(widths)}")
    return np.asarray(data, dtype=np.float64)


def run(args) -> int:
    import json

    from rich.console import Console

    from nnpartials.bundle import load_bundle
    from nnpartials.io import read_points
    from nnpartials.runtime.diagnostics import diagnose

    if args.json:
        from nnpartials.io import check_output_path

        check_output_path(args.json, (".json",), overwrite=args.force)
    bundle = load_bundle(args.bundle)
    order = getattr(args, "order", "auto")
    if order == "2" and bundle.order < 2:
        from nnpartials.errors import OrderNotAvailableError

        raise OrderNotAvailableError(f"--order 2: bundle {bundle.path!r} was exported without second derivatives; "
                                     "export it again with `nnpartials export MODEL -o BUNDLE --order 2`")
    second_order = order == "2" or (order == "auto" and bundle.order >= 2)
    columns = bundle.input_columns
    train = read_points(args.data, columns)
    query = parse_points(args.points, columns) if args.points else None
    diag = diagnose(train, query, bundle=None if args.no_partials else bundle, normalization=bundle,
                    rank_rtol=args.rank_rtol, local_rtol=args.local_rtol, span_tol=args.span_tol,
                    far_factor=args.far_factor, neighbors=args.neighbors, input_names=columns,
                    outlier_z=args.outlier_z, second_order=second_order)
    console = Console()
    for table in diag.rich_tables(max_points=max(0, args.max_rows)):
        console.print(table)
    console.print(diag.summary(), highlight=False)
    if args.json:
        from nnpartials.io import atomic_output

        with atomic_output(args.json, "w", overwrite=args.force) as fh:
            json.dump(diag.to_dict(), fh, indent=1)
            fh.write("\n")
        console.print(f"wrote {args.json}")
    if args.fail_unidentified and diag.local is not None and not diag.local.identified.all():
        return 3
    return 0
