"""The benchmarked paths: how each computes y and dy/dx for a workload.

A path builds a :class:`Runner` for one workload. ``prepare`` turns the float32 numpy input into what the
path consumes (a tf.Tensor, a torch tensor, a float64 array, ...) outside the timed region; ``call`` is what is
timed; ``to_numpy`` converts the result for the agreement check (outside the timed region). Results stay in
the path's native type inside ``call`` (JAX results are waited for with ``block_until_ready``).

Families: ``floor`` (onnxruntime forward pass only), ``nnpartials`` (the companion graph in each mode, the
``Partials`` wrapper, the C core), ``peer`` (TensorFlow, JAX, jax2onnx (JAX's jacrev as an ONNX graph in
onnxruntime, the other way to get an input Jacobian as plain ONNX), PyTorch; the report's "fastest peer" is the
fastest of these at each workload and batch size).

Inputs reach every path in the model's own shape (``Workload.shaped``: ``[batch, 28, 28, 1]`` for ``cnn``,
``[batch, n_in]`` otherwise; NCHW for PyTorch's convolutions), and every ``to_numpy`` gives dy/dx as
``[batch, n_out, n_in]`` over the flattened (C-order, NHWC) features.

A path that cannot run on this machine says why in ``available`` (a skip: a missing extra, no C compiler); a path
that does not apply to a workload at all says why in ``applies`` (the C core on the convolutional workload): such
a case is not collected, and the record lists it as ``n/a`` with the reason, not as a skip.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from benchmarks import config


@dataclass
class Runner:
    call: Callable
    prepare: Callable = lambda x: x
    to_numpy: Callable = None  # result -> (y or None, dy_dx or None[, fd error])
    note: str | None = None


@dataclass
class Path:
    name: str
    label: str
    family: str
    #: "y" (forward only) or "y+J" (y and dy/dx) or "J" (dy/dx only)
    computes: str
    #: number of tangent/cotangent directions for a workload (0: forward pass only)
    directions: Callable
    make: Callable  # (ctx, workload) -> Runner
    #: returns None when the path can run here, else the reason it cannot
    available: Callable = lambda: None
    dtype: str = "float32"
    #: the C core works through large batches in fixed blocks: no batch-sized intermediates
    blocked: bool = False
    #: times itself (a subprocess); not timed by pytest-benchmark
    self_timed: bool = False
    flop_factor: Callable = None  # (workload) -> evaluations per point, overrides 1 + directions
    #: modules imported before the setup is timed (import cost is a per-process cost, not the path's setup)
    preload: tuple = ()
    #: (workload name) -> None when the path applies to that workload, else why it does not (not a skip: the
    #: case is not collected and the record says "n/a")
    applies: Callable = lambda name: None
    #: runs on one thread whatever ``config.THREADS`` says (the C program): its fraction of the measured multiply-add
    #: peak is of one core, not of every core the suite lets the libraries use
    single_thread: bool = False

    def cores(self) -> int:
        """Cores whose multiply-add peak this path's GFLOP/s is compared with."""
        return 1 if self.single_thread else config.THREADS

    def flops_per_point(self, w) -> int:
        if self.flop_factor is not None:
            return w.forward_flops * self.flop_factor(w)
        return w.forward_flops * (1 + self.directions(w))


def _mode_k(mode):
    return lambda w: w.n_in if mode == "forward" else w.n_out


def auto_mode(w) -> str:
    """The mode ``export(mode="auto")`` picks for this workload (the exporter's own rule)."""
    from nnpartials.exporter.jacobian import choose_mode

    return choose_mode(w.n_in, w.n_out, "auto")


_IMPORTABLE = {}


def _have(module, extra_hint):
    def check():
        if module not in _IMPORTABLE:
            try:
                importlib.import_module(module)
                _IMPORTABLE[module] = None
            except ImportError as exc:
                _IMPORTABLE[module] = f"{module} is not installed ({extra_hint}): {exc}"
        return _IMPORTABLE[module]

    return check


# ----- onnxruntime ------------------------------------------------------------------------------------------
def _ort_session(path, profile_prefix=None, optimized_path=None):
    """The suite's onnxruntime session; ``profile_prefix``: with onnxruntime's profiler on (``benchmarks.paired``);
    ``optimized_path``: where to write the graph after onnxruntime's optimiser."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = config.THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def _flat_j(w, j):
    """dy/dx from a path's own layout [batch, n_out, *input shape] to [batch, n_out, n_in]."""
    return np.asarray(j).reshape(len(j), w.n_out, w.n_in)


def make_ort_forward(ctx, w):
    bundle = ctx.bundle(w.name, auto_mode(w))
    sess = _ort_session(os.path.join(bundle.path, "model.onnx"))
    name = bundle.manifest["inputs"][0]["name"]
    return Runner(call=lambda x: sess.run(None, {name: x}), prepare=w.shaped, to_numpy=lambda out: (out[0], None))


def make_ort_jacobian(mode):
    def make(ctx, w):
        bundle = ctx.bundle(w.name, mode)
        sess = _ort_session(os.path.join(bundle.path, "model.jac.onnx"))
        name = bundle.manifest["inputs"][0]["name"]
        return Runner(call=lambda x: sess.run(None, {name: x}), prepare=w.shaped,
                      to_numpy=lambda out: (out[0], _flat_j(w, out[1])))

    return make


def make_partials(ctx, w):
    import nnpartials

    bundle = ctx.bundle(w.name, auto_mode(w))
    p = nnpartials.Partials(bundle.path, threads=config.THREADS)
    # an image goes in as [batch, 28, 28, 1], as a user would pass it (Partials also takes [batch, 784])
    return Runner(call=p.jacobian, prepare=w.shaped, to_numpy=lambda out: out)


# ----- the C core -------------------------------------------------------------------------------------------
C_CORE_NA = ("not applicable: the C core covers dense chains only (Dense layers with elementwise activations); "
             "this workload has convolutions and max-pooling, and its bundle has no model.nnp")


def c_core_applies(name):
    from benchmarks.workloads import kind

    return None if kind(name) == "dense" else C_CORE_NA


def kernel_available():
    try:
        importlib.import_module("nnpartials.runtime.kernel")
    except ImportError as exc:
        return f"the C core's Python module is not available ({exc})"
    except Exception as exc:  # a build problem, say
        return f"the C core's Python module failed to import ({type(exc).__name__}: {exc})"
    return None



def nnp_file(ctx, w):
    """(path of the C weight file, note): the bundle's model.nnp, or, while the exporter cannot lower the model,
    the same network written by the suite with the C core's own writer (``nnpartials.exporter.nnp``)."""
    bundle = ctx.bundle(w.name, auto_mode(w))
    if bundle.has_c_core:
        return os.path.join(bundle.path, "model.nnp"), None
    reason = bundle.manifest.get("c_core", {}).get("reason")
    try:
        path = ctx.suite_nnp(w)
    except ImportError as exc:
        ctx.skip(f"the bundle has no model.nnp ({reason}) and the weight-file writer is unavailable ({exc})")
    return path, f"model.nnp written by the suite (the bundle has none: {reason})"


def _kernel(ctx, w):
    from nnpartials.runtime.kernel import Kernel

    path, note = nnp_file(ctx, w)
    return Kernel(path, threads=config.THREADS), note


def make_kernel(ctx, w):
    k, note = _kernel(ctx, w)
    return Runner(call=k.jacobian, to_numpy=lambda out: out, note=note)


def make_kernel_fd(ctx, w):
    k, note = _kernel(ctx, w)
    return Runner(call=k.fd_jacobian, prepare=lambda x: np.ascontiguousarray(x, dtype=np.float64),
                  to_numpy=lambda out: (None, out[0], out[1]), note=note)


def make_c_alone(ctx, w, op="jacobian"):
    from benchmarks import cbench

    path, note = nnp_file(ctx, w)
    prog = cbench.Program(ctx.c_program(), path, w, op=op)
    prog.note = note
    return prog


def make_c_alone_forward(ctx, w):
    return make_c_alone(ctx, w, op="forward")


def c_alone_available():
    from benchmarks import cbench

    return cbench.unavailable()


# ----- TensorFlow -------------------------------------------------------------------------------------------
def _tf_fn(w):
    import tensorflow as tf

    model = w.keras_model
    if w.n_out == 1:
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = model(x, training=False)
                s = tf.reduce_sum(y)
            return y, tf.expand_dims(tape.gradient(s, x), 1)
    else:
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = model(x, training=False)
            return y, tape.batch_jacobian(y, x)
    return fn


def make_tf(compiled):
    def make(ctx, w):
        import tensorflow as tf

        fn = _tf_fn(w)
        if compiled:
            # no Python control flow to convert; autograph=False also keeps tracing independent of the source
            # file on disk (autograph re-reads it)
            fn = tf.function(fn, autograph=False)
        return Runner(call=fn, prepare=lambda x: tf.constant(w.shaped(x)),
                      to_numpy=lambda out: (out[0].numpy(), _flat_j(w, out[1].numpy())))

    return make


# ----- JAX --------------------------------------------------------------------------------------------------
def _jax_act(name):
    import jax
    import jax.numpy as jnp

    from benchmarks.workloads import LEAKY_SLOPE

    return {
        "linear": lambda z: z,
        "leaky_relu": lambda z: jnp.where(z > 0, z, LEAKY_SLOPE * z),
        "tanh": jnp.tanh,
        "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    }[name]


def _jax_cnn(w):
    """(f(params, x) for one point x [28, 28, 1] → (y, y), params): the CNN in Keras's own layouts (NHWC, HWIO),
    ``lax.conv_general_dilated`` and ``lax.reduce_window``."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from benchmarks.workloads import Conv, Dense, Flatten, MaxPool

    ops = list(w.ops)
    params = tuple((jnp.asarray(op.kernel), jnp.asarray(op.bias)) if isinstance(op, Conv) else
                   (jnp.asarray(op.weight), jnp.asarray(op.bias)) if isinstance(op, Dense) else None for op in ops)
    acts = {"relu": jax.nn.relu, "linear": lambda z: z, "softmax": jax.nn.softmax}

    def f(params, x):
        h = x[None]  # a batch of one: [1, H, W, C]
        for op, p in zip(ops, params):
            if isinstance(op, Conv):
                h = acts[op.activation](lax.conv_general_dilated(
                    h, p[0], (1, 1), op.padding.upper(), dimension_numbers=("NHWC", "HWIO", "NHWC")) + p[1])
            elif isinstance(op, MaxPool):
                k = (1, op.size, op.size, 1)
                h = lax.reduce_window(h, -jnp.inf, lax.max, k, k, "VALID")  # a Python -inf: JAX sees max-pool
            elif isinstance(op, Flatten):
                h = h.reshape(-1)  # (h, w, c) order, as Keras's Flatten
            else:
                h = acts[op.activation](h @ p[0] + p[1])
        return h, h

    return f, params


def _jax_fn(w):
    """(f, args): the JAX peer's network for one point, ``f(*args, x) → (y, y)`` with x in the model's own shape
    per point and the weights in ``args`` (shared by the JAX paths and the jax2onnx export)."""
    import jax.numpy as jnp

    if w.kind == "cnn":
        f, params = _jax_cnn(w)
        return f, (params,)

    acts = [_jax_act(a) for _, _, a in w.layers]
    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b, _ in w.layers]
    norm = None if w.normalization is None else tuple(jnp.asarray(v, jnp.float32) for v in w.normalization)

    def f(params, norm, x):  # one point: x [n_in] -> y [n_out]
        h = x if norm is None else (x - norm[0]) / norm[1]
        for (W, b), act in zip(params, acts):
            h = act(h @ W + b)
        return h, h

    return f, (params, norm)


def make_jax(transform):
    def make(ctx, w):
        import jax

        f, args = _jax_fn(w)
        jac = getattr(jax, transform)(f, argnums=len(args), has_aux=True)
        fn = jax.jit(jax.vmap(jac, in_axes=(None,) * len(args) + (0,)))

        def call(x):
            return jax.block_until_ready(fn(*args, x))

        return Runner(call=call, prepare=lambda x: jax.device_put(w.shaped(x)),
                      to_numpy=lambda out: (np.asarray(out[1]), _flat_j(w, out[0])))

    return make


# ----- jax2onnx: JAX's jacrev exported to a plain ONNX graph, run in onnxruntime ------------------------------
_JAX2ONNX_FILES = {}  # (suite folder, workload) -> the exported file, or (SKIP_MARK, why it could not be exported)
SKIP_MARK = "skip"


def jax2onnx_file(ctx, w):
    """The ONNX file of ``vmap(jacrev)`` of the JAX peer's network (weights as initializers), exported once per
    workload with jax2onnx and a symbolic batch axis ``B``: inputs ``[B, *input shape]``, outputs y ``[B, n_out]``
    and dy/dx ``[B, n_out, *input shape]``. A model jax2onnx cannot export is a skip that names the error (jax2onnx
    0.17.1 on the CNN: no rule for ``select_and_scatter_add``, the derivative of ``reduce_window`` max-pooling;
    with the pools written as reshape + max, the input-gradient convolution's layouts and, for a symbolic batch,
    a shape comparison are unsupported in turn)."""
    key = (ctx.tmp, w.name)
    if key not in _JAX2ONNX_FILES:
        import jax
        import jax2onnx

        f, args = _jax_fn(w)

        def jac(x):  # a batch, in the model's own shape
            j, y = jax.vmap(jax.jacrev(lambda xi: f(*args, xi), has_aux=True))(x)
            return y, j

        path = os.path.join(ctx.tmp, f"{w.name}.jax2onnx.onnx")
        try:
            model = jax2onnx.to_onnx(jac, inputs=[("B", *w.input_shape)], model_name=f"{w.name}_jacrev",
                                     input_names=["x"], output_names=["y", "dy_dx"])
        except Exception as exc:  # an op jax2onnx has no handler for: the path cannot run this network
            first = (str(exc).strip().splitlines() or [""])[0]
            _JAX2ONNX_FILES[key] = SKIP_MARK, (f"jax2onnx {_dist_version('jax2onnx')} could not export jacrev of this "
                                               f"network: {type(exc).__name__}: {first}")[:500]
        else:
            with open(path, "wb") as fh:
                fh.write(model.SerializeToString())
            _JAX2ONNX_FILES[key] = path
    got = _JAX2ONNX_FILES[key]
    if isinstance(got, tuple):  # the export failed for an earlier batch size: the same skip, without retrying
        ctx.skip(got[1])
    return got


def _dist_version(dist):
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:  # pragma: no cover
        return "(unknown version)"


def make_jax2onnx(ctx, w):
    # the same session options as the companion graph's path (_ort_session)
    sess = _ort_session(jax2onnx_file(ctx, w))
    name = sess.get_inputs()[0].name
    return Runner(call=lambda x: sess.run(None, {name: x}), prepare=w.shaped,
                  to_numpy=lambda out: (out[0], _flat_j(w, out[1])))


# ----- PyTorch ----------------------------------------------------------------------------------------------
def _torch_cnn(w):
    """f(x) for one point x [C, H, W] → (y, y): the CNN in PyTorch's layouts. Kernels HWIO → OIHW; the input
    NHWC → NCHW (in ``prepare``, outside the timed region; a reshape for one channel); the Dense weight's rows
    reordered from Keras's (h, w, c) flatten order to NCHW's (c, h, w), so no activation is transposed back."""
    import torch
    import torch.nn.functional as F

    from benchmarks.workloads import Conv, Dense, Flatten, MaxPool

    acts = {"relu": torch.relu, "linear": lambda z: z, "softmax": lambda z: torch.softmax(z, dim=-1)}
    steps = []
    shape = tuple(w.input_shape)  # NHWC shape of the current activation, per point
    for op, out_shape in zip(w.ops, w.shapes[1:]):
        if isinstance(op, Conv):
            k = torch.from_numpy(np.ascontiguousarray(op.kernel.transpose(3, 2, 0, 1)))
            steps.append(("conv", (k, torch.from_numpy(op.bias), op.padding, acts[op.activation])))
        elif isinstance(op, MaxPool):
            steps.append(("pool", op.size))
        elif isinstance(op, Flatten):
            flat_from = shape
            steps.append(("flatten", None))
        else:
            W = op.weight
            if steps and steps[-1][0] == "flatten":
                h_, w_, c_ = flat_from
                W = W.reshape(h_, w_, c_, -1).transpose(2, 0, 1, 3).reshape(h_ * w_ * c_, -1)
            steps.append(("dense", (torch.from_numpy(np.ascontiguousarray(W)), torch.from_numpy(op.bias),
                                    acts[op.activation])))
        shape = out_shape

    def f(x):
        h = x[None]  # a batch of one: [1, C, H, W]
        for kind, p in steps:
            if kind == "conv":
                h = p[3](F.conv2d(h, p[0], p[1], padding=p[2]))
            elif kind == "pool":
                h = F.max_pool2d(h, p)
            elif kind == "flatten":
                h = h.reshape(-1)  # (c, h, w) order: the Dense rows were reordered to match
            else:
                h = p[2](h @ p[0] + p[1])
        return h, h

    return f


def _nchw_j(w, j):
    """dy/dx [batch, n_out, C, H, W] from PyTorch → [batch, n_out, n_in] in NHWC (Keras) feature order."""
    j = np.asarray(j)
    return np.ascontiguousarray(j.transpose(0, 1, 3, 4, 2)).reshape(len(j), w.n_out, w.n_in)


def make_torch(ctx, w):
    import torch
    import torch.nn.functional as F
    from torch.func import jacrev, vmap

    from benchmarks.workloads import LEAKY_SLOPE

    torch.set_num_threads(config.THREADS)
    if w.kind == "cnn":
        jf_cnn = vmap(jacrev(_torch_cnn(w), has_aux=True))

        def call_cnn(x):
            with torch.no_grad():
                return jf_cnn(x)

        return Runner(call=call_cnn,
                      prepare=lambda x: torch.from_numpy(np.ascontiguousarray(w.shaped(x).transpose(0, 3, 1, 2))),
                      to_numpy=lambda out: (out[1].numpy(), _nchw_j(w, out[0].numpy())))
    acts = {"linear": lambda z: z, "leaky_relu": lambda z: torch.where(z > 0, z, LEAKY_SLOPE * z),
            "tanh": torch.tanh, "gelu": lambda z: F.gelu(z, approximate="none")}
    layers = [(torch.from_numpy(np.ascontiguousarray(W)), torch.from_numpy(b), acts[a]) for W, b, a in w.layers]
    norm = None if w.normalization is None else tuple(torch.tensor(v, dtype=torch.float32) for v in w.normalization)

    def f(x):  # one point
        h = x if norm is None else (x - norm[0]) / norm[1]
        for W, b, act in layers:
            h = act(h @ W + b)
        return h, h

    jf = vmap(jacrev(f, has_aux=True))

    def call(x):
        with torch.no_grad():
            return jf(x)

    return Runner(call=call, prepare=lambda x: torch.from_numpy(np.ascontiguousarray(x)),
                  to_numpy=lambda out: (out[1].numpy(), out[0].numpy()))


# ----- the registry -----------------------------------------------------------------------------------------
_PEERS_HINT = "install the [peers] extra: pip install -e '.[peers]'"

PATHS = [
    Path("ort_forward", "onnxruntime forward only (model.onnx)", "floor", "y", lambda w: 0, make_ort_forward),
    Path("ort_jac_forward", "companion graph, forward mode (onnxruntime)", "nnpartials", "y+J", _mode_k("forward"),
         make_ort_jacobian("forward")),
    Path("ort_jac_reverse", "companion graph, reverse mode (onnxruntime)", "nnpartials", "y+J", _mode_k("reverse"),
         make_ort_jacobian("reverse")),
    Path("partials", "nnpartials.Partials.jacobian (auto mode)", "nnpartials", "y+J",
         lambda w: _mode_k(auto_mode(w))(w), make_partials),
    Path("c_kernel", "C core analytic (Kernel.jacobian, threads split large batches)", "nnpartials", "y+J", lambda w: min(w.n_in, w.n_out),
         make_kernel, available=kernel_available, blocked=True,
         preload=("nnpartials.runtime.kernel",), applies=c_core_applies),
    Path("c_alone", "C core analytic, C alone (nnp_jacobian)", "nnpartials", "y+J", lambda w: min(w.n_in, w.n_out),
         make_c_alone, available=c_alone_available, blocked=True, self_timed=True, applies=c_core_applies,
         single_thread=True),
    Path("c_alone_fwd", "C core forward only, C alone (nnp_forward)", "floor", "y", lambda w: 0,
         make_c_alone_forward, available=c_alone_available, blocked=True, self_timed=True, applies=c_core_applies,
         single_thread=True),
    Path("c_kernel_fd", "C core finite differences, float64 (Kernel.fd_jacobian)", "check", "J",
         lambda w: 4 * w.n_in, make_kernel_fd, available=kernel_available, dtype="float64", blocked=True,
         preload=("nnpartials.runtime.kernel",), applies=c_core_applies,
         flop_factor=lambda w: 1 + 4 * w.n_in),
    Path("tf_function", "TensorFlow GradientTape in tf.function", "peer", "y+J", lambda w: w.n_out, make_tf(True),
         preload=("tensorflow",)),
    Path("tf_eager", "TensorFlow GradientTape, eager", "peer", "y+J", lambda w: w.n_out, make_tf(False),
         preload=("tensorflow",)),
    Path("jax_jacrev", "JAX jit(vmap(jacrev))", "peer", "y+J", lambda w: w.n_out, make_jax("jacrev"),
         available=_have("jax", _PEERS_HINT), preload=("jax",)),
    Path("jax_jacfwd", "JAX jit(vmap(jacfwd))", "peer", "y+J", lambda w: w.n_in, make_jax("jacfwd"),
         available=_have("jax", _PEERS_HINT), preload=("jax",)),
    Path("jax2onnx_jacrev", "jax2onnx: JAX vmap(jacrev) exported to ONNX, onnxruntime", "peer", "y+J",
         lambda w: w.n_out, make_jax2onnx, available=_have("jax2onnx", _PEERS_HINT), preload=("jax", "jax2onnx")),
    Path("torch_jacrev", "PyTorch torch.func vmap(jacrev)", "peer", "y+J", lambda w: w.n_out, make_torch,
         available=_have("torch", _PEERS_HINT), preload=("torch", "torch.func")),
]
BY_NAME = {p.name: p for p in PATHS}
