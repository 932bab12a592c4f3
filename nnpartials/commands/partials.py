"""nnpartials partials BUNDLE --input points --output partials"""

from __future__ import annotations

NAME = "partials"
HELP = "compute y and dy/dx for a table of points with a bundle (onnxruntime or the C core)"
DESCRIPTION = """\
Compute the outputs and all partial derivatives dy_i/dx_j at every point of a table.

Input: .csv (optionally with a header naming the model's columns, see manifest.json), .npy [N, n_in], or
Parquet: a .parquet file, a folder of .parquet files, or a glob ('data/*.parquet', quoted); Parquet columns
are matched to the model's columns by name (any order, extra columns ignored) and must be numbers.
Output: .csv (inputs, outputs and a column d<y>/d<x> per partial), .npy (dy_dx [N, n_out, n_in]),
.npz (x, y, dy_dx) or .parquet (the CSV's columns). With --order 2 (a bundle exported with --order 2): also
the second partials, one column d2<y>/d<x_j>d<x_k> per output and j <= k (the Hessian is symmetric) in .csv
and .parquet, d2y_dx2 [N, n_out, n_in, n_in] in .npz, and only d2y_dx2 in .npy. Large inputs are processed in
batches with a progress bar; Parquet is read and written in batches of 65,536 rows (or --chunk), so memory stays
bounded for any input size. Each onnxruntime call gets at most --chunk points; by default as many as keep the
graph's tensors within 64 MiB (1,024 to 65,536 points), which is also faster than larger calls.

With --workers N (a local Dask cluster of N processes) or --scheduler ADDRESS (an existing Dask cluster),
Parquet in and out only, the chunks are computed in parallel and OUT is a folder of part files
(part.0.parquet, ...; numbered with equal widths, part.00 ... part.19), a Parquet dataset that pandas, pyarrow and Dask read like one file. With a remote
scheduler the bundle, the input and the output folder must be at the same paths on every worker.

The output is checked before any work (extension, existing and writable folder) and written all at once:
to a hidden temporary file (or folder) next to it (.NAME.partial-XXXX), renamed to NAME only when complete,
removed if the run fails or is interrupted. An existing output is left alone unless -f/--force is given.
"""


def add_arguments(p):
    from nnpartials.cli import positive_int

    p.add_argument("bundle", help="bundle folder written by `nnpartials export`")
    p.add_argument("-i", "--input", required=True, metavar="POINTS",
                   help="points (.csv, .npy, or Parquet: a .parquet file, a folder of them, or a glob)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="partials (.csv, .npy, .npz or .parquet)")
    p.add_argument("-f", "--force", action="store_true", help="replace the output if it exists")
    p.add_argument("--backend", choices=("onnxruntime", "c"), default="onnxruntime", help="evaluation path")
    p.add_argument("--providers", default="cpu", help="onnxruntime providers: cpu, cuda, or a comma list")
    p.add_argument("--chunk", type=positive_int, default=None, metavar="N",
                   help="points per call and rows per batch (bounds memory; default: per call, chosen from the "
                        "graph's size, at most 65536; per batch, 65536)")
    p.add_argument("--order", type=int, choices=(1, 2), default=1,
                   help="1: y and dy/dx (default); 2: also the second partials (Hessian)")
    p.add_argument("--nan-policy", choices=("raise", "propagate"), default="raise",
                   help="reject NaN/Inf inputs (default) or pass them through")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, metavar="N",
                       help="compute on a local Dask cluster of N worker processes (Parquet in and out; "
                            "OUT is a folder of part files)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="compute on an existing Dask cluster (tcp://host:8786; Parquet in and out)")


def _providers(args):
    providers = args.providers
    if providers not in ("cpu", "cuda"):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    return providers if args.backend == "onnxruntime" else None


def _progress(show):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("partials"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not show, transient=True)


def _evaluate(p, pts, order):
    """``(y, dy_dx, d2y_dx2 or None)`` for one batch."""
    if order == 2:
        return p.hessian(pts)
    y, dy = p.jacobian(pts)
    return y, dy, None


#: Rows per batch read, computed and written when --chunk is not given (each onnxruntime call within a batch gets
#: Partials' own choice of points, Partials.auto_batch_limit).
BATCH_ROWS = 65536


def _rows(args):
    return args.chunk or BATCH_ROWS


def _open(args):
    from nnpartials.runtime.serve import Partials

    p = Partials(args.bundle, providers=_providers(args), backend=args.backend, max_batch=args.chunk,
                 nan_policy=args.nan_policy)
    if args.order == 2:
        p._require_order2("--order 2")
    return p


def run(args) -> int:
    import os

    from nnpartials.errors import InputError
    from nnpartials.io import PARTIALS_EXTENSIONS, check_output_path, is_parquet_input

    parquet_in = is_parquet_input(args.input)
    parquet_out = os.path.splitext(args.output)[1].lower() == ".parquet"
    if args.workers or args.scheduler:
        if not (parquet_in and parquet_out):
            raise InputError("--workers and --scheduler read and write Parquet: give a .parquet file, a folder or a "
                             "glob as input and an output ending in .parquet")
        return _run_dask(args)
    check_output_path(args.output, PARTIALS_EXTENSIONS + (".parquet",), overwrite=args.force)  # before any work
    if parquet_in or parquet_out:
        return _run_streaming(args, parquet_in, parquet_out)
    return _run_in_memory(args)


def _run_in_memory(args) -> int:
    import numpy as np

    from nnpartials.io import read_points, write_partials
    from nnpartials.validate import as_batch

    p = _open(args)
    x = as_batch(read_points(args.input, p.input_columns), p.n_in, name=args.input, nan_policy=args.nan_policy)
    n = x.shape[0]
    y = np.empty((n, p.n_out), np.float32)
    dy = np.empty((n, p.n_out, p.n_in), np.float32)
    d2 = np.empty((n, p.n_out, p.n_in, p.n_in), np.float32) if args.order == 2 else None
    rows = _rows(args)
    with _progress(not args.no_progress and n > rows) as bar:
        task = bar.add_task("partials", total=n)
        for s in range(0, n, rows):
            r = _evaluate(p, x[s:s + rows], args.order)
            y[s:s + rows], dy[s:s + rows] = r[0], r[1]
            if d2 is not None:
                d2[s:s + rows] = r[2]
            bar.update(task, advance=min(rows, n - s))
    write_partials(args.output, x, y, dy, p.input_columns, p.output_columns, overwrite=args.force, d2y_dx2=d2)
    print(f"wrote {args.output}: {n} points, {p.n_out} output(s) x {p.n_in} input(s)")
    return 0


def _run_streaming(args, parquet_in, parquet_out) -> int:
    """In-process, one batch of --chunk points at a time: Parquet in (record batches) and/or Parquet out (one row
    group per batch), so that neither the input nor the output is held in memory whole when both are Parquet."""
    import numpy as np

    from nnpartials.errors import InputError
    from nnpartials.io import (arrow_to_points, atomic_output, open_parquet, partials_record_batch, partials_schema,
                               read_points, write_partials)
    from nnpartials.validate import as_batch

    p = _open(args)
    rows = _rows(args)
    in_cols, out_cols = p.input_columns, p.output_columns
    if parquet_in:
        src = open_parquet(args.input, in_cols)
        n, in_types = src.num_rows, src.types

        def batches():
            for arrays, first in src.batches(rows):
                yield arrays, arrow_to_points(arrays, in_cols, first_row=first, label=args.input,
                                              nan_policy=args.nan_policy)
    else:
        x = as_batch(read_points(args.input, in_cols), p.n_in, name=args.input, nan_policy=args.nan_policy,
                     dtype=np.float64)
        n, in_types = x.shape[0], np.float64

        def batches():
            for s in range(0, n, rows):
                xs = x[s:s + rows]
                yield list(xs.T), xs

    def evaluated(bar, task):
        first = 0
        for inputs, pts in batches():
            try:
                y, dy, d2 = _evaluate(p, pts, args.order)
            except InputError as err:  # its row numbers count from the batch's first row
                raise InputError(f"{args.input}, rows {first}..{first + len(pts) - 1}: {err}") from None
            bar.update(task, advance=len(pts))
            first += len(pts)
            yield inputs, pts, y, dy, d2

    with _progress(not args.no_progress and n > rows) as bar:
        task = bar.add_task("partials", total=n)
        if parquet_out:
            import pyarrow.parquet as pq

            schema = partials_schema(in_cols, in_types, out_cols, p.dtype, order=args.order)
            with atomic_output(args.output, None, overwrite=args.force) as tmp:
                with pq.ParquetWriter(tmp, schema) as writer:
                    for inputs, _, y, dy, d2 in evaluated(bar, task):
                        writer.write_batch(partials_record_batch(schema, inputs, y, dy, d2))
        else:  # Parquet in, .csv/.npy/.npz out: these formats are written whole, from memory
            xs, ys, dys, d2s = [], [], [], []
            for _, pts, y, dy, d2 in evaluated(bar, task):
                xs.append(np.asarray(pts, p.dtype))  # as the in-memory path keeps them: in the model's precision
                ys.append(y)
                dys.append(dy)
                d2s.append(d2)

            def cat(parts, shape):
                return np.concatenate(parts) if parts else np.zeros(shape, p.dtype)

            write_partials(args.output, cat(xs, (0, p.n_in)), cat(ys, (0, p.n_out)), cat(dys, (0, p.n_out, p.n_in)),
                           in_cols, out_cols, overwrite=args.force,
                           d2y_dx2=cat(d2s, (0, p.n_out, p.n_in, p.n_in)) if args.order == 2 else None)
    print(f"wrote {args.output}: {n} points, {p.n_out} output(s) x {p.n_in} input(s)")
    return 0


def _run_dask(args) -> int:
    """Parquet in and out on a Dask cluster: the workers read the input partitions, compute them with
    nnpartials.dask and write one part file each into a hidden temporary folder, renamed to OUT at the end."""
    import contextlib
    import logging
    import os
    import warnings

    from nnpartials.bundle import load_bundle
    from nnpartials.errors import NNPartialsError
    from nnpartials.io import atomic_output_folder, check_output_folder, open_parquet, partials_schema

    check_output_folder(args.output, overwrite=args.force)  # before any work
    bundle = load_bundle(args.bundle)
    if args.order == 2 and bundle.order < 2:
        from nnpartials.errors import OrderNotAvailableError

        raise OrderNotAvailableError(f"--order 2: bundle {args.bundle!r} was exported without second derivatives; "
                                     f"export it again with `nnpartials export MODEL -o BUNDLE --order 2`")
    src = open_parquet(args.input, bundle.input_columns)
    try:
        import dask
        import dask.dataframe as dd
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise NNPartialsError("--workers and --scheduler need Dask: pip install 'nnpartials[dask]'") from None
    import nnpartials.dask as nd

    dtype = bundle.manifest["inputs"][0].get("dtype", "float32")
    schema = partials_schema(bundle.input_columns, src.types, bundle.output_columns, dtype, order=args.order)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(atomic_output_folder(args.output, overwrite=args.force))
        if args.scheduler:
            try:
                client = stack.enter_context(Client(args.scheduler, timeout="10s"))
            except OSError as exc:
                raise NNPartialsError(f"cannot connect to the Dask scheduler at {args.scheduler}: {exc}") from None
        else:
            with warnings.catch_warnings():  # the scheduler's HTTP endpoint moving off a busy port 8787 is no news
                warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
                cluster = stack.enter_context(LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                                           processes=True, dashboard_address=None,
                                                           silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        # absolute paths: the workers of a remote cluster do not share this process's working folder
        # one partition per row group: by default Dask makes a file of less than 256 MiB one partition, so one
        # input file ran on one worker whatever --workers said, and that worker held all of it
        frame = dd.read_parquet([os.path.abspath(f) for f in src.files], columns=list(bundle.input_columns),
                                split_row_groups=True)
        # one evaluation thread per worker process on a local cluster (--workers N uses N cores, not N x cores)
        table = nd.partials(bundle, frame, backend=args.backend, order=args.order, nan_policy=args.nan_policy,
                            max_batch=args.chunk,
                            providers=_providers(args), threads=None if args.scheduler else 1)
        parts = table.to_delayed()
        width = len(str(max(len(parts) - 1, 0)))  # part.07 before part.10 in name order (pandas, pyarrow read so)
        writes = [dask.delayed(nd._write_part)(part, os.path.join(out, f"part.{k:0{width}d}.parquet"), schema)
                  for k, part in enumerate(parts)]
        futures = client.compute(writes)
        try:
            with _progress(not args.no_progress) as bar:
                task = bar.add_task("partials", total=src.num_rows)
                for f in as_completed(futures):
                    bar.update(task, advance=f.result())
        except BaseException:
            client.cancel(futures)
            raise
    n_in, n_out = bundle.n_in, bundle.n_out
    print(f"wrote {args.output}: {src.num_rows} points, {n_out} output(s) x {n_in} input(s), "
          f"{len(writes)} part file(s)")
    return 0
