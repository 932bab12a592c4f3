"""The four benchmark workloads, built deterministically (fixed seeds, no downloads).

Each workload is a Keras model plus a plain description of the same network (the weights as numpy arrays and the
activation names) that the JAX and PyTorch peers and the float64 numpy reference use, so every path computes the
same function with the same weights. Dense workloads describe themselves as ``layers``; the convolutional one as
``ops`` (:class:`Conv`, :class:`MaxPool`, :class:`Flatten`, :class:`Dense`, in Keras's layouts: NHWC activations,
HWIO kernels, Flatten in (h, w, c) order).

1. ``seed``: Normalization + Dense 64, 64, 32, 32, 16, 16, 8 each followed by LeakyReLU, linear Dense 1;
   2 inputs, 1 output.
2. ``physics``: 3 inputs, four Dense 256 tanh layers, linear Dense 2.
3. ``wide``: 64 inputs, Dense 256, 256 with gelu (exact, erf form), linear Dense 1.
4. ``cnn``: a small image classifier on a 28×28×1 image (channels last, as Keras): Conv2D 8 filters 3×3 relu
   (``valid`` padding, Keras's default and the classic MNIST example's: 28 → 26) → MaxPooling2D 2 (→ 13) →
   Conv2D 16 3×3 relu (→ 11) → MaxPooling2D 2 (→ 5; the last row and column are dropped, as Keras does) →
   Flatten (400) → Dense 10 softmax. The outputs are the class probabilities (every peer has softmax, so the
   derivative of the probabilities is benchmarked, not of the logits); n_in = 784 flattened pixels (C order of
   [28, 28, 1]), n_out = 10. No C core: the C core covers dense chains only, so its paths do not apply.

FLOP convention (used for GFLOP/s in the report): only the multiply-adds of the dense and convolution layers
count. A dense layer costs 2·in·out per point; a convolution costs 2·k_h·k_w·c_in·c_out per output position
(out_h·out_w positions per point); normalization, bias additions, activations, pooling and softmax are not counted.
A forward pass costs ``F`` = the sum over layers per point (``cnn``: 2·3·3·1·8·26·26 + 2·3·3·8·16·11·11 + 2·400·10
= 97,344 + 278,784 + 8,000 = 384,128). A Jacobian computed with K directions (K = n_in for forward mode, K = n_out
for reverse mode) costs ``F·(1 + K)`` per point: one forward pass plus one pass of the same linear maps per
direction. The float64 finite-difference Jacobian of the C core evaluates the network ``1 + 4·n_in`` times per
point (central differences with steps h and h/2), so it counts ``F·(1 + 4·n_in)``.

Inputs: dense workloads draw from a seeded normal distribution. ``cnn`` draws pixels uniformly in [0, 1) with a
seed, then redraws every point at which the float64 network comes within :data:`KINK_MARGIN` of a kink (a ReLU
pre-activation within it of 0, or a max-pool window whose largest positive value is within it of the runner-up):
there the derivative changes discontinuously, and a float32 path whose rounding lands on the other side of the
kink would be compared with the other one-sided derivative. Away from kinks the reference is the analytic
derivative of the exact network, independent of every benchmarked path (see :func:`reference`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Keras 3's LeakyReLU default negative slope.
LEAKY_SLOPE = 0.3
#: ``cnn`` inputs are redrawn where the float64 network comes closer than this to a kink that matters (see
#: :func:`cnn_forward`). float32 evaluation (TensorFlow) differs from float64 by at most ~2.5e-7 in this network's
#: pre-activations (values up to ~1; sums of 9 and 72 products), so 1e-5 leaves a margin of ~40× for any path's
#: summation order; about one uniformly drawn point in seven is drawn again.
KINK_MARGIN = 1e-5


@dataclass
class Conv:
    """Conv2D, stride 1, no dilation: ``kernel [kh, kw, c_in, c_out]`` (Keras HWIO), NHWC activations."""
    kernel: np.ndarray
    bias: np.ndarray
    activation: str  # "relu" or "linear"
    padding: str = "valid"


@dataclass
class MaxPool:
    """MaxPooling2D with pool size = stride = ``size``, ``valid`` padding (rows and columns left over dropped)."""
    size: int


@dataclass
class Flatten:
    """Keras Flatten of an NHWC activation: (h, w, c) order."""


@dataclass
class Dense:
    weight: np.ndarray  # [in, out]
    bias: np.ndarray
    activation: str  # "linear" or "softmax"


@dataclass
class Workload:
    name: str
    title: str
    n_in: int
    n_out: int
    #: dense workloads: [(W [in, out] float32, b [out] float32, activation name)]; [] for ``cnn``
    layers: list
    #: (mean [n_in], std [n_in]) of an input Normalization layer, or None
    normalization: tuple | None
    #: mean and std of the input distribution the benchmark points are drawn from (dense workloads)
    input_mean: np.ndarray | None
    input_std: np.ndarray | None
    keras_model: object = field(default=None, repr=False)
    #: "dense" (a chain of Dense layers: the C core applies) or "cnn"
    kind: str = "dense"
    #: the shape of one point as the model takes it: (n_in,) or (28, 28, 1)
    input_shape: tuple = ()
    #: ``cnn``: the network as Conv / MaxPool / Flatten / Dense steps
    ops: list = field(default_factory=list)

    def __post_init__(self):
        if not self.input_shape:
            self.input_shape = (self.n_in,)

    @property
    def shapes(self) -> list:
        """Per-point shape after each step, the input first."""
        if self.kind == "dense":
            return [(self.n_in,)] + [(w.shape[1],) for w, _, _ in self.layers]
        out = [tuple(self.input_shape)]
        for op in self.ops:
            out.append(_op_shape(op, out[-1]))
        return out

    @property
    def widths(self) -> list:
        """Values per point after each step (for ``cnn``: 784, 5408, 1352, 1936, 400, 400, 10)."""
        return [int(np.prod(s)) for s in self.shapes]

    @property
    def max_width(self) -> int:
        return max(self.widths)

    @property
    def forward_flops(self) -> int:
        """Counted FLOPs of one forward pass for one point (2·in·out per dense layer; 2·k_h·k_w·c_in·c_out per output
        position of a convolution)."""
        if self.kind == "dense":
            return sum(2 * w.shape[0] * w.shape[1] for w, _, _ in self.layers)
        total = 0
        for op, out_shape in zip(self.ops, self.shapes[1:]):
            if isinstance(op, Conv):
                kh, kw, ci, co = op.kernel.shape
                total += 2 * kh * kw * ci * co * out_shape[0] * out_shape[1]
            elif isinstance(op, Dense):
                total += 2 * op.weight.shape[0] * op.weight.shape[1]
        return total

    def jacobian_flops(self, directions: int) -> int:
        """Counted FLOPs of y and dy/dx for one point computed with ``directions`` tangent/cotangent vectors."""
        return self.forward_flops * (1 + directions)

    def inputs(self, batch: int, seed: int = 1234) -> np.ndarray:
        """Benchmark points ``[batch, n_in]`` float32 (flattened in C order; :meth:`shaped` gives the model's own
        shape), drawn from the workload's input distribution."""
        rng = np.random.default_rng(seed + batch)
        if self.kind == "cnn":
            return _cnn_inputs(self, batch, rng)
        x = rng.normal(size=(batch, self.n_in)) * self.input_std + self.input_mean
        return np.ascontiguousarray(x, dtype=np.float32)

    def shaped(self, x: np.ndarray) -> np.ndarray:
        """``x [batch, n_in]`` as ``[batch, *input_shape]`` (a view)."""
        return x.reshape((x.shape[0],) + tuple(self.input_shape))

    def describe(self) -> str:
        if self.kind == "cnn":
            parts = ["×".join(map(str, self.input_shape))]
            for op, shp in zip(self.ops, self.shapes[1:]):
                if isinstance(op, Conv):
                    kh, kw, _, co = op.kernel.shape
                    parts.append(f"conv {kh}×{kw}×{co} {op.activation} ({op.padding})")
                elif isinstance(op, MaxPool):
                    parts.append(f"maxpool {op.size}")
                elif isinstance(op, Flatten):
                    continue
                else:
                    parts.append(f"dense {op.weight.shape[1]} {op.activation}")
                parts[-1] += f" → {'×'.join(map(str, shp))}"
            return " → ".join([parts[0]] + ["[" + p + "]" for p in parts[1:]]) + " (image input, channels last)"
        arch = " → ".join(str(w) for w in self.widths)
        acts = sorted({a for _, _, a in self.layers if a != "linear"})
        return f"{arch} ({', '.join(acts)}; {'normalized input' if self.normalization else 'raw input'})"

    def export_options(self, mode: str) -> dict:
        """Extra keyword arguments for ``nnpartials.export`` of this workload in ``mode``.

        The exporter checks the companion graph against GradientTape in one onnxruntime call over all its
        validation points (default 1,000); forward mode on ``cnn`` carries 784 tangents through 5,408 values per
        point, 17 GB at 1,000 points, so that export validates on 32 points (0.5 GB)."""
        if self.kind == "cnn" and mode == "forward":
            return {"n_validation": 32}
        return {}


def _op_shape(op, shape):
    if isinstance(op, Conv):
        kh, kw, _, co = op.kernel.shape
        h, w, _ = shape
        if op.padding == "same":
            return (h, w, co)
        return (h - kh + 1, w - kw + 1, co)
    if isinstance(op, MaxPool):
        h, w, c = shape
        return (h // op.size, w // op.size, c)
    if isinstance(op, Flatten):
        return (int(np.prod(shape)),)
    return (op.weight.shape[1],)


# ----- building ---------------------------------------------------------------------------------------------
SPECS = {
    "seed": dict(title="seed network", n_in=2, hidden=[64, 64, 32, 32, 16, 16, 8], act="leaky_relu", n_out=1,
                 normalize=True, mean=[1.0, -2.0], std=[0.5, 3.0]),
    "physics": dict(title="physics-style network", n_in=3, hidden=[256] * 4, act="tanh", n_out=2,
                    normalize=False, mean=[0.0] * 3, std=[1.0] * 3),
    "wide": dict(title="wide-input network", n_in=64, hidden=[256, 256], act="gelu", n_out=1,
                 normalize=False, mean=[0.0] * 64, std=[1.0] * 64),
    "cnn": dict(title="small CNN", kind="cnn", input_shape=(28, 28, 1), filters=[8, 16], kernel=3, pool=2,
                padding="valid", n_out=10, out_act="softmax"),
}
NAMES = tuple(SPECS)


def kind(name: str) -> str:
    """``"dense"`` or ``"cnn"``, without building the workload."""
    return SPECS[name].get("kind", "dense")


def _init(keras, base, k):
    return dict(kernel_initializer=keras.initializers.GlorotUniform(seed=base + 2 * k),
                bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=base + 2 * k + 1))


def build(name: str, seed: int = 20240617) -> Workload:
    """Build workload ``name`` (a Keras model with explicit, seeded initializers)."""
    import keras

    spec = SPECS[name]
    base = seed + 1000 * NAMES.index(name)
    if kind(name) == "cnn":
        return _build_cnn(keras, name, spec, base)
    n_in = spec["n_in"]
    mean = np.asarray(spec["mean"], dtype=np.float64)
    std = np.asarray(spec["std"], dtype=np.float64)

    inp = keras.Input(shape=(n_in,), name="x")
    h = inp
    norm = None
    if spec["normalize"]:
        rng = np.random.default_rng(base)
        data = (rng.normal(size=(4096, n_in)) * std + mean).astype(np.float32)
        norm_layer = keras.layers.Normalization(name="normalization")
        norm_layer.adapt(data)
        h = norm_layer(h)
        m = np.asarray(norm_layer.mean, dtype=np.float64).reshape(-1)
        v = np.asarray(norm_layer.variance, dtype=np.float64).reshape(-1)
        # Keras 3: (x - mean) / max(sqrt(var), epsilon)
        norm = (m, np.maximum(np.sqrt(v), keras.config.epsilon()))
    dims = spec["hidden"] + [spec["n_out"]]
    acts = []
    for k, width in enumerate(dims):
        last = k == len(dims) - 1
        act = "linear" if last else spec["act"]
        dense_act = act if act in ("tanh", "gelu") else None
        h = keras.layers.Dense(width, activation=dense_act, **_init(keras, base, k), name=f"dense_{k}")(h)
        if act == "leaky_relu":
            h = keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"leaky_relu_{k}")(h)
        acts.append(act)
    model = keras.Model(inp, h, name=f"bench_{name}")
    layers = []
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for layer, act in zip(dense, acts):
        w, b = layer.get_weights()
        layers.append((np.asarray(w, np.float32), np.asarray(b, np.float32), act))
    return Workload(name=name, title=spec["title"], n_in=n_in, n_out=spec["n_out"], layers=layers,
                    normalization=norm, input_mean=mean, input_std=std, keras_model=model)


def _build_cnn(keras, name, spec, base) -> Workload:
    shape = tuple(spec["input_shape"])
    inp = keras.Input(shape=shape, name="x")
    h = inp
    k = 0
    for j, filters in enumerate(spec["filters"]):
        h = keras.layers.Conv2D(filters, spec["kernel"], padding=spec["padding"], activation="relu",
                                **_init(keras, base, k), name=f"conv_{j}")(h)
        h = keras.layers.MaxPooling2D(spec["pool"], name=f"pool_{j}")(h)
        k += 1
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(spec["n_out"], activation=spec["out_act"], **_init(keras, base, k), name="dense")(h)
    model = keras.Model(inp, h, name=f"bench_{name}")
    ops = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            w, b = layer.get_weights()
            ops.append(Conv(np.asarray(w, np.float32), np.asarray(b, np.float32), "relu", spec["padding"]))
        elif isinstance(layer, keras.layers.MaxPooling2D):
            ops.append(MaxPool(spec["pool"]))
        elif isinstance(layer, keras.layers.Flatten):
            ops.append(Flatten())
        elif isinstance(layer, keras.layers.Dense):
            w, b = layer.get_weights()
            ops.append(Dense(np.asarray(w, np.float32), np.asarray(b, np.float32), spec["out_act"]))
    return Workload(name=name, title=spec["title"], n_in=int(np.prod(shape)), n_out=spec["n_out"], layers=[],
                    normalization=None, input_mean=None, input_std=None, keras_model=model, kind="cnn",
                    input_shape=shape, ops=ops)


# ----- float64 numpy reference (independent of every benchmarked path) --------------------------------------
def _erf(x):
    try:
        from scipy.special import erf

        return erf(x)
    except ImportError:  # pragma: no cover - scipy is optional
        return np.vectorize(math.erf, otypes=[np.float64])(x)


def _act(name, z):
    """(a(z), a'(z)) in float64; kink conventions follow TensorFlow (leaky_relu'(0) = slope)."""
    if name == "linear":
        return z, np.ones_like(z)
    if name == "leaky_relu":
        return np.where(z > 0, z, LEAKY_SLOPE * z), np.where(z > 0, 1.0, LEAKY_SLOPE)
    if name == "tanh":
        t = np.tanh(z)
        return t, 1.0 - t * t
    if name == "gelu":
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return z * cdf, cdf + z * pdf
    raise ValueError(f"unknown activation {name!r}")


def reference(workload: Workload, x: np.ndarray):
    """float64 ``(y [B, n_out], dy_dx [B, n_out, n_in])``: forward-mode propagation in numpy for the dense
    workloads, reverse mode (:func:`cnn_reference`) for ``cnn``."""
    if workload.kind == "cnn":
        return cnn_reference(workload, x)
    h = np.asarray(x, dtype=np.float64)
    b = h.shape[0]
    t = np.broadcast_to(np.eye(workload.n_in), (b, workload.n_in, workload.n_in)).copy()  # [B, K=n_in, width]
    if workload.normalization is not None:
        mean, std = workload.normalization
        h = (h - mean) / std
        t = t / std
    for w, bias, act in workload.layers:
        w = w.astype(np.float64)
        z = h @ w + bias.astype(np.float64)
        a, da = _act(act, z)
        t = (t @ w) * da[:, None, :]
        h = a
    return h, np.transpose(t, (0, 2, 1))


def nnp_layers(workload: Workload):
    """The network as C-core layers (``nnpartials.exporter.nnp.Layer``), the input normalization folded into the
    first dense layer (in float64, then rounded to float32), as the exporter's lowering does."""
    from nnpartials.exporter.nnp import Layer

    out = []
    for k, (w, b, act) in enumerate(workload.layers):
        w64, b64 = w.astype(np.float64), b.astype(np.float64)
        if k == 0 and workload.normalization is not None:
            mean, std = workload.normalization
            w64 = w64 / std[:, None]
            b64 = b64 - (mean / std) @ w.astype(np.float64)
        out.append(Layer(w64.astype(np.float32), b64.astype(np.float32), act,
                         p0=LEAKY_SLOPE if act == "leaky_relu" else 0.0))
    return out


# ----- cnn: float64 numpy forward pass, kink margins and analytic reverse-mode Jacobian -------------------------
def _pad_same(h, kh, kw):
    t, lft = (kh - 1) // 2, (kw - 1) // 2
    return np.pad(h, ((0, 0), (t, kh - 1 - t), (lft, kw - 1 - lft), (0, 0))), (t, lft)


def _conv64(h, op):
    """Cross-correlation as Keras computes it:
    ``z[b, y, x, o] = sum_{i, j, c} h[b, y+i, x+j, c] K[i, j, c, o] + bias[o]``."""
    k = op.kernel.astype(np.float64)
    kh, kw, _, _ = k.shape
    if op.padding == "same":
        h, _ = _pad_same(h, kh, kw)
    patches = np.lib.stride_tricks.sliding_window_view(h, (kh, kw), axis=(1, 2))  # [B, H', W', c_in, kh, kw]
    return np.tensordot(patches, k.transpose(2, 0, 1, 3), axes=([3, 4, 5], [0, 1, 2])) + op.bias.astype(np.float64)


def _conv64_vjp(g, op, in_shape):
    """Cotangents ``g [B, T, H', W', c_out]`` of the conv output → of its input ``[B, T, H, W, c_in]``."""
    k = op.kernel.astype(np.float64)
    kh, kw, _, _ = k.shape
    b, t, ho, wo, _ = g.shape
    h, w, ci = in_shape
    if op.padding == "same":
        (top, lft) = ((kh - 1) // 2, (kw - 1) // 2)
        hp, wp = h + kh - 1, w + kw - 1
    else:
        top = lft = 0
        hp, wp = h, w
    out = np.zeros((b, t, hp, wp, ci))
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + ho, j:j + wo, :] += g @ k[i, j].T
    return out[:, :, top:top + h, lft:lft + w, :]


def _pool_windows(h, p):
    """``h [B, H, W, C]`` → windows ``[B, H//p, W//p, C, p·p]`` (valid: rows and columns left over dropped)."""
    b, hh, ww, c = h.shape
    ho, wo = hh // p, ww // p
    win = h[:, :ho * p, :wo * p, :].reshape(b, ho, p, wo, p, c).transpose(0, 1, 3, 5, 2, 4)
    return win.reshape(b, ho, wo, c, p * p)


def _pool64_vjp(g, onehot, p, in_shape):
    """Cotangents ``g [B, T, H//p, W//p, C]`` → ``[B, T, H, W, C]`` routed to each window's maximum."""
    b, t, ho, wo, c = g.shape
    h, w, _ = in_shape
    r = (g[..., None] * onehot[:, None]).reshape(b, t, ho, wo, c, p, p).transpose(0, 1, 2, 5, 3, 6, 4)
    out = np.zeros((b, t, h, w, c))
    out[:, :, :ho * p, :wo * p, :] = r.reshape(b, t, ho * p, wo * p, c)
    return out


def _act64(name, z):
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "linear":
        return z
    if name == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown activation {name!r}")


def cnn_forward(workload: Workload, x: np.ndarray):
    """float64 forward pass of ``cnn`` on ``x [B, n_in]``: ``(y [B, n_out], tape, margin [B])``.

    ``margin`` is each point's distance to the nearest kink that matters. A ReLU followed by a max-pool has its
    kinks where a window's largest pre-activation is 0 (all its ReLUs off, or one on) or ties with the runner-up
    (the maximum moves); a unit that is not its window's maximum can cross 0 without changing anything. So the
    margin is the smallest, over the windows, of |largest pre-activation| and, where it is positive, of its gap to
    the second largest; a ReLU not followed by a pool counts every |pre-activation|."""
    h = np.asarray(x, dtype=np.float64).reshape((-1,) + tuple(workload.input_shape))
    margin = np.full(h.shape[0], np.inf)
    tape = []
    pending = None  # the pre-activation of a ReLU whose margin the next max-pool judges
    for op in workload.ops:
        in_shape = h.shape[1:]
        if isinstance(op, Conv):
            z = _conv64(h, op)
            tape.append((op, in_shape, z > 0 if op.activation == "relu" else None))
            if op.activation == "relu":
                pending = z
            h = _act64(op.activation, z)
            continue
        if pending is not None and not isinstance(op, MaxPool):
            margin = np.minimum(margin, np.abs(pending).reshape(len(pending), -1).min(axis=1))
        if isinstance(op, MaxPool):
            win = _pool_windows(h, op.size)
            src = _pool_windows(pending, op.size) if pending is not None else win
            top2 = np.sort(src, axis=-1)[..., -2:]
            near = np.abs(top2[..., 1]) if pending is not None else np.full(top2.shape[:-1], np.inf)
            near = np.minimum(near, np.where(top2[..., 1] > 0, top2[..., 1] - top2[..., 0], np.inf))
            margin = np.minimum(margin, near.reshape(len(near), -1).min(axis=1))
            onehot = np.zeros(win.shape)
            np.put_along_axis(onehot, win.argmax(axis=-1)[..., None], 1.0, axis=-1)
            tape.append((op, in_shape, onehot))
            h = win.max(axis=-1)
        elif isinstance(op, Flatten):
            tape.append((op, in_shape, None))
            h = h.reshape(len(h), -1)
        else:
            z = h @ op.weight.astype(np.float64) + op.bias.astype(np.float64)
            if op.activation == "relu":
                margin = np.minimum(margin, np.abs(z).min(axis=1))
            h = _act64(op.activation, z)
            tape.append((op, in_shape, h))
        pending = None
    if pending is not None:
        margin = np.minimum(margin, np.abs(pending).reshape(len(pending), -1).min(axis=1))
    return h, tape, margin


def cnn_reference(workload: Workload, x: np.ndarray, chunk: int = 128):
    """float64 ``(y [B, n_out], dy_dx [B, n_out, n_in])`` of ``cnn``, analytic, in numpy: the forward pass of
    :func:`cnn_forward`, then the n_out cotangents carried back through each step by its exact adjoint (softmax:
    ``dp_i/dz_j = p_i (δ_ij − p_j)``; Dense: Wᵀ; ReLU: the indicator of z > 0; max-pool: to the window's maximum;
    convolution: the transposed correlation with the same kernel). It shares no code with any benchmarked path.
    At a kink it takes TensorFlow's one-sided choice (relu'(0) = 0, a tie goes to the first maximum), but the
    benchmark inputs keep :data:`KINK_MARGIN` away from kinks, so that no path's rounding can pick the other side."""
    x = np.asarray(x, dtype=np.float64)
    ys, js = [], []
    for s in range(0, len(x), chunk):
        y, tape, _ = cnn_forward(workload, x[s:s + chunk])
        b = len(y)
        g = None  # [B, T = n_out, *shape]
        for op, in_shape, saved in reversed(tape):
            if isinstance(op, Dense):
                if g is None:  # the output: one cotangent per output
                    g = np.broadcast_to(np.eye(workload.n_out), (b, workload.n_out, workload.n_out)).copy()
                a = saved[:, None, :]  # the layer's output
                if op.activation == "softmax":  # dz_j = sum_i g_i p_i (δ_ij − p_j)
                    g = g * a - a * (g * a).sum(axis=-1, keepdims=True)
                elif op.activation == "relu":
                    g = g * (a > 0)
                elif op.activation != "linear":
                    raise ValueError(f"unsupported activation {op.activation!r}")
                g = g @ op.weight.astype(np.float64).T
            elif isinstance(op, Flatten):
                g = g.reshape((b, g.shape[1]) + tuple(in_shape))
            elif isinstance(op, MaxPool):
                g = _pool64_vjp(g, saved, op.size, in_shape)
            else:
                if saved is not None:
                    g = g * saved[:, None]
                g = _conv64_vjp(g, op, in_shape)
        ys.append(y)
        js.append(g.reshape(b, g.shape[1], -1))
    return np.concatenate(ys), np.concatenate(js)


def _cnn_inputs(workload: Workload, batch: int, rng) -> np.ndarray:
    """Pixels uniform in [0, 1), float32; a point within :data:`KINK_MARGIN` of a kink (judged on the float32
    values the paths receive) is drawn again until none is."""
    x = rng.random((batch, workload.n_in), dtype=np.float32)
    todo = np.arange(batch)
    for _ in range(200):
        _, _, margin = cnn_forward(workload, x[todo])
        todo = todo[margin < KINK_MARGIN]
        if not len(todo):
            return np.ascontiguousarray(x)
        x[todo] = rng.random((len(todo), workload.n_in), dtype=np.float32)
    raise RuntimeError(f"{workload.name}: could not draw {batch} points {KINK_MARGIN:g} away from every kink")
