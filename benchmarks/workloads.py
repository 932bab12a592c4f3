"""The three benchmark workloads, built deterministically (fixed seeds, no downloads).

Each workload is a Keras model plus a plain description of the same network (``layers``: the weights as
numpy arrays and the activation names) that the JAX and PyTorch peers and the float64 numpy reference use,
so every path computes the same function with the same weights.

1. ``seed``: Normalization + Dense 64, 64, 32, 32, 16, 16, 8 each followed by LeakyReLU, linear Dense 1;
   2 inputs, 1 output.
2. ``physics``: 3 inputs, four Dense 256 tanh layers, linear Dense 2.
3. ``wide``: 64 inputs, Dense 256, 256 with gelu (exact, erf form), linear Dense 1.

FLOP convention (used for GFLOP/s in the report): only the multiply-adds of the dense layers count, 2·in·out per
layer per point (normalization, bias additions and activations are not counted). A forward pass costs
``F = sum(2·in·out)`` per point. A Jacobian computed with K directions (K = n_in for forward mode, K = n_out for
reverse mode) costs ``F·(1 + K)`` per point: one forward pass plus one matrix product per direction per layer.
The float64 finite-difference Jacobian of the C core evaluates the network ``1 + 4·n_in`` times per point
(central differences with steps h and h/2), so it counts ``F·(1 + 4·n_in)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Keras 3's LeakyReLU default negative slope.
LEAKY_SLOPE = 0.3


@dataclass
class Workload:
    name: str
    title: str
    n_in: int
    n_out: int
    #: [(W [in, out] float32, b [out] float32, activation name)]
    layers: list
    #: (mean [n_in], std [n_in]) of an input Normalization layer, or None
    normalization: tuple | None
    #: mean and std of the input distribution the benchmark points are drawn from
    input_mean: np.ndarray
    input_std: np.ndarray
    keras_model: object = field(default=None, repr=False)

    @property
    def widths(self) -> list:
        return [self.n_in] + [w.shape[1] for w, _, _ in self.layers]

    @property
    def max_width(self) -> int:
        return max(self.widths)

    @property
    def forward_flops(self) -> int:
        """Counted FLOPs of one forward pass for one point (2·in·out per dense layer)."""
        return sum(2 * w.shape[0] * w.shape[1] for w, _, _ in self.layers)

    def jacobian_flops(self, directions: int) -> int:
        """Counted FLOPs of y and dy/dx for one point computed with ``directions`` tangent/cotangent vectors."""
        return self.forward_flops * (1 + directions)

    def inputs(self, batch: int, seed: int = 1234) -> np.ndarray:
        """Benchmark points ``[batch, n_in]`` float32, drawn from the workload's input distribution."""
        rng = np.random.default_rng(seed + batch)
        x = rng.normal(size=(batch, self.n_in)) * self.input_std + self.input_mean
        return np.ascontiguousarray(x, dtype=np.float32)

    def describe(self) -> str:
        arch = " → ".join(str(w) for w in self.widths)
        acts = sorted({a for _, _, a in self.layers if a != "linear"})
        return f"{arch} ({', '.join(acts)}; {'normalized input' if self.normalization else 'raw input'})"


# ----- building ---------------------------------------------------------------------------------------------
SPECS = {
    "seed": dict(title="seed network", n_in=2, hidden=[64, 64, 32, 32, 16, 16, 8], act="leaky_relu", n_out=1,
                 normalize=True, mean=[1.0, -2.0], std=[0.5, 3.0]),
    "physics": dict(title="physics-style network", n_in=3, hidden=[256] * 4, act="tanh", n_out=2,
                    normalize=False, mean=[0.0] * 3, std=[1.0] * 3),
    "wide": dict(title="wide-input network", n_in=64, hidden=[256, 256], act="gelu", n_out=1,
                 normalize=False, mean=[0.0] * 64, std=[1.0] * 64),
}
NAMES = tuple(SPECS)


def build(name: str, seed: int = 20240617) -> Workload:
    """Build workload ``name`` (a Keras model with explicit, seeded initializers)."""
    import keras

    spec = SPECS[name]
    base = seed + 1000 * NAMES.index(name)
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
        h = keras.layers.Dense(
            width, activation=dense_act,
            kernel_initializer=keras.initializers.GlorotUniform(seed=base + 2 * k),
            bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=base + 2 * k + 1),
            name=f"dense_{k}")(h)
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
    """float64 ``(y [B, n_out], dy_dx [B, n_out, n_in])`` by forward-mode propagation in numpy."""
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
