"""nnpartials partials BUNDLE --input points --output partials"""

from __future__ import annotations

NAME = "partials"
HELP = "compute y and dy/dx for a table of points with a bundle (onnxruntime or the C core)"
DESCRIPTION = """\
Compute the outputs and all partial derivatives dy_i/dx_j at every point of a table.

Input: .csv (optionally with a header naming the model's columns, see manifest.json) or .npy [N, n_in].
Output: .csv (inputs, outputs and a column d<y>/d<x> per partial), .npy (dy_dx [N, n_out, n_in])
or .npz (x, y, dy_dx). Large inputs are processed in chunks with a progress bar.

The output is checked before any work (extension, existing and writable folder) and written all at once:
to a hidden temporary file next to it (.NAME.partial-XXXX), renamed to NAME only when complete, removed if
the run fails or is interrupted. An existing output file is left alone unless -f/--force is given.
"""


def add_arguments(p):
    from nnpartials.cli import positive_int

    p.add_argument("bundle", help="bundle folder written by `nnpartials export`")
    p.add_argument("-i", "--input", required=True, metavar="POINTS", help="points (.csv or .npy)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="partials (.csv, .npy or .npz)")
    p.add_argument("-f", "--force", action="store_true", help="replace the output file if it exists")
    p.add_argument("--backend", choices=("onnxruntime", "c"), default="onnxruntime", help="evaluation path")
    p.add_argument("--providers", default="cpu", help="onnxruntime providers: cpu, cuda, or a comma list")
    p.add_argument("--chunk", type=positive_int, default=65536, metavar="N",
                   help="points per call (bounds memory; default 65536)")
    p.add_argument("--nan-policy", choices=("raise", "propagate"), default="raise",
                   help="reject NaN/Inf inputs (default) or pass them through")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from nnpartials.io import check_output_path, read_points, write_partials
    from nnpartials.runtime.serve import Partials
    from nnpartials.validate import as_batch

    check_output_path(args.output, overwrite=args.force)  # before any work: a bad output fails in a second
    providers = args.providers
    if providers not in ("cpu", "cuda"):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    p = Partials(args.bundle, providers=providers if args.backend == "onnxruntime" else None,
                 backend=args.backend, max_batch=args.chunk, nan_policy=args.nan_policy)
    x = as_batch(read_points(args.input, p.input_columns), p.n_in, name=args.input, nan_policy=args.nan_policy)
    n = x.shape[0]
    y = np.empty((n, p.n_out), np.float32)
    dy = np.empty((n, p.n_out, p.n_in), np.float32)
    show = not args.no_progress and n > args.chunk
    with Progress(TextColumn("partials"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not show, transient=True) as bar:
        task = bar.add_task("partials", total=n)
        for s in range(0, n, args.chunk):
            y[s:s + args.chunk], dy[s:s + args.chunk] = p.jacobian(x[s:s + args.chunk])
            bar.update(task, advance=min(args.chunk, n - s))
    write_partials(args.output, x, y, dy, p.input_columns, p.output_columns, overwrite=args.force)
    print(f"wrote {args.output}: {n} points, {p.n_out} output(s) x {p.n_in} input(s)")
    return 0
