"""Second derivatives: Hessian, Laplacian and Hessian-vector product (HVP) with nnpartials, against JAX, folx, PyTorch
and TensorFlow, in one run.

    python -m benchmarks.second_order                        # both networks, batches 1, 1,000 and 100,000
    python -m benchmarks.second_order --quick                # batches 1 and 1,000, fewer repeats
    python -m benchmarks.second_order --networks physics     # one network (physics, seed_tanh)
    python -m benchmarks.second_order --quick --networks seed_tanh --batches 1,4 --out-dir /tmp/so   # the smoke test
    python -m benchmarks.second_order --no-run               # render SECOND_ORDER.md again from second_order.json

Writes ``SECOND_ORDER.md`` (tables, FLOP formulas, machine, the summary with its targets) and ``second_order.json``
(the raw record) into ``--out-dir`` (default: this folder).

Networks (``NETWORKS``), built by ``benchmarks/workloads.py`` with its fixed seeds: ``physics`` (3 inputs, 4 × Dense
256 tanh, 2 outputs: the suite's own workload) and ``seed_tanh`` (the seed network's shape and weights,
Normalization + Dense 64, 64, 32, 32, 16, 16, 8, with tanh instead of LeakyReLU; 2 inputs, 1 output). Every framework
gets the same weights: TensorFlow runs the Keras model, JAX and PyTorch re-implement it from the Keras weights
(``Workload.layers``), nnpartials runs the bundle ``nnpartials.export(model, order=2)`` writes.

Paths (``PATHS``), per quantity: nnpartials through ``Partials`` (onnxruntime), through a bare onnxruntime session on
the graph file (no ``Partials`` overhead) and through the C core (``Kernel``); for the Laplacian also the Laplacian
taken from the full Hessian (the trace of ``Partials.hessian``, of the Hessian graph and of ``Kernel.hessian``) as
the baseline. Peers: ``jax.hessian`` (jacfwd of jacrev), its trace, ``folx.forward_laplacian`` and a
forward-over-reverse HVP (``jax.jvp`` of ``jax.jacrev``), all jitted and vmapped; ``torch.func.hessian``, its trace
and ``torch.func.jvp`` of ``jacrev`` (vmapped); TensorFlow nested GradientTape in ``tf.function`` (``batch_jacobian``
of ``batch_jacobian``), its trace, and ``tf.autodiff.ForwardAccumulator`` over a GradientTape for the HVP. JAX,
folx and PyTorch are optional (the ``[peers]`` extra): without them their paths are reported as not installed.

Before any timing, every path's result (and its y and dy/dx where it returns them) is compared on up to
2 × ``config.CHECK_ROWS`` points with a float64 reference (:func:`reference`: analytic second-order forward
propagation in numpy, independent of every benchmarked path); a path off by more than ``AGREE`` × max(1, max|ref|)
is reported as wrong and not timed. Timing: the suite's policy (``config``: warm-up, rounds of at least
``MIN_ROUND_S``, median over rounds; a case during which other processes took more than ``DISTURBED`` of the machine
is timed again after a wait, up to ``MAX_ATTEMPTS`` times, and the least disturbed attempt kept); a (network, batch)
group still disturbed is measured again whole (``--repasses``). At batch 100,000 the cases that need much memory
(TensorFlow's, whose allocator keeps it for the life of the process, and any predicted above ``ISOLATE_GIB``) run in
a child process of their own, timed there the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from benchmarks import config
from benchmarks.contention import Meter, QuietGate
from benchmarks.paths import Runner, _have, _ort_session, kernel_available
from benchmarks.report import fmt_gflops, fmt_pct, fmt_ratio, fmt_time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: Agreement before timing, per quantity: |a - ref| <= AGREE * max(1, max|ref|) over the checked points.
AGREE = 1e-4
QUANTITIES = ("hessian", "laplacian", "hvp")
QUANTITY_TITLE = {"hessian": "Hessian", "laplacian": "Laplacian", "hvp": "Hessian-vector product"}
#: What each quantity's results hold (besides y and dy/dx where a path returns them).
KEY = {"hessian": "H", "laplacian": "lap", "hvp": "hvp"}
GRAPH = {"hessian": "model.hess.onnx", "laplacian": "model.lap.onnx", "hvp": "model.hvp.onnx"}
FULL_BATCHES = (1, 1000, 100000)
QUICK_BATCHES = (1, 1000)
LARGE = config.LARGE
#: --quick: the timed rounds of a case last about this share of the full run's.
QUICK_SHARE = 0.25

#: name -> (workload of benchmarks/workloads.py, activation replacing its own, or None)
NETWORKS = {"physics": ("physics", None), "seed_tanh": ("seed", "tanh")}
NETWORK_TITLE = {
    "physics": "physics network: 3 inputs, 4 × Dense 256 tanh, 2 outputs",
    "seed_tanh": "seed network with tanh: Normalization + Dense 64, 64, 32, 32, 16, 16, 8 tanh, Dense 1; 2 inputs, "
                 "1 output",
}
_PEERS_HINT = "install the [peers] extra: pip install -e '.[peers]'"


# ----- networks ---------------------------------------------------------------------------------------------
def build_network(name: str):
    """The :class:`benchmarks.workloads.Workload` of network ``name``, built by ``workloads.build`` (fixed seeds).

    ``seed_tanh`` is the ``seed`` workload built with ``act="tanh"`` in its spec: the same initializers and seeds,
    hence the same weights and Normalization, with ``Dense(activation="tanh")`` in place of Dense + LeakyReLU."""
    from benchmarks import workloads

    base, act = NETWORKS[name]
    if act is None:
        w = workloads.build(base)
    else:
        spec = workloads.SPECS[base]
        workloads.SPECS[base] = dict(spec, act=act)
        try:
            w = workloads.build(base)
        finally:
            workloads.SPECS[base] = spec
        w.name, w.title = name, f"{spec['title']} with {act}"
    return w


def directions(w, batch: int, seed: int = 4321) -> np.ndarray:
    """One HVP direction per point, ``v [batch, n_in]`` float32 (seeded normal)."""
    rng = np.random.default_rng(seed + batch)
    return np.ascontiguousarray(rng.normal(size=(batch, w.n_in)), dtype=np.float32)


# ----- the float64 reference --------------------------------------------------------------------------------
def _act2(name, z):
    """(a(z), a'(z), a''(z)) in float64."""
    if name == "linear":
        return z, np.ones_like(z), np.zeros_like(z)
    if name == "tanh":
        t = np.tanh(z)
        d = 1.0 - t * t
        return t, d, -2.0 * t * d
    raise ValueError(f"the second-order reference covers tanh and linear layers, not {name!r}")


def reference(w, x, v=None) -> dict:
    """float64 ``{"y", "J", "H", "lap"[, "hvp"]}`` of a dense workload at ``x [B, n_in]``: y, its first-order
    tangents T = dh/dx and second-order tangents S = d²h/dx² carried through each layer (z = hW + b:
    dz = T W, d²z = S W; h = a(z): T' = a'(z) dz, S' = a'(z) d²z + a''(z) dz ⊗ dz), in numpy. It shares no code
    with any benchmarked path. ``H [B, n_out, n_in, n_in]``, ``lap`` its trace, ``hvp[b, i] = H[b, i] @ v[b]``."""
    h = np.asarray(x, dtype=np.float64)
    b, n = h.shape
    t = np.broadcast_to(np.eye(n), (b, n, n)).copy()  # [B, direction, width]
    if w.normalization is not None:
        mean, std = w.normalization
        h = (h - mean) / std
        t = t / std
    s = np.zeros((b, n, n, n))  # [B, direction, direction, width]
    for wt, bias, act in w.layers:
        wt = wt.astype(np.float64)
        z = h @ wt + bias.astype(np.float64)
        dz = t @ wt
        d2z = s @ wt
        h, a1, a2 = _act2(act, z)
        s = a1[:, None, None, :] * d2z + a2[:, None, None, :] * dz[:, :, None, :] * dz[:, None, :, :]
        t = a1[:, None, :] * dz
    hess = np.transpose(s, (0, 3, 1, 2))
    out = {"y": h, "J": np.transpose(t, (0, 2, 1)), "H": hess, "lap": np.trace(hess, axis1=2, axis2=3)}
    if v is not None:
        out["hvp"] = np.einsum("boij,bj->boi", hess, np.asarray(v, np.float64))
    return out


def check_rows(batch: int) -> np.ndarray:
    """The points compared with the reference: all, or the first and the last ``config.CHECK_ROWS``."""
    n = config.CHECK_ROWS
    return np.arange(batch) if batch <= 2 * n else np.concatenate([np.arange(n), np.arange(batch - n, batch)])


def compare(got: dict, ref: dict, rows) -> dict:
    """Scaled max error ``max|a - ref| / max(1, max|ref|)`` per returned array (y, J, H, lap, hvp)."""
    out = {}
    for k, a in got.items():
        if a is None or k not in ref:
            continue
        a = np.asarray(a, np.float64)[rows]
        r = ref[k]
        if a.shape != r.shape:
            raise AssertionError(f"{k}: shape {a.shape}, expected {r.shape}")
        out[k] = float(np.max(np.abs(a - r)) / max(1.0, float(np.max(np.abs(r))))) if r.size else 0.0
    return out


# ----- FLOP counts ------------------------------------------------------------------------------------------
@dataclass
class Method:
    short: str
    title: str
    formula: str
    flops: Callable  # (w) -> counted FLOPs per point


# F = forward FLOPs per point (workloads.py convention: 2·in·out per dense layer, nothing else counted);
# n = n_in, m = n_out. Each linear map applied to one more tangent or cotangent costs F once more.
METHODS = {
    "for_hessian": Method(
        "fwd-over-rev",
        "jacfwd of jacrev; nnpartials' Hessian graph (forward mode over the reverse-mode Jacobian graph): y and "
        "the m reverse passes, each carrying n tangents",
        "F·(1 + m)·(1 + n)", lambda w: w.forward_flops * (1 + w.n_out) * (1 + w.n_in)),
    "fof_hessian": Method(
        "fwd-over-fwd, pairs once",
        "y, n tangents and the n(n+1)/2 second-order rows j ≤ k",
        "F·(1 + n + n(n+1)/2)", lambda w: w.forward_flops * (1 + w.n_in + w.n_in * (w.n_in + 1) // 2)),
    "fof_hessian_full": Method(
        "fwd-over-fwd",
        "forward mode over the forward-mode Jacobian: y and the n forward tangents, each carrying n tangents",
        "F·(1 + n)²", lambda w: w.forward_flops * (1 + w.n_in) ** 2),
    "tangent_adjoint_hessian": Method(
        "tangents + adjoints",
        "C core with few outputs (m < n(n+1)/2): one forward pass with n tangent rows, then m adjoint rows back, "
        "summing λ·f''·g gᵀ per unit",
        "F·(1 + n + m)", lambda w: w.forward_flops * (1 + w.n_in + w.n_out)),
    "ror_hessian": Method(
        "rev-over-rev",
        "batch_jacobian of batch_jacobian: y and the m reverse passes, then m·n cotangents back through all of "
        "them",
        "F·(1 + m)·(1 + m·n)", lambda w: w.forward_flops * (1 + w.n_out) * (1 + w.n_out * w.n_in)),
    "fwd_laplacian": Method(
        "forward Laplacian",
        "y, n first-order tangents and one Laplacian row through each layer (folx; nnpartials' Laplacian graph "
        "and C core)",
        "F·(n + 2)", lambda w: w.forward_flops * (w.n_in + 2)),
    "for_hvp": Method(
        "fwd-over-rev",
        "jvp of grad; nnpartials' HVP graph: y and the m reverse passes, each with one tangent (the direction v)",
        "2·F·(1 + m)", lambda w: 2 * w.forward_flops * (1 + w.n_out)),
    "fof_hvp": Method(
        "fwd-over-fwd",
        "C core: y, the n input tangents and v's, and the n rows of H·v",
        "F·(2 + 2n)", lambda w: w.forward_flops * (2 + 2 * w.n_in)),
}


# ----- paths ------------------------------------------------------------------------------------------------
@dataclass
class SPath:
    name: str
    label: str
    #: "nnpartials", "from Hessian" (an nnpartials Laplacian taken from its full Hessian) or "peer"
    family: str
    quantity: str
    #: a key of METHODS (peers), or ort_* / c_* (nnpartials), resolved to one by :func:`method_of`
    method: str
    make: Callable  # (ctx, w) -> Runner; ``prepare(x, v)``, ``to_numpy(out) -> dict``
    available: Callable = lambda: None
    preload: tuple = ()


def _named(keys):
    return lambda out: {k: np.asarray(o) for k, o in zip(keys, out) if k}


def _trace(y, j, h):
    return y, j, np.trace(h, axis1=2, axis2=3)


def _x_only(x, v):
    return x


def _x_and_v(x, v):
    return x, v


def _nnp_runner(kind, fn, trace):
    if kind == "hvp":
        return Runner(call=lambda xv: fn(*xv), prepare=_x_and_v, to_numpy=_named(("y", "hvp")))
    if trace:
        return Runner(call=lambda x: _trace(*fn(x)), prepare=_x_only, to_numpy=_named(("y", "J", "lap")))
    return Runner(call=fn, prepare=_x_only, to_numpy=_named(("y", "J", KEY[kind])))


def make_partials(kind, trace=False):
    def make(ctx, w):
        import nnpartials

        p = nnpartials.Partials(ctx.bundle(w.name).path, threads=config.THREADS)
        return _nnp_runner(kind, getattr(p, kind), trace)

    return make


def make_kernel(kind, trace=False):
    def make(ctx, w):
        from nnpartials.runtime.kernel import Kernel

        b = ctx.bundle(w.name)
        if not b.has_c_core:
            raise SkipCase(f"the bundle has no model.nnp ({b.manifest.get('c_core', {}).get('reason')})")
        k = Kernel(b.path, threads=config.THREADS)
        if not hasattr(k, kind):
            raise SkipCase(f"Kernel has no {kind}() in this checkout")
        if not (b.manifest.get("second_order") or {}).get("c_core"):
            raise SkipCase("the bundle's manifest says its C core has no second derivatives (second_order.c_core)")
        return _nnp_runner(kind, getattr(k, kind), trace)

    return make


#: onnxruntime output names of the second-order graphs -> result keys
_OUTPUT_KEY = {"y": "y", "dy_dx": "J", "d2y_dx2": "H", "laplacian": "lap", "hvp": "hvp"}


def make_session(kind, trace=False):
    def make(ctx, w):
        b = ctx.bundle(w.name)
        sess = _ort_session(os.path.join(b.path, GRAPH[kind]))
        xname = b.manifest["inputs"][0]["name"]
        names = [o.name for o in sess.get_outputs()]
        keys = [_OUTPUT_KEY.get(nm) for nm in names]
        if None in keys:  # names not as documented: the documented order (y, dy_dx, quantity)
            keys = ["y", "hvp"] if kind == "hvp" else ["y", "J", KEY[kind]]
        if kind == "hvp":
            vname = b.manifest["second_order"]["hvp"]["input"]
            return Runner(call=lambda xv: sess.run(None, {xname: xv[0], vname: xv[1]}), prepare=_x_and_v,
                          to_numpy=_named(keys))
        if trace:
            return Runner(call=lambda x: _trace(*sess.run(None, {xname: x})), prepare=_x_only,
                          to_numpy=_named(("y", "J", "lap")))
        return Runner(call=lambda x: sess.run(None, {xname: x}), prepare=_x_only, to_numpy=_named(keys))

    return make


# JAX ---------------------------------------------------------------------------------------------------------
def _jax_f(w):
    """(f(params, norm, x) for one point -> (y, y), params, norm): the network from the Keras weights, as the suite's
    JAX paths build it (weights passed as arguments, not baked into the compiled function)."""
    import jax.numpy as jnp

    from benchmarks.paths import _jax_act

    acts = [_jax_act(a) for _, _, a in w.layers]
    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b, _ in w.layers]
    norm = None if w.normalization is None else tuple(jnp.asarray(v, jnp.float32) for v in w.normalization)

    def f(params, norm, x):
        h = x if norm is None else (x - norm[0]) / norm[1]
        for (W, b), act in zip(params, acts):
            h = act(h @ W + b)
        return h, h

    return f, params, norm


def make_jax(kind):
    def make(ctx, w):
        import jax
        import jax.numpy as jnp

        f, params, norm = _jax_f(w)
        if kind in ("hessian", "hessian_trace"):
            hess = jax.hessian(f, argnums=2, has_aux=True)  # jacfwd(jacrev(f))

            def one(params, norm, x):
                h, y = hess(params, norm, x)
                return (y, h) if kind == "hessian" else (y, jnp.trace(h, axis1=-2, axis2=-1))

            keys = ("y", "H" if kind == "hessian" else "lap")
        elif kind == "folx":
            import folx

            def one(params, norm, x):
                r = folx.forward_laplacian(lambda x: f(params, norm, x)[0], sparsity_threshold=0)(x)
                return r.x, r.jacobian.dense_array.T, r.laplacian  # dense_array: [n_in, n_out]

            keys = ("y", "J", "lap")
        else:  # hvp: forward over reverse, all outputs' gradients at once (jacrev = grad for one output)
            jac = jax.jacrev(f, argnums=2, has_aux=True)

            def one(params, norm, x, v):
                (j, y), (hv, _) = jax.jvp(lambda x: jac(params, norm, x), (x,), (v,))
                return y, j, hv

            fn = jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0)))
            return Runner(call=lambda xv: jax.block_until_ready(fn(params, norm, *xv)),
                          prepare=lambda x, v: (jax.device_put(x), jax.device_put(v)),
                          to_numpy=_named(("y", "J", "hvp")))
        fn = jax.jit(jax.vmap(one, in_axes=(None, None, 0)))
        return Runner(call=lambda x: jax.block_until_ready(fn(params, norm, x)),
                      prepare=lambda x, v: jax.device_put(x), to_numpy=_named(keys))

    return make


# PyTorch ------------------------------------------------------------------------------------------------------
def _torch_f(w):
    import torch

    layers = [(torch.from_numpy(np.ascontiguousarray(W)), torch.from_numpy(b), a) for W, b, a in w.layers]
    acts = {"linear": lambda z: z, "tanh": torch.tanh}
    norm = None if w.normalization is None else tuple(torch.tensor(v, dtype=torch.float32) for v in w.normalization)

    def f(x):  # one point
        h = x if norm is None else (x - norm[0]) / norm[1]
        for W, b, act in layers:
            h = acts[act](h @ W + b)
        return h

    return f


def make_torch(kind):
    def make(ctx, w):
        import torch
        from torch.func import hessian, jacrev, jvp, vmap

        torch.set_num_threads(config.THREADS)
        f = _torch_f(w)
        if kind == "hessian":
            fn, keys = vmap(hessian(f)), ("H",)
        elif kind == "hessian_trace":
            fn, keys = vmap(lambda x: hessian(f)(x).diagonal(dim1=-2, dim2=-1).sum(-1)), ("lap",)
        else:
            vf = vmap(lambda x, v: jvp(jacrev(f), (x,), (v,)))  # (J, H v)

            def call_hvp(xv):
                with torch.no_grad():  # torch.func transforms differentiate regardless; no autograd graph kept
                    return vf(*xv)

            return Runner(call=call_hvp, prepare=lambda x, v: (torch.from_numpy(x), torch.from_numpy(v)),
                          to_numpy=lambda out: {"J": out[0].numpy(), "hvp": out[1].numpy()})

        def call(x):
            with torch.no_grad():
                return fn(x)

        return Runner(call=call, prepare=lambda x, v: torch.from_numpy(x),
                      to_numpy=lambda out: {keys[0]: out.numpy()})

    return make


# TensorFlow ---------------------------------------------------------------------------------------------------
def make_tf(kind):
    def make(ctx, w):
        import tensorflow as tf

        model = w.keras_model
        if kind in ("hessian", "hessian_trace"):
            def fn(x):
                with tf.GradientTape() as outer:
                    outer.watch(x)
                    with tf.GradientTape() as inner:
                        inner.watch(x)
                        y = model(x, training=False)
                    j = inner.batch_jacobian(y, x)  # [B, n_out, n_in]
                h = outer.batch_jacobian(j, x)  # [B, n_out, n_in, n_in]
                return (y, j, h) if kind == "hessian" else (y, j, tf.linalg.trace(h))

            fn = tf.function(fn, autograph=False)
            return Runner(call=fn, prepare=lambda x, v: tf.constant(x),
                          to_numpy=_named(("y", "J", "H" if kind == "hessian" else "lap")))

        n_out = w.n_out

        def fn_hvp(x, v):  # forward (ForwardAccumulator, tangent v) over back (one gradient per output)
            with tf.autodiff.ForwardAccumulator(x, v) as acc:
                with tf.GradientTape(persistent=n_out > 1) as tape:
                    tape.watch(x)
                    y = model(x, training=False)
                    ys = [y[:, i] for i in range(n_out)]
                gs = [tape.gradient(yi, x) for yi in ys]  # points are independent: d(sum_b y_bi)/dx_b
            return y, tf.stack(gs, axis=1), tf.stack([acc.jvp(g) for g in gs], axis=1)

        fn_hvp = tf.function(fn_hvp, autograph=False)
        return Runner(call=lambda xv: fn_hvp(*xv), prepare=lambda x, v: (tf.constant(x), tf.constant(v)),
                      to_numpy=_named(("y", "J", "hvp")))

    return make


_JAX = dict(available=_have("jax", _PEERS_HINT), preload=("jax",))
_TORCH = dict(available=_have("torch", _PEERS_HINT), preload=("torch", "torch.func"))
_TF = dict(preload=("tensorflow",))


def _folx_available():
    return _have("jax", _PEERS_HINT)() or _have("folx", _PEERS_HINT)()


PATHS = [
    # Hessian
    SPath("nnp_partials_hessian", "Partials.hessian (onnxruntime)", "nnpartials", "hessian", "ort_hessian",
          make_partials("hessian")),
    SPath("nnp_session_hessian", "onnxruntime session on model.hess.onnx", "nnpartials", "hessian", "ort_hessian",
          make_session("hessian")),
    SPath("nnp_c_hessian", "C core, Kernel.hessian", "nnpartials", "hessian", "c_hessian", make_kernel("hessian"),
          available=kernel_available, preload=("nnpartials.runtime.kernel",)),
    SPath("jax_hessian", "JAX jit(vmap(jax.hessian))", "peer", "hessian", "for_hessian", make_jax("hessian"), **_JAX),
    SPath("torch_hessian", "PyTorch vmap(torch.func.hessian)", "peer", "hessian", "for_hessian",
          make_torch("hessian"), **_TORCH),
    SPath("tf_hessian", "TF nested GradientTape, batch_jacobian² (tf.function)", "peer", "hessian", "ror_hessian",
          make_tf("hessian"), **_TF),
    # Laplacian
    SPath("nnp_partials_laplacian", "Partials.laplacian (onnxruntime)", "nnpartials", "laplacian", "ort_laplacian",
          make_partials("laplacian")),
    SPath("nnp_session_laplacian", "onnxruntime session on model.lap.onnx", "nnpartials", "laplacian",
          "ort_laplacian", make_session("laplacian")),
    SPath("nnp_c_laplacian", "C core, Kernel.laplacian", "nnpartials", "laplacian", "c_laplacian",
          make_kernel("laplacian"), available=kernel_available, preload=("nnpartials.runtime.kernel",)),
    SPath("nnp_partials_hessian_trace", "trace of Partials.hessian", "from Hessian", "laplacian", "ort_hessian",
          make_partials("hessian", trace=True)),
    SPath("nnp_session_hessian_trace", "trace of model.hess.onnx (session)", "from Hessian", "laplacian",
          "ort_hessian", make_session("hessian", trace=True)),
    SPath("nnp_c_hessian_trace", "trace of Kernel.hessian (C core)", "from Hessian", "laplacian", "c_hessian",
          make_kernel("hessian", trace=True), available=kernel_available, preload=("nnpartials.runtime.kernel",)),
    SPath("jax_hessian_trace", "JAX trace of jax.hessian (jit, vmap)", "peer", "laplacian", "for_hessian",
          make_jax("hessian_trace"), **_JAX),
    SPath("folx_laplacian", "folx.forward_laplacian (jit, vmap)", "peer", "laplacian", "fwd_laplacian",
          make_jax("folx"), available=_folx_available, preload=("jax", "folx")),
    SPath("torch_hessian_trace", "PyTorch trace of torch.func.hessian (vmap)", "peer", "laplacian", "for_hessian",
          make_torch("hessian_trace"), **_TORCH),
    SPath("tf_hessian_trace", "TF trace of nested GradientTape Hessian", "peer", "laplacian", "ror_hessian",
          make_tf("hessian_trace"), **_TF),
    # HVP
    SPath("nnp_partials_hvp", "Partials.hvp (onnxruntime)", "nnpartials", "hvp", "ort_hvp", make_partials("hvp")),
    SPath("nnp_session_hvp", "onnxruntime session on model.hvp.onnx", "nnpartials", "hvp", "ort_hvp",
          make_session("hvp")),
    SPath("nnp_c_hvp", "C core, Kernel.hvp", "nnpartials", "hvp", "c_hvp", make_kernel("hvp"),
          available=kernel_available, preload=("nnpartials.runtime.kernel",)),
    SPath("jax_hvp", "JAX jit(vmap(jvp of jacrev))", "peer", "hvp", "for_hvp", make_jax("hvp"), **_JAX),
    SPath("torch_hvp", "PyTorch vmap(torch.func.jvp of jacrev)", "peer", "hvp", "for_hvp", make_torch("hvp"),
          **_TORCH),
    SPath("tf_hvp", "TF ForwardAccumulator over GradientTape (tf.function)", "peer", "hvp", "for_hvp",
          make_tf("hvp"), **_TF),
]
BY_NAME = {p.name: p for p in PATHS}


class SkipCase(Exception):
    """A case that cannot run here; the reason goes to the record."""


# ----- running ----------------------------------------------------------------------------------------------
class Context:
    """Networks, their order-2 bundles (exported once into a temporary folder), inputs and references."""

    def __init__(self, tmp: str, n_validation: int | None = None):
        self.tmp = tmp
        self.n_validation = n_validation
        self._nets, self._bundles, self._refs = {}, {}, {}
        self.exports = {}
        self._tf_ready = False

    def _configure_tf(self):
        if self._tf_ready:
            return
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(config.THREADS)
            tf.config.threading.set_inter_op_parallelism_threads(config.THREADS)
        except RuntimeError:  # pragma: no cover - initialised already
            pass
        self._tf_ready = True

    def network(self, name):
        if name not in self._nets:
            self._configure_tf()
            self._nets[name] = build_network(name)
        return self._nets[name]

    def bundle(self, name):
        if isinstance(self._bundles.get(name), Exception):  # the export failed before: the same error again
            raise self._bundles[name]
        if name not in self._bundles:
            import onnx

            import nnpartials

            w = self.network(name)
            opts = {"n_validation": self.n_validation} if self.n_validation else {}
            t0 = time.perf_counter()
            try:
                b = nnpartials.export(w.keras_model, os.path.join(self.tmp, name), order=2, overwrite=True, **opts)
            except Exception as exc:
                self._bundles[name] = exc
                self.exports[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                raise
            secs = time.perf_counter() - t0
            so = b.manifest.get("second_order", {})
            self.exports[name] = {
                "seconds": secs, "jacobian_mode": b.manifest.get("jacobian", {}).get("mode"),
                "c_core": b.manifest.get("c_core", {}).get("available"),
                "nodes": {f: len(onnx.load_model_from_string(b.read(f)).graph.node)
                          for f in ("model.onnx", "model.jac.onnx", *GRAPH.values())},
                "second_order": {k: v for k, v in so.items() if k != "validation"},
                "validation_max_rel": so.get("validation", {}).get("max_rel")}
            self._bundles[name] = b
        return self._bundles[name]

    def adopt(self, name, path):
        """Use the bundle another process exported for ``name`` (a child process running one case)."""
        import nnpartials

        self._bundles[name] = nnpartials.load_bundle(path)

    def inputs(self, name, batch):
        w = self.network(name)
        return w.inputs(batch), directions(w, batch)

    def reference(self, name, batch):
        if (name, batch) not in self._refs:
            x, v = self.inputs(name, batch)
            rows = check_rows(batch)
            self._refs[(name, batch)] = reference(self.network(name), x[rows], v[rows])
        return self._refs[(name, batch)]


def _timed(fn, x):
    t0 = time.perf_counter()
    out = fn(x)
    return time.perf_counter() - t0, out


def measure(call, xin, large: bool, quick: bool, gate: QuietGate) -> dict:
    """The suite's timing policy (``benchmarks/test_partials.py``): a warm-up call, iterations per round so that a
    round lasts at least ``MIN_ROUND_S``, rounds filling ``TARGET_S_*`` (``QUICK_SHARE`` of it with --quick),
    the median over rounds; timed again while other processes took more than ``DISTURBED`` of the machine."""
    from benchmarks.test_partials import _disturbed, _stats, _time_rounds

    rec = {"quiet_wait_s": gate.wait()}
    t, _ = _timed(call, xin)
    for _ in range(0 if large else 3):
        if t > 0.05:
            break
        t = min(t, _timed(call, xin)[0])
    t = max(t, 1e-7)
    iterations = 1 if t >= config.MIN_ROUND_S else int(math.ceil(config.MIN_ROUND_S / t))
    target = (config.TARGET_S_LARGE if large else config.TARGET_S_SMALL) * (QUICK_SHARE if quick else 1.0)
    lo, hi = ((config.MIN_ROUNDS_LARGE, config.MAX_ROUNDS_LARGE) if large
              else (config.MIN_ROUNDS_SMALL, config.MAX_ROUNDS_SMALL))
    if quick:
        lo, hi = min(lo, 5), max(min(hi, 50), 5)
    if t >= config.SLOW_CALL_S:
        lo = min(lo, config.MIN_ROUNDS_LARGE)
    rounds = int(min(hi, max(lo, round(target / (t * iterations)))))
    best, attempts = None, []
    while True:
        with Meter() as m:
            samples = _time_rounds(call, xin, rounds, iterations)
        attempts.append(m.others)
        if best is None or (m.others is not None and (best[0] is None or m.others < best[0])):
            best = (m.others, samples)
        if not _disturbed(best[0]) or len(attempts) >= config.MAX_ATTEMPTS:
            break
        gate.wait()
    rec.update(_stats(best[1]), rounds=rounds, iterations=iterations, others_cpu=best[0],
               others_cpu_attempts=attempts)
    return rec


def method_of(ctx, p, w):
    """The key of ``METHODS`` for path ``p``: the peers' is fixed; nnpartials' follows the rules of
    ``exporter/second_order.py`` (the Hessian graph is forward mode over the Jacobian graph in the mode ``auto``
    picks; the Laplacian graph a forward-Laplacian pass unless the manifest says "hessian-trace") and of
    ``csrc/nnp_second.c`` (the C Hessian takes the tangent-adjoint route when n_out < n_in (n_in + 1) / 2)."""
    if p.method == "ort_hessian":
        from benchmarks.paths import auto_mode

        return "for_hessian" if auto_mode(w) == "reverse" else "fof_hessian_full"
    if p.method == "ort_laplacian":
        lap = ctx.bundle(w.name).manifest["second_order"]["laplacian"].get("method", "forward-laplacian")
        return "fwd_laplacian" if lap == "forward-laplacian" else method_of(ctx, BY_NAME["nnp_session_hessian"], w)
    if p.method == "c_hessian":
        return "tangent_adjoint_hessian" if w.n_out < w.n_in * (w.n_in + 1) // 2 else "fof_hessian"
    return {"ort_hvp": "for_hvp", "c_laplacian": "fwd_laplacian", "c_hvp": "fof_hvp"}.get(p.method, p.method)


def _proc_status_gib(*keys) -> dict:
    """Fields of /proc/self/status in GiB (VmRSS: resident now, VmHWM: peak); {} where unavailable."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) / 2 ** 20
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (VmHWM)
            f.write("5")
        return True
    except OSError:
        return False


def mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


#: A batch-100,000 case is skipped when its peak memory, predicted from batch 1,000 (× 100), would leave less than
#: this many GiB of the machine's available memory (the machine is shared; an out-of-memory kill ends the run).
MEM_MARGIN_GIB = 1.5


def run_case(ctx, name, batch, p, *, quick, gate, time_it=True, prior=None, prior_mem=None) -> dict:
    rec = {"network": name, "batch": batch, "quantity": p.quantity, "path": p.name, "label": p.label,
           "family": p.family, "status": "failed", "reason": None}
    try:
        reason = p.available()
        if reason:
            raise SkipCase(reason)
        import importlib

        for mod in p.preload:
            importlib.import_module(mod)
        w = ctx.network(name)
        method = method_of(ctx, p, w)
        rec["method"] = method
        rec["flops_per_point"] = METHODS[method].flops(w) if method in METHODS else None
        if prior is not None and batch >= LARGE and prior * batch / 1000 > config.MAX_CALL_S:
            raise SkipCase(f"predicted {prior * batch / 1000:.0f} s per call (batch 1,000 × 100) exceeds "
                           f"NNP_BENCH_MAX_CALL_S={config.MAX_CALL_S:g}")
        avail = mem_available_gib()
        if prior_mem is not None and batch >= LARGE and avail is not None \
                and prior_mem * batch / 1000 > avail - MEM_MARGIN_GIB:
            raise SkipCase(f"predicted peak memory {prior_mem * batch / 1000:.1f} GiB (batch 1,000 × 100) exceeds "
                           f"the {avail:.1f} GiB available less {MEM_MARGIN_GIB:g} GiB")
        x, v = ctx.inputs(name, batch)
        ref = ctx.reference(name, batch)
        import gc

        gc.collect()
        rss0 = _proc_status_gib("VmRSS").get("VmRSS")
        peak_ok = _reset_peak_rss()
        t0 = time.perf_counter()
        runner = p.make(ctx, w)
        rec["setup_s"] = time.perf_counter() - t0
        xin = runner.prepare(x, v)
        rec["first_call_s"], out = _timed(runner.call, xin)
        errs = compare(runner.to_numpy(out), ref, check_rows(batch))
        del out
        rec["max_err"] = errs
        rec["max_err_quantity"] = errs.get(KEY[p.quantity])
        if KEY[p.quantity] not in errs:
            raise AssertionError(f"the path returned no {KEY[p.quantity]}")
        bad = {k: e for k, e in errs.items() if not e <= AGREE}
        if bad:
            rec["status"] = "wrong"
            rec["reason"] = ("disagrees with the float64 reference (scaled max error " +
                             ", ".join(f"{k} {e:.2g}" for k, e in bad.items()) + f" > {AGREE:g}); not timed")
            return rec
        if peak_ok and rss0 is not None:  # memory the path took beyond what the process held before it
            rec["peak_mem_gib"] = max(0.0, _proc_status_gib("VmHWM").get("VmHWM", rss0) - rss0)
        if time_it:
            rec.update(measure(runner.call, xin, batch >= LARGE, quick, gate))
            rec["points_per_s"] = batch / rec["median_s"]
            if rec["flops_per_point"]:
                rec["gflops"] = rec["flops_per_point"] * batch / rec["median_s"] / 1e9
        rec["status"] = "ok"
        rec["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    except SkipCase as exc:
        rec["status"], rec["reason"] = "skipped", str(exc)
    except Exception as exc:  # a failing path is reported, the run goes on
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        rec["reason"] = (f"{type(exc).__name__}: {exc}"[:400] + f" ({os.path.basename(tb.filename)}:{tb.lineno})")
    return rec


#: At batch 100,000 a path runs in a child process of its own (and is timed there the same way) when its peak memory
#: at batch 1,000, × 100, would exceed this many GiB, and a TensorFlow path always: the memory of a large case
#: (oneDNN's pool, which TensorFlow keeps for the life of the process; onnxruntime's arena; XLA's buffers) is then
#: returned when the case ends, and an out-of-memory kill on the shared machine ends that case, not the run.
ISOLATE_GIB = 1.0


def needs_isolation(p, batch, prior_mem) -> bool:
    return batch >= LARGE and (p.name.startswith("tf_") or (prior_mem or 0.0) * batch / 1000 > ISOLATE_GIB)


def run_case_isolated(ctx, name, batch, p, *, quick, gate, prior=None, prior_mem=None) -> dict:
    """:func:`run_case` in a child process (``--case``) on the bundle this process exported."""
    import subprocess

    try:
        bundle = ctx.bundle(name).path
    except Exception:  # the export failed: recorded the usual way
        return run_case(ctx, name, batch, p, quick=quick, gate=gate, prior=prior, prior_mem=prior_mem)
    spec = dict(network=name, batch=batch, path=p.name, bundle=bundle, quick=quick, prior=prior, prior_mem=prior_mem,
                quiet_budget=max(0.0, gate.budget_s - gate.spent))
    fd, out = tempfile.mkstemp(prefix="case-", suffix=".json", dir=ctx.tmp)
    os.close(fd)
    cmd = [sys.executable, "-m", "benchmarks.second_order", "--case", json.dumps(spec), "--case-out", out]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode == 0:
        with open(out) as f:
            rec = json.load(f)
        gate.spent += rec.pop("quiet_spent_s", 0.0)
    else:
        killed = " (killed: out of memory on the shared machine?)" if res.returncode in (-9, 137) else ""
        tail = (res.stderr.strip().splitlines() or [""])[-1][:300]
        rec = {"network": name, "batch": batch, "quantity": p.quantity, "path": p.name, "label": p.label,
               "family": p.family, "status": "failed",
               "reason": f"the child process running this case exited {res.returncode}{killed}: {tail}"}
    rec["isolated"] = True
    return rec


def _child_case(spec: dict, out: str) -> int:
    with tempfile.TemporaryDirectory(prefix="nnp-so-case-") as tmp:
        ctx = Context(tmp)
        ctx.adopt(spec["network"], spec["bundle"])
        gate = QuietGate(budget_s=spec["quiet_budget"])
        rec = run_case(ctx, spec["network"], spec["batch"], BY_NAME[spec["path"]], quick=spec["quick"], gate=gate,
                       prior=spec["prior"], prior_mem=spec["prior_mem"])
    rec["quiet_spent_s"] = gate.spent
    with open(out, "w") as f:
        json.dump(rec, f)
    return 0


# ----- where onnxruntime spends its time --------------------------------------------------------------------
def profile_graph(bundle, fname, feeds, runs=3, top=8) -> dict:
    """Share of onnxruntime's kernel time per op type in ``fname`` of ``bundle`` on ``feeds`` (its own profiler,
    as ``benchmarks/profile_ort.py``), a warm-up run and ``runs`` runs."""
    import collections

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="nnp-so-prof-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = config.THREADS
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        so.enable_profiling = True
        so.log_severity_level = 3  # no warning about the hardware-specific optimised copy written for the node count
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(os.path.join(bundle.path, fname), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        for _ in range(runs + 1):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as fh:
            events = json.load(fh)
        import onnx

        nodes_opt = len(onnx.load(so.optimized_model_filepath).graph.node)
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    return {"graph": fname, "batch": int(next(iter(feeds.values())).shape[0]), "nodes_optimised": nodes_opt,
            "kernel_ms_per_run": total / (runs + 1) / 1000,
            "share": {k: v / total for k, v in per_op.most_common(top)} if total else {}}


#: The profiles run at the largest batch up to this many points (the op types' shares settle well below 100,000,
#: and onnxruntime's arena for the Hessian graph at 100,000 points takes several GiB).
PROFILE_MAX_BATCH = 20000


def profiles(ctx, name, batch) -> list:
    batch = min(batch, PROFILE_MAX_BATCH)
    b = ctx.bundle(name)
    x, v = ctx.inputs(name, batch)
    feeds = {b.manifest["inputs"][0]["name"]: x}
    so = b.manifest.get("second_order", {})
    feeds[so.get("hvp", {}).get("input", "v")] = v
    return [profile_graph(b, f, feeds) for f in ("model.onnx", "model.jac.onnx", *GRAPH.values())]


# ----- reading the record -----------------------------------------------------------------------------------
def _ok(data, name, batch, quantity, family=None, path=None):
    return [r for r in data["results"] if r["network"] == name and r["batch"] == batch and r["quantity"] == quantity
            and r["status"] == "ok" and r.get("median_s") is not None
            and (family is None or r["family"] == family) and (path is None or r["path"] == path)]


def _fastest(recs):
    return min(recs, key=lambda r: r["median_s"]) if recs else None


def _batches(data, name):
    return sorted({r["batch"] for r in data["results"] if r["network"] == name})


def _profile(data, name, graph):
    for p in data.get("profiles", {}).get(name, []):
        if p["graph"] == graph:
            return p
    return None


def _shares(p, k=4):
    return ", ".join(f"{op} {100 * s:.0f}%" for op, s in list(p["share"].items())[:k])


def _flops_text(data, r):
    if r.get("gflops") is None:
        return f"{r['label']}: {fmt_time(r['median_s'])}"
    m = METHODS.get(r.get("method"))
    return (f"{r['label']} counts {m.formula if m else '?'} = {r['flops_per_point'] / 1e6:.3g} MFLOP per point and "
            f"runs at {fmt_gflops(r['gflops'])} GFLOP/s")


def _graph_evidence(data, name, graph, flop_ratio=None):
    """What the profile of ``graph`` shows: kernel time, against the forward graph's, and the top op types."""
    p, f = _profile(data, name, graph), _profile(data, name, "model.onnx")
    if not p:
        return None
    s = (f"onnxruntime's own profile of {graph} at {_count(p['batch'])} points: {p['kernel_ms_per_run']:.3g} ms of "
         f"kernel time per run")
    if f and f["kernel_ms_per_run"]:
        s += (f", {p['kernel_ms_per_run'] / f['kernel_ms_per_run']:.2f}× the forward graph's "
              f"({f['kernel_ms_per_run']:.3g} ms)")
        if flop_ratio:
            s += f" where the counted FLOPs give {flop_ratio:.2g}×"
    return s + f"; by op type: {_shares(p)}"


def _count(n):
    return f"{n:,}"


def _verdict(value, goal, sense):
    ok = value <= goal if sense == "<=" else value >= goal
    return "met" if ok else "not met"


def targets(data) -> list:
    """The summary's three comparisons per network, each with its numbers, verdict and evidence."""
    out = []
    for name in data["networks"]:
        info = data["networks"][name]
        bs = _batches(data, name)
        if not bs:
            continue
        big, small = max(bs), min(bs)
        judged_big, judged_small = big == LARGE, small == 1
        lap_nnp = _fastest(_ok(data, name, big, "laplacian", "nnpartials"))
        lap_peer = _fastest(_ok(data, name, big, "laplacian", "peer"))
        lap_hess = _fastest(_ok(data, name, big, "laplacian", "from Hessian"))
        n, m_out = info["n_in"], info["n_out"]

        def item(key, goal, sense, a, b, judged, batch, text_fn, evidence_fn):
            it = {"network": name, "target": key, "goal": goal, "sense": sense, "batch": batch}
            if a is None or b is None:
                it.update(value=None, verdict="not measured",
                          text=f"{TARGET_TITLE[key]}: not measured in this run (a path is missing: "
                               f"{'nnpartials' if a is None else 'the comparison'}).")
                out.append(it)
                return
            value = a["median_s"] / b["median_s"] if sense == "<=" else b["median_s"] / a["median_s"]
            verdict = _verdict(value, goal, sense) if judged else "not judged"
            it.update(value=value, verdict=verdict, a=a["path"], b=b["path"], text=text_fn(a, b, value, verdict))
            if verdict != "met":
                it["evidence"] = [e for e in evidence_fn(a, b, value) if e]
            out.append(it)

        def miss(value, goal, sense):
            if sense == "<=":
                return f"{value / goal:.2f}× the target: it would have to be {value / goal:.2f}× faster"
            return f"{goal / value:.2f}× short of the target"

        def at(batch, judged, goal_batch):
            return "" if judged else f" (the target is set at batch {_count(goal_batch)}, not run here)"

        def lap_vs_peer_text(a, b, v, verdict):
            return (f"At batch {_count(big)} the best nnpartials Laplacian, {a['label']} ({fmt_time(a['median_s'])}), "
                    f"takes {fmt_ratio(v)} the time of the fastest peer Laplacian, {b['label']} "
                    f"({fmt_time(b['median_s'])}): target ≤ 1.0×, **{verdict}**"
                    + (f" ({miss(v, 1.0, '<=')})" if verdict == "not met" else "") + at(big, judged_big, LARGE) + ".")

        def lap_vs_peer_ev(a, b, v):
            ev = [f"{_flops_text(data, a)}; {_flops_text(data, b)}."]
            if a["path"].startswith("nnp_") and "_c_" not in a["path"]:
                ev.append(_graph_evidence(data, name, "model.lap.onnx", n + 2) or "")
            return ev

        item("laplacian_vs_peer", 1.0, "<=", lap_nnp, lap_peer, judged_big, big, lap_vs_peer_text, lap_vs_peer_ev)

        def same_backend():
            pairs = [("nnp_session_laplacian", "nnp_session_hessian_trace", "onnxruntime graphs"),
                     ("nnp_partials_laplacian", "nnp_partials_hessian_trace", "Partials"),
                     ("nnp_c_laplacian", "nnp_c_hessian_trace", "C core")]
            parts = []
            for lp, hp, what in pairs:
                a, b = _fastest(_ok(data, name, big, "laplacian", path=lp)), _fastest(
                    _ok(data, name, big, "laplacian", path=hp))
                if a and b:
                    parts.append(f"{what} {fmt_ratio(a['median_s'] / b['median_s'])}")
            return ("Same backend, Laplacian ÷ trace of its Hessian: " + ", ".join(parts) + ".") if parts else ""

        def lap_vs_hess_text(a, b, v, verdict):
            return (f"At batch {_count(big)} the best nnpartials Laplacian, {a['label']} ({fmt_time(a['median_s'])}), "
                    f"takes {fmt_ratio(v)} the time of the fastest Laplacian taken from the full Hessian, "
                    f"{b['label']} ({fmt_time(b['median_s'])}): target ≤ 0.5×, **{verdict}**"
                    + (f" ({miss(v, 0.5, '<=')})" if verdict == "not met" else "") + at(big, judged_big, LARGE)
                    + ". " + same_backend())

        def lap_vs_hess_ev(a, b, v):
            ev = []
            if a.get("flops_per_point") and b.get("flops_per_point"):
                ev.append(f"The counted FLOPs alone give {a['flops_per_point'] / b['flops_per_point']:.2f}× "
                          f"({METHODS[a['method']].formula} ÷ {METHODS[b['method']].formula} with n = {n}, "
                          f"m = {m_out}): "
                          f"{METHODS[a['method']].short} against {METHODS[b['method']].short}.")
            ev.append(f"{_flops_text(data, a)}; {_flops_text(data, b)}.")
            for r, graph in ((a, "model.lap.onnx"), (b, "model.hess.onnx")):
                if "_c_" not in r["path"] and r.get("flops_per_point"):
                    ev.append(_graph_evidence(data, name, graph, r["flops_per_point"] / info["forward_flops"]))
            return ev

        item("laplacian_vs_hessian", 0.5, "<=", lap_nnp, lap_hess, judged_big, big, lap_vs_hess_text, lap_vs_hess_ev)

        c1 = _fastest(_ok(data, name, small, "hessian", path="nnp_c_hessian"))
        p1 = _fastest(_ok(data, name, small, "hessian", "peer"))

        def c_text(a, b, v, verdict):
            return (f"At batch {_count(small)} the C core's Hessian, {a['label']} ({fmt_time(a['median_s'])}), is "
                    f"{fmt_ratio(v)} faster than the fastest peer Hessian, {b['label']} ({fmt_time(b['median_s'])}): "
                    f"target ≥ 5×, **{verdict}**" + (f" ({miss(v, 5.0, '>=')})" if verdict == "not met" else "")
                    + at(small, judged_small, 1) + ".")

        def c_ev(a, b, v):
            ev = [f"{_flops_text(data, a)}; {_flops_text(data, b)}."]
            first = {r["path"]: r for r in _ok(data, name, small, "hessian")}
            others = [f"{r['label']} {fmt_time(r['median_s'])}" for k, r in sorted(first.items(),
                                                                                 key=lambda kv: kv[1]["median_s"])]
            ev.append("All Hessian paths at this batch, fastest first: " + "; ".join(others) + ".")
            if a.get("flops_per_point") and v < 5.0:
                need = b["median_s"] / 5.0
                ev.append(f"5× would take the C core's call to {fmt_time(need)}: "
                          f"{a['flops_per_point'] * small / need / 1e9:.3g} GFLOP/s on its counted work, "
                          f"against the {fmt_gflops(a.get('gflops'))} measured (one point runs on one thread).")
            return ev

        item("c_hessian_batch1", 5.0, ">=", c1, p1, judged_small, small, c_text, c_ev)
    return out


TARGET_TITLE = {
    "laplacian_vs_peer": "batch 100,000: best nnpartials Laplacian ÷ fastest peer Laplacian (folx included) ≤ 1.0×",
    "laplacian_vs_hessian": "batch 100,000: best nnpartials Laplacian ÷ Laplacian from the full Hessian ≤ 0.5×",
    "c_hessian_batch1": "batch 1: C core Hessian ≥ 5× faster than the fastest peer Hessian",
}


# ----- the report -------------------------------------------------------------------------------------------
def _fmt_err(e):
    return "—" if e is None else f"{e:.1e}"


def _short(r):
    m = METHODS.get(r.get("method"))
    return f"{m.short}, {m.formula}" if m else "—"


def _rate(r):
    v = r.get("points_per_s")
    if v is None:
        return "—"
    return f"{v:,.0f}" if v < 1e6 else f"{v / 1e6:.3g} M"


def render(data) -> str:
    m = data["machine"]
    cfg = data["config"]
    lines = ["# Second derivatives: Hessian, Laplacian, Hessian-vector product", ""]
    lines.append(f"Generated by `{data['command']}` (`benchmarks/second_order.py`); the raw record is "
                 f"`second_order.json`. Times are per call for the whole batch, the median over rounds, all paths "
                 f"in one process and one run; every path was checked against a float64 reference before it was "
                 f"timed.")
    if cfg.get("quick"):
        lines += ["", f"**Quick run** (`--quick`: batches {', '.join(_count(b) for b in cfg['batches'])}, about "
                      f"{QUICK_SHARE:g} of the full run's timed rounds). The batch-100,000 targets are not judged."]
    la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
    others = sorted(r["others_cpu"] for r in data["results"] if r.get("others_cpu") is not None)
    load = f"load average (1 min) {la0[0]:.2f} before, {la1[0]:.2f} after" if la0 and la1 else "load not recorded"
    lines += ["", f"Machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs; {load}; other processes took "
                  + (f"a median {fmt_pct(others[len(others) // 2])} (max {fmt_pct(others[-1])}) of the machine "
                     f"while cases were timed." if others else "— (not measured).")]

    for ps in data.get("passes", []):
        lines.append("")
        lines.append(f"Re-measured whole because other processes disturbed it: {ps['network']} batch "
                     f"{_count(ps['batch'])} (worst case {fmt_pct(ps['others_before'])} → "
                     f"{fmt_pct(ps['others_after'])}; kept the {ps['kept']}).")
    lines += ["", "## Summary", ""]
    for it in data["targets"]:
        lines.append(f"- **{data['networks'][it['network']]['short']}**: {it['text']}")
        for e in it.get("evidence", []):
            lines.append(f"  - {e}")
    lines += ["", "| network | target | measured | verdict |", "|---|---|---:|---|"]
    for it in data["targets"]:
        lines.append(f"| {it['network']} | {TARGET_TITLE[it['target']]} | {fmt_ratio(it.get('value'))}"
                     f"{' at batch ' + _count(it['batch']) if it.get('value') is not None else ''} | {it['verdict']} |")

    lines += ["", "## Results", ""]
    lines.append("Columns: time per call for the whole batch (median); points per second; GFLOP/s on the counted "
                 "work of the path's method (see *FLOP counts*); time ÷ the fastest peer's time for the same "
                 "quantity and batch (below 1: faster than every peer); the largest scaled error against the float64 "
                 "reference over everything the path returns (y, dy/dx, the quantity); the share of the machine other "
                 "processes took while the case was timed.")
    for name, info in data["networks"].items():
        lines += ["", f"### {info['title']}", ""]
        for q in QUANTITIES:
            lines += [f"**{QUANTITY_TITLE[q]}**", "",
                      "| batch | path | method | time per call | points/s | GFLOP/s | ÷ fastest peer | max error | "
                      "others' CPU |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
            notes = []
            for b in _batches(data, name):
                recs = [r for r in data["results"] if r["network"] == name and r["batch"] == b and r["quantity"] == q]
                peer = _fastest(_ok(data, name, b, q, "peer"))
                timed = sorted((r for r in recs if r["status"] == "ok" and r.get("median_s") is not None),
                               key=lambda r: r["median_s"])
                for r in timed:
                    fam = (" *(from Hessian)*" if r["family"] == "from Hessian" else "") + (
                        " †" if r.get("isolated") else "")
                    star = "**" if r["family"] != "peer" and r is _fastest([t for t in timed
                                                                             if t["family"] == "nnpartials"]) else ""
                    lines.append(
                        f"| {_count(b)} | {star}{r['label']}{star}{fam} | {_short(r)} | "
                        f"{fmt_time(r['median_s'])} | {_rate(r)} | {fmt_gflops(r.get('gflops'))} | "
                        f"{fmt_ratio(r['median_s'] / peer['median_s']) if peer else '—'} | "
                        f"{_fmt_err(max((r.get('max_err') or {'-': None}).values(), key=lambda e: e or 0))} | "
                        f"{fmt_pct(r.get('others_cpu'))} |")
                for r in recs:
                    if r["status"] == "ok" and r.get("median_s") is None:
                        notes.append(f"batch {_count(b)}, {r['label']}: agreed (max error "
                                     f"{_fmt_err(r.get('max_err_quantity'))}), not timed")
                    elif r["status"] != "ok":
                        notes.append(f"batch {_count(b)}, {r['label']}: **{r['status']}**: {r['reason']}")
            if notes:
                lines += [""] + [f"- {n}" for n in notes]
            lines.append("")
        lines.append("The fastest nnpartials path (not counting Laplacians from the full Hessian) of each batch is in "
                     "bold.")

    lines += ["", "## Where onnxruntime spends its time", ""]
    lines.append(f"onnxruntime's own profiler on each graph of the bundle at the network's largest batch of this run, "
                 f"at most {PROFILE_MAX_BATCH:,} points (a warm-up and three runs; share of kernel time per op type, "
                 f"after graph optimisation):")
    lines += ["", "| network | graph | batch | nodes (optimised) | kernel time per run | top op types |",
              "|---|---|---:|---:|---:|---|"]
    for name in data["networks"]:
        ex = data["exports"].get(name, {})
        for p in data.get("profiles", {}).get(name, []):
            nodes = ex.get("nodes", {}).get(p["graph"])
            lines.append(f"| {name} | {p['graph']} | {_count(p['batch'])} | {nodes} ({p['nodes_optimised']}) | "
                         f"{p['kernel_ms_per_run']:.3g} ms | {_shares(p, 5)} |")
        if ex.get("error"):
            lines.append(f"| {name} | export failed: {ex['error']} | | | | |")

    lines += ["", "## Memory", ""]
    lines.append("Peak resident memory each path took beyond what the process held before its case (Linux VmHWM, "
                 "reset before each case; setup, first call and agreement check), at each network's largest batch. "
                 "TensorFlow runs last in each batch: oneDNN's allocator keeps the memory of its largest call for the "
                 "rest of the process. At batch 100,000 a case ran in a child process of its own (marked † in the "
                 f"tables; timed there the same way, with its own warm-up) when its peak at batch 1,000, × 100, "
                 f"exceeded {ISOLATE_GIB:g} GiB, and every TensorFlow case, so that its memory was returned when it "
                 f"ended. A batch-100,000 case whose predicted peak would not fit in the available memory less "
                 f"{MEM_MARGIN_GIB:g} GiB is skipped.")
    for name in data["networks"]:
        bs = _batches(data, name)
        recs = [r for r in data["results"] if r["network"] == name and bs and r["batch"] == bs[-1]
                and r.get("peak_mem_gib") is not None]
        if recs:
            lines.append(f"- {name}, batch {_count(bs[-1])}: " + ", ".join(
                f"{r['label']} {r['peak_mem_gib']:.2f} GiB" for r in sorted(recs, key=lambda r: -r["peak_mem_gib"])))

    lines += ["", "## FLOP counts", ""]
    lines.append("Counted as the suite counts (`benchmarks/workloads.py`): only the dense layers' multiply-adds, "
                 "2·in·out FLOPs per layer per point; one forward pass costs F per point. Each method pushes a "
                 "number of vectors through the same linear maps, and each vector costs F once more (the adjoint of a "
                 "linear map costs what the map costs); elementwise work (activations and their derivatives, the "
                 "products of second-order terms) is not counted. n = inputs, m = outputs. GFLOP/s = counted FLOPs "
                 "per point × batch ÷ time per call.")
    names = list(data["networks"])
    lines += ["", "| method | FLOPs per point | " + " | ".join(f"{n} (MFLOP)" for n in names) + " |",
              "|---|---|" + "---:|" * len(names)]
    used = {r.get("method") for r in data["results"]}
    for key, meth in METHODS.items():
        if key not in used:
            continue
        vals = " | ".join(f"{data['networks'][n]['flops'][key] / 1e6:.3g}" for n in names)
        lines.append(f"| {meth.short}: {meth.title} | {meth.formula} | {vals} |")
    lines.append("")
    lines.append("F per point: " + ", ".join(f"{n} {data['networks'][n]['forward_flops']:,} (n = "
                                             f"{data['networks'][n]['n_in']}, m = {data['networks'][n]['n_out']})"
                                             for n in names) + ".")

    lines += ["", "## Networks, reference and settings", ""]
    for name, info in data["networks"].items():
        ex = data["exports"].get(name, {})
        lines.append(f"- `{name}`: {info['architecture']}. Bundle: `nnpartials.export(model, order=2)` in "
                     f"{ex.get('seconds', 0):.1f} s (Jacobian mode {ex.get('jacobian_mode')}, C core "
                     f"{'yes' if ex.get('c_core') else 'no'}; second-order export validation max error "
                     f"{_fmt_err(ex.get('validation_max_rel'))}); graph nodes: "
                     + ", ".join(f"{k} {v}" for k, v in ex.get("nodes", {}).items()) + ".")
    lines.append(f"- Reference: float64 numpy, y with its first- and second-order tangents carried analytically "
                 f"through each layer (`reference` in the script; it shares no code with any path). Agreement: "
                 f"max |a − ref| ≤ {cfg['agree']:g} · max(1, max|ref|) for every array a path returns, on up to "
                 f"{2 * cfg['check_rows']} points (the first and last {cfg['check_rows']}); a path outside it is "
                 f"reported as wrong and not timed. HVP directions: one seeded normal vector per point.")
    lines.append("- The same weights everywhere: TensorFlow runs the Keras model; JAX, folx and PyTorch evaluate "
                 "the network from the Keras layers' weights; nnpartials runs the exported bundle. Inputs are "
                 "converted outside the timed region (tf.constant, device_put, torch.from_numpy).")
    lines.append(f"- Timing: first call (tracing, compilation, session creation) timed separately and left out; "
                 f"then a warm-up call and rounds of at least {config.MIN_ROUND_S * 1e3:g} ms (fast calls repeated "
                 f"within a round), about {cfg['target_s_small']:g} s of rounds per case below batch 100,000 and "
                 f"{cfg['target_s_large']:g} s at 100,000; median over rounds. Before each case the run waited (at "
                 f"most {cfg['quiet_per_case_s']:g} s, {cfg['quiet_budget_s']:g} s in all, {cfg['quiet_spent_s']:.0f} "
                 f"s spent) for other processes to use less than {100 * cfg['quiet_threshold']:.0f}% of the machine; "
                 f"a case during which they took more than {100 * config.DISTURBED:.0f}% was timed again (up to "
                 f"{config.MAX_ATTEMPTS} attempts, the least disturbed kept). A batch-100,000 case whose time, "
                 f"predicted from batch 1,000, exceeds {config.MAX_CALL_S:g} s is skipped.")
    ts = m.get("thread_settings", {})
    lines.append(f"- Threads: every library may use {ts.get('threads')} threads; " + "; ".join(
        f"{k}: {v}" for k, v in ts.items() if k not in ("threads", "c_core")) + f"; C core: Kernel(threads="
                 f"{ts.get('threads')}). `Partials` splits batches above its max_batch (65,536) into chunks.")
    v = m.get("versions", {})
    lines.append("- Versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "numpy", "tensorflow-cpu", "tensorflow",
                                                                    "keras", "onnxruntime", "jax", "folx", "torch",
                                                                    "nnpartials") if k in v))
    dirty = m.get("uncommitted")
    lines.append(f"- Machine: {m.get('cpu')} ({m.get('cpu_flags')}), {m.get('logical_cpus')} logical CPUs "
                 f"({m.get('affinity_cpus')} usable), {m.get('memory_gib')} GiB; {m.get('platform')}. Run "
                 f"{m.get('started')} → {m.get('finished')} (UTC), commit `{m.get('git_commit')}`"
                 + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "") + ".")
    if la0 and la1:
        loads = [r["loadavg_1m"] for r in data["results"] if r.get("loadavg_1m") is not None]
        lines.append(f"- Load average (1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in la0)}, after "
                     f"{', '.join(f'{x:.2f}' for x in la1)}" + (f"; between {min(loads):.2f} and {max(loads):.2f} "
                                                                  f"after the cases" if loads else "") + ".")
    lines.append("")
    return "\n".join(lines)


# ----- main -------------------------------------------------------------------------------------------------
def _names(s, known, what):
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {', '.join(known)})")
    return out


def machine() -> dict:
    from benchmarks.conftest import machine_info

    info = machine_info()
    for k in ("batches", "tiny", "report_command"):
        info.pop(k, None)
    try:
        import importlib.metadata as md

        info["versions"]["folx"] = md.version("folx")
    except Exception:
        pass
    return info


#: A (network, batch) group with a case during which other processes took more than this share of the machine is
#: measured again, whole, after the first pass (``--repasses``), as ``python -m benchmarks.report`` does.
DISTURBED_GROUP = 0.25
REPASS_QUIET_BUDGET_S = 60.0


def _group_others(results, name, batch) -> float:
    return max([r.get("others_cpu") or 0.0 for r in results
                if r["network"] == name and r["batch"] == batch and r["status"] == "ok"] or [0.0])


def run_group(ctx, name, batch, todo, args, gate, profs, prior, *, profile) -> list:
    """Every path of ``todo`` on network ``name`` at ``batch``; ``prior`` holds (path, batch) -> (median_s,
    peak_mem_gib) of earlier cases (batch-100,000 predictions from batch 1,000)."""
    out = []
    for k, p in enumerate(todo):
        if profile and p.name.startswith("tf_") and (k == 0 or not todo[k - 1].name.startswith("tf_")):
            _profile_network(ctx, name, batch, args, profs)
        t_prior, m_prior = prior.get((p.name, 1000), (None, None))
        run = run_case_isolated if needs_isolation(p, batch, m_prior) else run_case
        rec = run(ctx, name, batch, p, quick=args.quick, gate=gate, prior=t_prior, prior_mem=m_prior)
        if rec.get("status") == "ok":
            prior[(p.name, batch)] = (rec.get("median_s"), rec.get("peak_mem_gib"))
        out.append(rec)
        shown = (fmt_time(rec["median_s"]) if rec.get("median_s") is not None
                 else f"{rec['status']}: {rec['reason']}")
        print(f"{name} batch {batch:,} {p.quantity} {p.name}: {shown}"
              + (f" (max err {_fmt_err(rec.get('max_err_quantity'))})"
                 if rec.get("max_err_quantity") is not None else ""), flush=True)
    if profile:
        _profile_network(ctx, name, batch, args, profs)  # when no TensorFlow path ran
    return out


def _profile_network(ctx, name, batch, args, profs):
    if args.no_profile or name in profs or isinstance(ctx._bundles.get(name), Exception):
        return
    try:
        profs[name] = profiles(ctx, name, batch)
    except Exception as exc:
        profs[name] = []
        print(f"{name}: profiling failed: {type(exc).__name__}: {exc}", flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.second_order", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 1 and 1,000 only, fewer timed rounds")
    ap.add_argument("--networks", default=",".join(NETWORKS), help=f"comma-separated, of {', '.join(NETWORKS)}")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,1000,100000; "
                                                    "--quick: 1,1000)")
    ap.add_argument("--paths", default=None, help="comma-separated path names (default: all)")
    ap.add_argument("--out-dir", default=HERE, help="where SECOND_ORDER.md and second_order.json go")
    ap.add_argument("--n-validation", type=int, default=None, help="export-time validation points (default: "
                                                                   "the exporter's)")
    ap.add_argument("--no-profile", action="store_true", help="skip the onnxruntime profiles")
    ap.add_argument("--no-run", action="store_true", help="render SECOND_ORDER.md again from the record in --out-dir")
    ap.add_argument("--quiet-budget", type=float, default=None,
                    help="seconds in all to wait for other processes to quiet down (default 150; --quick 30)")
    ap.add_argument("--repasses", type=int, default=1,
                    help="measure (network, batch) groups that other processes disturbed again, whole, up to this "
                         "many times, keeping the less disturbed pass (default 1)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # a child process running one case (run_case_isolated)
    ap.add_argument("--case-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    config.configure_threads()  # before TensorFlow, JAX or PyTorch is imported
    if args.case:
        return _child_case(json.loads(args.case), args.case_out)
    if args.no_run:
        with open(os.path.join(args.out_dir, "second_order.json")) as f:
            return write(json.load(f), args.out_dir)
    networks = _names(args.networks, NETWORKS, "network")
    batches = ([int(b) for b in args.batches.split(",")] if args.batches
               else list(QUICK_BATCHES if args.quick else FULL_BATCHES))
    chosen = _names(args.paths, BY_NAME, "path") if args.paths else [p.name for p in PATHS]
    command = "python -m benchmarks.second_order" + ("" if not argv else " " + " ".join(argv))
    info = machine()
    budget = args.quiet_budget if args.quiet_budget is not None else (30.0 if args.quick else 150.0)
    gate = QuietGate(budget_s=budget)
    results, nets, profs, passes = [], {}, {}, []
    prior = {name: {} for name in networks}  # per network: (path, batch) -> median_s and peak memory
    # TensorFlow last in each group: its allocator (oneDNN's BFC pool) keeps the memory of a large batch for the
    # rest of the process, so the other paths, and the profiles, run before it holds several GiB
    todo = [p for q in QUANTITIES for p in PATHS if p.quantity == q and p.name in chosen]
    todo = [p for p in todo if not p.name.startswith("tf_")] + [p for p in todo if p.name.startswith("tf_")]
    with tempfile.TemporaryDirectory(prefix="nnp-so-") as tmp:
        ctx = Context(tmp, args.n_validation)
        for name in networks:
            w = ctx.network(name)
            nets[name] = {"title": NETWORK_TITLE[name], "short": name, "architecture": w.describe(),
                          "n_in": w.n_in, "n_out": w.n_out, "forward_flops": w.forward_flops,
                          "flops": {k: meth.flops(w) for k, meth in METHODS.items()}}
            try:
                ctx.bundle(name)
            except Exception as exc:
                print(f"{name}: export(order=2) failed: {type(exc).__name__}: {exc}", flush=True)
            for batch in batches:
                results += run_group(ctx, name, batch, todo, args, gate, profs, prior[name],
                                     profile=batch == max(batches))
        for k in range(1, args.repasses + 1):  # groups other processes disturbed, measured again whole
            again = [(n, b) for n in networks for b in batches if _group_others(results, n, b) > DISTURBED_GROUP]
            for n, b in again:
                before = _group_others(results, n, b)
                print(f"re-pass {k}: {n} batch {b:,} (other processes took up to {100 * before:.0f}%)", flush=True)
                gate2 = QuietGate(budget_s=REPASS_QUIET_BUDGET_S)
                new = run_group(ctx, n, b, todo, args, gate2, profs, prior[n], profile=False)
                after = max((r.get("others_cpu") or 0.0) for r in new)
                kept = "re-pass" if after < before else "first pass"
                if after < before:
                    results = [r for r in results if not (r["network"] == n and r["batch"] == b)] + new
                passes.append({"pass": k, "network": n, "batch": b, "others_before": before, "others_after": after,
                               "kept": kept, "quiet_spent_s": gate2.spent})
        exports = ctx.exports
    order = {key: k for k, key in enumerate((n, b, p.name) for n in networks for b in batches for p in todo)}
    results.sort(key=lambda r: order.get((r["network"], r["batch"], r["path"]), len(order)))
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = {"command": command, "machine": info, "networks": nets, "exports": exports,
            "methods": {k: {"title": m.title, "formula": m.formula} for k, m in METHODS.items()},
            "config": {"quick": args.quick, "batches": batches, "agree": AGREE, "check_rows": config.CHECK_ROWS,
                       "min_round_s": config.MIN_ROUND_S,
                       "target_s_small": config.TARGET_S_SMALL * (QUICK_SHARE if args.quick else 1),
                       "target_s_large": config.TARGET_S_LARGE * (QUICK_SHARE if args.quick else 1),
                       "disturbed": config.DISTURBED, "max_attempts": config.MAX_ATTEMPTS,
                       "quiet_threshold": gate.threshold, "quiet_per_case_s": gate.per_case_s,
                       "quiet_budget_s": gate.budget_s, "quiet_spent_s": gate.spent},
            "results": results, "profiles": profs, "passes": passes}
    os.makedirs(args.out_dir, exist_ok=True)
    return write(data, args.out_dir)


def write(data, out_dir) -> int:
    """Judge the targets, write ``second_order.json`` and ``SECOND_ORDER.md`` into ``out_dir``."""
    data["targets"] = targets(data)
    jpath, mpath = os.path.join(out_dir, "second_order.json"), os.path.join(out_dir, "SECOND_ORDER.md")
    with open(jpath, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    with open(mpath, "w") as f:
        f.write(render(data))
    print(f"wrote {mpath} and {jpath}")
    for it in data["targets"]:
        print(f"{it['network']}: {it['text']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
