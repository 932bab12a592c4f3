"""nnpartials export MODEL -o BUNDLE"""

from __future__ import annotations

NAME = "export"
HELP = "export a Keras or ONNX model to a bundle with a Jacobian graph (and, with --order 2, second derivatives)"
DESCRIPTION = """\
Export a trained Keras model to a bundle folder:

  model.onnx       the forward graph (frozen with tf2onnx: every weight and statistic a constant)
  model.jac.onnx   the companion graph: outputs y [batch, n_out] and dy_dx [batch, n_out, n_in]
  model.nnp        weights for the C core (when the network is dense layers + supported activations)
  with --order 2:  model.hess.onnx (d2y_dx2 [batch, n_out, n_in, n_in]), model.lap.onnx (laplacian
                   [batch, n_out], one forward-Laplacian pass) and model.hvp.onnx (inputs x and v, output
                   hvp [batch, n_out, n_in] = Hessian times v), checked against nested GradientTape (Keras) or
                   float64 finite differences of the Jacobian graph (ONNX input)
  validation.json  the companion Jacobian compared with TensorFlow's GradientTape
  manifest.json    inputs, outputs, layout, sha256 of every file, tool versions

Export fails (and writes nothing) when the Jacobian differs from GradientTape beyond the float32
tolerance, or when the graph holds an op without a derivative rule.
"""


def add_arguments(p):
    p.add_argument("model", help="a .keras file, a SavedModel directory or an .onnx file")
    p.add_argument("-o", "--out", required=True, metavar="BUNDLE", help="bundle folder to write")
    p.add_argument("--data", metavar="POINTS", help="validation points (.csv or .npy, [N, n_in]); default: drawn "
                                                   "from the Normalization statistics or the box [-1, 1]^n_in")
    p.add_argument("--mode", choices=("auto", "forward", "reverse"), default="auto",
                   help="Jacobian mode: forward costs ~n_in passes, reverse ~n_out; auto picks the cheaper")
    import argparse

    from nnpartials.cli import deprecated_alias, positive_int

    p.add_argument("--n-points", dest="points", type=positive_int, default=1000, metavar="N",
                   help="number of validation points (default 1000; with --data, a random subset of this size)")
    p.add_argument("--points", dest="points", type=positive_int, default=argparse.SUPPRESS,
                   action=deprecated_alias("--n-points"), help=argparse.SUPPRESS)  # old name of --n-points
    p.add_argument("--order", type=int, choices=(1, 2), default=1,
                   help="1: the Jacobian graph (default); 2: also the Hessian, Laplacian and Hessian-vector product "
                        "graphs")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing bundle folder (only a folder holding an nnpartials bundle; never ., a "
                        "parent of it, the home folder or /)")
    p.add_argument("--allow-lambda", dest="allow_lambda", action="store_true",
                   help="load a .keras file that holds Lambda layers: this RUNS the Python code stored in the file "
                        "(Keras refuses it by default, safe_mode); use it only for files you trust")
    p.add_argument("--sign", metavar="KEY", default=None,
                   help="sign the bundle with this PEM elliptic-curve private key: writes model.sig, checked by "
                        "`nnpartials verify BUNDLE --key PUB` (needs pip install 'nnpartials[sign]')")


def run(args) -> int:
    from rich.console import Console

    from nnpartials.exporter.bundle import export
    from nnpartials.io import read_points

    data = read_points(args.data) if args.data else None
    b = export(args.model, args.out, data=data, mode=args.mode, opset=args.opset, n_validation=args.points,
               overwrite=args.force, progress=True, sign=args.sign, allow_unsafe_deserialization=args.allow_lambda,
               order=args.order)
    m = b.manifest
    con = Console()
    v = m["validation"]
    con.print(f"[bold green]wrote[/] {b.path}: n_in={b.n_in}, n_out={b.n_out}, mode={m['jacobian']['mode']}, "
              f"opset={m['opset']}")
    con.print(f"validation vs GradientTape on {v['points']} points ({v['points_from']}): max relative error "
              f"{v['max_rel']:.2e} (tolerance {v['tolerance']:.0e}) [green]passed[/]")
    so = m.get("second_order")
    if so is not None:
        sv = so["validation"]
        con.print(f"second derivatives vs {sv['reference']} on {sv['points']} points: max relative error "
                  f"{sv['max_rel']:.2e} (tolerance {sv['tolerance']:.0e}) [green]passed[/]; Laplacian: "
                  f"{so['laplacian']['method']}")
        if so["zero_almost_everywhere"]:
            con.print(f"[yellow]note[/]: {so['note']}")
    c = m["c_core"]
    con.print("C core: " + ("model.nnp written" if c["available"] else f"[yellow]not available[/]: {c['reason']}"))
    return 0
