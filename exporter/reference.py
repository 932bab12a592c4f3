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


def tf_hessian(traced, xs, chunk: int = 1024):
    """Return ``(y [B, n_out], J [B, n_out, n_in], H [B, n_out, n_in, n_in])`` from nested GradientTapes in float32,
    over all inputs' flattened (C-order) features concatenated in input order:
    ``H[b, i, j, k] = d2 y[b, i] / dx[b, j] dx[b, k]``. The traced function is kept on ``traced`` (tracing the
    nested ``batch_jacobian`` takes seconds; later calls on the same model reuse it)."""
    import tensorflow as tf

    f = getattr(traced, "_nnp_tf_hessian", None)
    if f is None:
        f = tf.function(_nested_tapes(traced.fn), autograph=False, reduce_retracing=True)
        try:
            traced._nnp_tf_hessian = f
        except AttributeError:  # pragma: no cover - a traced model that takes no attributes
            pass
    n = xs[0].shape[0]
    parts = [[], [], []]
    for s in range(0, n, chunk):
        for k, v in enumerate(f(*[tf.constant(x[s:s + chunk]) for x in xs])):
            parts[k].append(v.numpy())
    return tuple(np.concatenate(p) for p in parts)


def _nested_tapes(fn):
    import tensorflow as tf

    def f(*args):
        n = tf.shape(args[0])[0]
        with tf.GradientTape(persistent=True) as outer:
            for a in args:
                outer.watch(a)
            with tf.GradientTape(persistent=True) as inner:
                for a in args:
                    inner.watch(a)
                outs = fn(*args)
                y = tf.concat([tf.reshape(o, [tf.shape(o)[0], -1]) for o in outs], axis=1)
            j = tf.concat([tf.reshape(inner.batch_jacobian(y, a), [n, tf.shape(y)[1], -1]) for a in args], axis=2)
        h = tf.concat([tf.reshape(outer.batch_jacobian(j, a), [n, tf.shape(j)[1], tf.shape(j)[2], -1])
                       for a in args], axis=3)
        return y, j, h

    return f
