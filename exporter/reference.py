"""Reference partials from TensorFlow's GradientTape, used for export-time validation and by the tests."""

from __future__ import annotations

import numpy as np


def tf_jacobian(traced, xs, chunk: int = 4096):
    """Return ``(y [B, n_out], [J_k [B, n_out, n_k] for each input])`` computed by GradientTape in float32.

    ``traced`` is a :class:`nnpartials.exporter.keras_export.TracedModel`; ``xs`` a list of float32 arrays, each
    ``[B, *shape]`` of its input; the Jacobians are over the flattened (C-order) features of each input.
    """
    import tensorflow as tf

    fn = traced.fn

    @tf.function(autograph=False, reduce_retracing=True)
    def f(*args):
        with tf.GradientTape(persistent=True) as tape:
            for a in args:
                tape.watch(a)
            outs = fn(*args)
            y = tf.concat([tf.reshape(o, [tf.shape(o)[0], -1]) for o in outs], axis=1)
        # batch_jacobian gives [B, n_out, *shape of the input]: flattened to [B, n_out, width]
        return y, [tf.reshape(tape.batch_jacobian(y, a), [tf.shape(a)[0], tf.shape(y)[1], -1]) for a in args]

    n = xs[0].shape[0]
    ys, js = [], [[] for _ in xs]
    for s in range(0, n, chunk):
        y, jl = f(*[tf.constant(x[s:s + chunk]) for x in xs])
        ys.append(y.numpy())
        for k, j in enumerate(jl):
            js[k].append(j.numpy())
    return np.concatenate(ys), [np.concatenate(j) for j in js]
