"""What one onnxruntime node costs at batch 1, per op type: the floor under the companion graph's batch-1 time.

    python -m benchmarks.node_cost              # [1, 64] float32 tensors, chains of 30 nodes
    python -m benchmarks.node_cost --width 16 --nodes 60 --threads 1

For each op type, a graph of N chained nodes of that type (same shapes as a 64-unit layer) is timed with
``session.run`` at batch 1 and compared with a graph of one node; the difference divided by N is the cost of one
more node. The forward graph of the seed network runs about 10 nodes after onnxruntime's fusions (one fused
Gemm + LeakyReLU per layer); the reverse-mode companion graph adds, per hidden layer, a product with W^T and the
mask (two unary passes and a Mul). These numbers bound what a standard-ONNX companion graph can cost relative to
the forward graph at batch 1 (see NOTES.md). Not part of the timed suite; timings are medians of a few rounds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _chain(n_nodes: int, width: int, make) -> bytes:
    from onnx import TensorProto, helper

    nodes, inits, prev = [], [], "x"
    for i in range(n_nodes):
        out = f"v{i}"
        nodes += make(i, prev, out, inits)
        prev = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _ops(width: int, rng):
    from onnx import helper, numpy_helper

    def c(name, value, inits):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def w(i, inits):
        return c(f"w{i}", rng.normal(size=(width, width)) / np.sqrt(width), inits)

    return {
        "Relu": lambda i, a, o, I: [helper.make_node("Relu", [a], [o])],
        "Ceil": lambda i, a, o, I: [helper.make_node("Ceil", [a], [o])],
        "Clip": lambda i, a, o, I: [helper.make_node("Clip", [a, c(f"lo{i}", 0.3, I), c(f"hi{i}", 1.0, I)], [o])],
        "Sign": lambda i, a, o, I: [helper.make_node("Sign", [a], [o])],
        "Mul (vector)": lambda i, a, o, I: [helper.make_node("Mul", [a, c(f"m{i}", rng.uniform(.9, 1.1, width), I)],
                                                              [o])],
        "Greater + Where": lambda i, a, o, I: [
            helper.make_node("Greater", [a, c(f"z{i}", 0.0, I)], [o + "_c"]),
            helper.make_node("Where", [o + "_c", a, c(f"q{i}", 0.5, I)], [o])],
        "MatMul": lambda i, a, o, I: [helper.make_node("MatMul", [a, w(i, I)], [o])],
        "Gemm + bias + LeakyRelu (fused)": lambda i, a, o, I: [
            helper.make_node("Gemm", [a, w(i, I), c(f"b{i}", rng.normal(size=width) * 0.1, I)], [o + "_z"]),
            helper.make_node("LeakyRelu", [o + "_z"], [o], alpha=0.3)],
    }


def _time(model: bytes, width: int, threads: int, calls: int, rounds: int = 5) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(0).normal(size=(1, width)).astype(np.float32)}
    for _ in range(200):
        sess.run(None, feed)
    best = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feed)
        best.append((time.perf_counter() - t0) / calls)
    return float(np.median(best))


def measure(width: int = 64, nodes: int = 30, threads: int = 1, calls: int = 3000) -> dict:
    """{op: seconds per extra link of the chain (one node, or the pair named)}, plus ``"(one node)"``: a whole
    session.run of a one-node graph."""
    rng = np.random.default_rng(1)
    ops = _ops(width, rng)
    one = _time(_chain(1, width, ops["Relu"]), width, threads, calls)
    out = {"(one node)": one}
    for name, make in ops.items():
        t = _time(_chain(nodes, width, make), width, threads, calls)
        out[name] = (t - one) / nodes  # per link of the chain (a pair of nodes is one link)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.node_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    res = measure(args.width, args.nodes, args.threads)
    print(f"onnxruntime, batch 1, [1, {args.width}] float32, intra_op_num_threads={args.threads}")
    print(f"{'session.run of a one-node graph':36s} {res.pop('(one node)') * 1e6:7.2f} µs")
    for name, t in res.items():
        print(f"{'+ one ' + name:36s} {t * 1e6:7.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
