"""Derivative rules for the layers of real networks: softmax, convolution and pooling, normalization layers,
Gelu, reductions other than sums, gathers, padding, tiling, resizing, Einsum and the inverse trigonometric
family. They register into the same table as :mod:`nnpartials.exporter.rules` and use the same terms.

Derivative tensors are ``[K, *forward shape]`` (K directions first). Ops that need the batch axis first (Conv,
pooling) fold K into it: ``[K, N, C, ...] -> [K*N, C, ...]``; a broadcast batch axis (size 1) stays
broadcast, since these ops treat every point alike. Ops that gather across flattened positions (MaxPool's
indices) first give the derivative a real batch axis (:meth:`GraphBuilder.expand_like`).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from nnpartials.exporter.rules import ONE, Linear, Scale, _matmul_along, rule

_INT64 = TensorProto.INT64


def _axes_input_or_attr(c, default_all=True):
    """Reduction axes from the ``axes`` input (opset >= 18, ReduceSum >= 13) or attribute; normalised, sorted."""
    xs = c.shape(c.x)
    if len(c.node.input) > 1 and c.node.input[1]:
        axes = [int(a) for a in c.const(1, "axes").reshape(-1)]
    else:
        axes = c.attr("axes")
        axes = list(axes) if axes is not None else None
    if not axes:
        if c.attr("noop_with_empty_axes", 0):
            return []
        axes = list(range(len(xs))) if default_all else []
    axes = sorted({a % len(xs) for a in axes})
    if any(xs[a] is None for a in axes):
        c.unsupported("reduction over the batch axis or a dynamic axis: it would mix the points of a batch")
    return axes


def _weighted_reduce(c, weight, axes, keep):
    """y = reduce(x) over ``axes`` with dy = sum(w * dx) over those axes (w a tensor of x's shape):
    forward ReduceSum(d * w), reverse w * g (g broadcast back over the reduced axes)."""
    K = c.K
    daxes = [a + 1 for a in axes]
    xs, ys = c.shape(c.x), c.shape(c.y)

    def fwd(b, d):
        return b.op("ReduceSum", [b.mul(d, weight), b.const(daxes, np.int64)], keepdims=keep, shape=(K,) + tuple(ys))

    def rev(b, g):
        if not keep:
            g = b.unsqueeze(g, daxes)
        return b.op("Mul", [g, weight], shape=(K,) + tuple(xs))

    return [Linear(fwd=fwd, rev=rev)] + [None] * (len(c.node.input) - 1)


def _zeros_like_k(b, x, K):
    """Zeros of shape [K, *Shape(x)] (run time)."""
    s = b.shapes.get(x)
    return b.op("ConstantOfShape", [b.k_shape(K, x)], value=helper.make_tensor("value", b.ftype, [1], [0.0]),
                shape=None if s is None else (K,) + tuple(s))


def _keep(c, t, axes, keep):
    """A reduced tensor with its reduced axes kept (size 1), for broadcasting against the input."""
    return t if keep else c.b.unsqueeze(t, axes)


# ----- softmax ---------------------------------------------------------------------------------------------------
def _softmax_axes(c):
    xs = c.shape(c.x)
    axis = c.attr("axis", -1 if c.b.opset >= 13 else 1) % len(xs)
    axes = [axis] if c.b.opset >= 13 else list(range(axis, len(xs)))  # opset < 13: flattened from axis on
    if any(xs[a] is None for a in axes):
        c.unsupported("softmax over the batch axis or a dynamic axis")
    return axes


@rule("Softmax")
def _softmax(c):
    # dy = y * (dx - sum(y * dx)); the Jacobian diag(y) - y y^T is symmetric, so the adjoint has the same form
    y, K = c.y, c.K
    daxes = c.b.const([a + 1 for a in _softmax_axes(c)], np.int64)

    def apply(b, d):
        s = b.op("ReduceSum", [b.mul(d, y), daxes], keepdims=1)
        return b.op("Mul", [b.sub(d, s), y], shape=(K,) + tuple(c.shape(y)))

    return [Linear(fwd=apply, rev=apply)]


@rule("LogSoftmax")
def _log_softmax(c):
    # y = x - logsumexp(x): dy = dx - sum(p * dx), p = exp(y); adjoint g - p * sum(g)
    K = c.K
    daxes = c.b.const([a + 1 for a in _softmax_axes(c)], np.int64)
    p = c.b.op("Exp", [c.y])
    shape = (K,) + tuple(c.shape(c.y))
    return [Linear(fwd=lambda b, d: b.op("Sub", [d, b.op("ReduceSum", [b.mul(d, p), daxes], keepdims=1)], shape=shape),
                   rev=lambda b, g: b.op("Sub", [g, b.mul(p, b.op("ReduceSum", [g, daxes], keepdims=1))],
                                         shape=shape))]


# ----- convolution -----------------------------------------------------------------------------------------------
def _spatial(c, x):
    s = c.shape(x)
    if len(s) < 3 or any(d is None for d in s[1:]):
        c.unsupported(f"input of shape {s}; expected [batch, channels, spatial...] with static channels and sizes")
    return list(s[1:2]), list(s[2:])


def _conv_pads(c, in_sp, kernel, strides, dilations):
    auto = c.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    n = len(in_sp)
    if auto in ("NOTSET", ""):
        pads = list(c.attr("pads") or [0] * (2 * n))
        return pads[:n], pads[n:]
    if auto == "VALID":
        return [0] * n, [0] * n
    begin, end = [], []
    for i in range(n):
        out = -(-in_sp[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_sp[i])
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin, end


def _fold_k(b, d, K, tail):
    """[K, N, *tail] -> [K*N, *tail]."""
    return b.reshape(d, [-1] + list(tail), shape=(None,) + tuple(tail))


def _unfold_k(b, t, K, tail):
    return b.reshape(t, [K, -1] + list(tail), shape=(K, None) + tuple(tail))


def _conv_geometry(c):
    """(weights, [channels in], spatial in, channels out, spatial out, kernel, strides, dilations, group) of a
    Conv or ConvTranspose node with constant weights."""
    w = np.asarray(c.const(1, "weights"))
    ch, in_sp = _spatial(c, c.x)
    (m,), out_sp = _spatial(c, c.y)
    n = len(in_sp)
    return (w, ch, in_sp, m, out_sp, list(w.shape[2:]), list(c.attr("strides") or [1] * n),
            list(c.attr("dilations") or [1] * n), int(c.attr("group", 1)))


@rule("Conv")
def _conv(c):
    if c.need(1) or (len(c.node.input) > 2 and c.need(2)):
        c.unsupported("the weights or the bias depend on the input; only a convolution with constant weights")
    w, ch, in_sp, m, out_sp, kernel, strides, dil, group = _conv_geometry(c)
    n = len(in_sp)
    pb, pe = _conv_pads(c, in_sp, kernel, strides, dil)
    # the adjoint: a transposed convolution with the same weights, its output padding making the input size back
    opad = [in_sp[i] - (strides[i] * (out_sp[i] - 1) + (kernel[i] - 1) * dil[i] + 1 - pb[i] - pe[i])
            for i in range(n)]
    if any(p < 0 or p >= max(strides[i], dil[i]) for i, p in enumerate(opad)):
        c.unsupported(f"cannot build the transposed convolution (output padding {opad})")
    K = c.K
    wname = c.b.const(w.astype(c.b.np_float))
    attrs = {"strides": strides, "dilations": dil, "group": group, "pads": pb + pe, "kernel_shape": kernel}
    in_tail, out_tail = ch + in_sp, [m] + out_sp

    def fwd(b, d):
        r = b.op("Conv", [_fold_k(b, d, K, in_tail), wname], shape=(None,) + tuple(out_tail), **attrs)
        return _unfold_k(b, r, K, out_tail)

    # with stride 1 the adjoint is also a plain convolution: channels in and out swapped within each group, the
    # kernel flipped, padded by (k - 1) d minus the forward padding. onnxruntime's Conv is several times faster
    # than its ConvTranspose except where the forward input has one channel per group (measured on this
    # machine: 8 -> 16 channels 3x3 at 11x11, 1,000 images, 17.1 ms ConvTranspose vs 3.6 ms Conv; 1 -> 8 at
    # 26x26, 2.6 vs 10.5 ms), so that case keeps ConvTranspose
    cpg = ch[0] // group
    reach = [(kernel[i] - 1) * dil[i] for i in range(n)]
    flip_pads = [reach[i] - pb[i] for i in range(n)] + [reach[i] - pe[i] for i in range(n)]
    as_conv = all(s == 1 for s in strides) and not any(opad) and min(flip_pads) >= 0 and cpg > 1

    def rev(b, g):
        if as_conv:
            wt = w.reshape([group, m // group, cpg] + kernel).swapaxes(1, 2).reshape([ch[0], m // group] + kernel)
            wt = np.ascontiguousarray(wt[(slice(None), slice(None)) + (slice(None, None, -1),) * n])
            r = b.op("Conv", [_fold_k(b, g, K, out_tail), b.const(wt.astype(b.np_float))],
                     shape=(None,) + tuple(in_tail), strides=strides, dilations=dil, group=group, pads=flip_pads,
                     kernel_shape=kernel)
        else:
            r = b.op("ConvTranspose", [_fold_k(b, g, K, out_tail), wname], shape=(None,) + tuple(in_tail),
                     output_padding=opad, **attrs)
        return _unfold_k(b, r, K, in_tail)

    return [Linear(fwd=fwd, rev=rev)] + [None] * (len(c.node.input) - 1)


@rule("ConvTranspose")
def _conv_transpose(c):
    if c.need(1) or (len(c.node.input) > 2 and c.need(2)):
        c.unsupported("the weights or the bias depend on the input; only constant weights")
    auto = c.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "", "VALID") or c.attr("output_shape") is not None:
        c.unsupported("auto_pad SAME_* or output_shape on ConvTranspose; give explicit pads")
    w, ch, in_sp, m, out_sp, kernel, strides, dil, group = _conv_geometry(c)
    n = len(in_sp)
    pads = list(c.attr("pads") or [0] * (2 * n)) if auto != "VALID" else [0] * (2 * n)
    opad = list(c.attr("output_padding") or [0] * n)
    K = c.K
    wname = c.b.const(w.astype(c.b.np_float))
    in_tail, out_tail = ch + in_sp, [m] + out_sp
    common = {"strides": strides, "dilations": dil, "group": group, "kernel_shape": kernel}
    # adjoint of the transposed convolution: a convolution with the same weights over g placed back into the
    # uncropped output s (in - 1) + (k - 1) d + 1: pads[begin] before it and pads[end] - output_padding after it;
    # where output_padding is larger, g's last positions (the output padding, which no input reaches) are dropped
    conv_pads = pads[:n] + [max(0, pads[n + i] - opad[i]) for i in range(n)]
    drop = [max(0, opad[i] - pads[n + i]) for i in range(n)]

    def fwd(b, d):
        r = b.op("ConvTranspose", [_fold_k(b, d, K, in_tail), wname], shape=(None,) + tuple(out_tail),
                 pads=pads, output_padding=opad, **common)
        return _unfold_k(b, r, K, out_tail)

    def rev(b, g):
        gf = _fold_k(b, g, K, out_tail)
        if any(drop):
            ax = [i + 2 for i in range(n) if drop[i]]
            gf = b.op("Slice", [gf, b.const([0] * len(ax), np.int64), b.const([-drop[a - 2] for a in ax], np.int64),
                                b.const(ax, np.int64)])
        r = b.op("Conv", [gf, wname], shape=(None,) + tuple(in_tail), pads=conv_pads, **common)
        return _unfold_k(b, r, K, in_tail)

    return [Linear(fwd=fwd, rev=rev)] + [None] * (len(c.node.input) - 1)


# ----- pooling -----------------------------------------------------------------------------------------------------
def _reference_run(node, feeds):
    """Evaluate one node with onnx's reference implementation (numpy, float64): for small static tables."""
    from onnx.reference import ReferenceEvaluator

    names = list(feeds)
    g = helper.make_graph([node], "one", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in names],
                          [helper.make_tensor_value_info(o, TensorProto.DOUBLE, None) for o in node.output])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return ReferenceEvaluator(m).run(None, feeds)


@rule("AveragePool")
def _average_pool(c):
    # linear: A = diag(1/count) S with S the windowed sum; forward applies the op itself, the adjoint is
    # S^T (g / count): a transposed depthwise convolution with a ones kernel
    (ch,), in_sp = _spatial(c, c.x)
    _, out_sp = _spatial(c, c.y)
    n = len(in_sp)
    kernel = list(c.attr("kernel_shape"))
    strides = list(c.attr("strides") or [1] * n)
    dil = list(c.attr("dilations") or [1] * n)
    if c.attr("ceil_mode", 0):
        c.unsupported("ceil_mode=1")
    pb, pe = _conv_pads(c, in_sp, kernel, strides, dil)
    ones_in = np.ones([1, 1] + in_sp)
    attrs = {a.name: helper.get_attribute_value(a) for a in c.node.attribute}
    avg = _reference_run(helper.make_node("AveragePool", ["x"], ["y"], **attrs), {"x": ones_in})[0]
    wsum = _reference_run(helper.make_node("Conv", ["x", "w"], ["y"], strides=strides, dilations=dil, pads=pb + pe),
                          {"x": ones_in, "w": np.ones([1, 1] + kernel)})[0]
    if avg.shape[2:] != tuple(out_sp) or wsum.shape != avg.shape:
        c.unsupported("pooling output size differs from the convolution's (padding or rounding)")
    inv_count = (avg / wsum).reshape([1, 1, 1] + out_sp)  # = 1 / divisor per output position
    opad = [in_sp[i] - (strides[i] * (out_sp[i] - 1) + (kernel[i] - 1) * dil[i] + 1 - pb[i] - pe[i])
            for i in range(n)]
    K = c.K
    b0 = c.b
    ones_w = b0.const(np.ones([ch, 1] + kernel, b0.np_float))
    inv = b0.const(inv_count.astype(b0.np_float))
    in_tail, out_tail = [ch] + in_sp, [ch] + out_sp

    def fwd(b, d):
        r = b.op("AveragePool", [_fold_k(b, d, K, in_tail)], shape=(None,) + tuple(out_tail), **attrs)
        return _unfold_k(b, r, K, out_tail)

    def rev(b, g):
        gs = _fold_k(b, b.mul(g, inv), K, out_tail)
        r = b.op("ConvTranspose", [gs, ones_w], shape=(None,) + tuple(in_tail), group=ch, strides=strides,
                 dilations=dil, pads=pb + pe, output_padding=opad, kernel_shape=kernel)
        return _unfold_k(b, r, K, in_tail)

    return [Linear(fwd=fwd, rev=rev)]


@rule("MaxPool")
def _max_pool(c):
    # the derivative goes to the position MaxPool's Indices output names (the first maximum of each window, as
    # TensorFlow's max-pool gradient); indices count over the whole [N, C, *spatial] tensor
    if len([o for o in c.node.output if o]) > 1:
        c.unsupported("MaxPool's Indices output is used by the graph")
    if c.attr("storage_order", 0):
        c.unsupported("storage_order=1")
    (ch,), in_sp = _spatial(c, c.x)
    _, out_sp = _spatial(c, c.y)
    K = c.K
    attrs = {a.name: helper.get_attribute_value(a) for a in c.node.attribute}
    b0 = c.b
    _, idx = b0.multi("MaxPool", [c.x], 2, shapes=[c.shape(c.y), c.shape(c.y)], dtypes=[b0.ftype, _INT64], **attrs)
    x, y = c.x, c.y
    flat_in = b0.const([K, -1], np.int64)

    def fwd(b, d):
        dflat = b.op("Reshape", [b.expand_like(d, x, K), flat_in], shape=(K, None))
        return b.op("Gather", [dflat, idx], axis=1, shape=(K,) + tuple(c.shape(y)))

    # windows that tile the input without overlap (stride = kernel, no padding or dilation: the usual pooling
    # layer): every input position is in at most one window, so the adjoint is g repeated over each window
    # (Resize, nearest) times a 0/1 mask of the windows' argmax positions. The mask is built once per point from
    # the indices and is the term's rev_factor: the engine multiplies it into the K directions' cotangent together
    # with the factors that follow (the mask of a relu before the pooling), in one product. On this machine (10
    # directions x 100 images x 8 x 26 x 26) onnxruntime's Resize + broadcast Mul took 5.4 ms against 7.1 ms for
    # ScatterElements and its zeros; Expand (13.8 ms) and a broadcast Where (15.5 ms) were slower. Like the other
    # masks, a NaN or inf in g reaches the whole window
    kernel = list(c.attr("kernel_shape"))
    n = len(in_sp)
    strides = list(c.attr("strides") or [1] * n)
    dil = list(c.attr("dilations") or [1] * n)
    pb, pe = _conv_pads(c, in_sp, kernel, strides, dil)
    plane = int(np.prod(in_sp))
    # (float32 models only: onnxruntime's CPU Resize has no float64 kernel, so those keep the scatter)
    tiled = (b0.opset >= 11 and np.dtype(b0.np_float) == np.float32 and strides == kernel
             and all(v == 1 for v in dil) and not any(pb + pe) and plane < 2 ** 24
             and all(out_sp[i] == in_sp[i] // kernel[i] for i in range(n)))
    crop = [in_sp[i] - out_sp[i] * kernel[i] for i in range(n)]  # rows and columns no window covers (at the end)

    def repeat(b, t, pad_value):
        # [M, ch, *out_sp] -> [M, ch, *in_sp]: each value over its window, the uncovered end padded
        roi = [] if b.opset >= 13 else [b.const(np.zeros(0))]
        scales = b.const([1.0, 1.0] + [float(k) for k in kernel], np.float32)
        u = b.op("Resize", [t, *(roi or [""]), scales], mode="nearest",
                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        if any(crop):
            u = b.op("Pad", [u, b.const([0] * (2 + n) + [0, 0] + crop, np.int64), b.const(pad_value)],
                     mode="constant")
        return u

    if tiled:
        # in-plane position of each window's argmax, as a float (exact below 2^24), spread over the window
        where_in_plane = b0.cast_float(b0.op("Mod", [idx, b0.const(plane, np.int64)], dtype=_INT64))
        positions = b0.const(np.arange(plane).reshape([1, 1] + in_sp))
        argmax = b0.cast_float(b0.op("Equal", [repeat(b0, where_in_plane, -1.0), positions]))

    def rev_tiled(b, g):
        return _unfold_k(b, repeat(b, _fold_k(b, g, K, [ch] + out_sp), 0.0), K, [ch] + in_sp)

    def rev(b, g):
        if tiled:
            return rev_tiled(b, g)
        gfull = b.expand_like(g, y, K)
        gflat = b.op("Reshape", [gfull, flat_in], shape=(K, None))
        iflat = b.op("Reshape", [idx, b.const([1, -1], np.int64)], dtype=_INT64, shape=(1, None))
        iexp = b.op("Expand", [iflat, b.op("Shape", [gflat], dtype=_INT64, shape=(2,))], dtype=_INT64, shape=(K, None))
        zeros = b.op("Reshape", [_zeros_like_k(b, x, K), flat_in], shape=(K, None))
        r = b.op("ScatterElements", [zeros, iexp, gflat], axis=1, reduction="add", shape=(K, None))
        return b.op("Reshape", [r, b.k_shape(K, x)], shape=(K,) + tuple(c.shape(x)))

    return [Linear(fwd=fwd, rev=rev, rev_factor=argmax if tiled else None)]


@rule("GlobalAveragePool")
def _global_average_pool(c):
    (ch,), sp = _spatial(c, c.x)
    axes = list(range(2, 2 + len(sp)))
    w = c.b.const(np.full([1] * (2 + len(sp)), 1.0 / float(np.prod(sp)), c.b.np_float))
    return _weighted_reduce(c, c.b.op("Expand", [w, c.b.shape_of(c.x)]), axes, 1)


def _argmax_weights(c, axes, keep):
    """w = (x == y) / count over ``axes``: the derivative of a max or min split evenly among ties (as TensorFlow's
    reduce_max gradient)."""
    b = c.b
    yk = _keep(c, c.y, axes, keep)
    eq = b.cast_float(b.op("Equal", [c.x, yk]))
    cnt = b.op("ReduceSum", [eq, b.const(axes, np.int64)], keepdims=1)
    return b.div(eq, cnt)


@rule("GlobalMaxPool")
def _global_max_pool(c):
    _, sp = _spatial(c, c.x)
    axes = list(range(2, 2 + len(sp)))
    return _weighted_reduce(c, _argmax_weights(c, axes, 1), axes, 1)


# ----- reductions ----------------------------------------------------------------------------------------------
@rule("ReduceMax", "ReduceMin")
def _reduce_max(c):
    axes, keep = _axes_input_or_attr(c), c.attr("keepdims", 1)
    return _weighted_reduce(c, _argmax_weights(c, axes, keep), axes, keep)


@rule("ReduceL1")
def _reduce_l1(c):
    axes, keep = _axes_input_or_attr(c), c.attr("keepdims", 1)
    return _weighted_reduce(c, c.b.op("Sign", [c.x]), axes, keep)


@rule("ReduceL2")
def _reduce_l2(c):
    axes, keep = _axes_input_or_attr(c), c.attr("keepdims", 1)
    return _weighted_reduce(c, c.b.div(c.x, _keep(c, c.y, axes, keep)), axes, keep)


@rule("ReduceSumSquare")
def _reduce_sum_square(c):
    axes, keep = _axes_input_or_attr(c), c.attr("keepdims", 1)
    return _weighted_reduce(c, c.b.mul(c.x, 2.0), axes, keep)


@rule("ReduceLogSumExp")
def _reduce_log_sum_exp(c):
    axes, keep = _axes_input_or_attr(c), c.attr("keepdims", 1)
    return _weighted_reduce(c, c.b.op("Exp", [c.b.sub(c.x, _keep(c, c.y, axes, keep))]), axes, keep)


@rule("ReduceLogSum")
def _reduce_log_sum(c):
    axes, keep = _axes_input_or_attr(c), c.attr("keepdims", 1)
    s = c.b.op("Exp", [_keep(c, c.y, axes, keep)])
    return _weighted_reduce(c, c.b.op("Reciprocal", [c.b.op("Expand", [s, c.b.shape_of(c.x)])]), axes, keep)


# ----- normalization layers --------------------------------------------------------------------------------------
def _normalize(c, x, axes, eps, scale_b, K, x_shape):
    """Derivative of xhat = (x - mean) / sqrt(var + eps) over ``axes``, times a constant ``scale_b`` (broadcast
    against x), as a Linear term: d xhat = r (dx - mean(dx) - xhat mean(xhat dx)); symmetric, so the adjoint of
    g is the same expression applied to scale * g."""
    b = c.b
    ax = b.const(axes, np.int64)
    mu = b.op("ReduceMean", [x, ax], keepdims=1) if b.opset >= 18 else b.op("ReduceMean", [x], axes=axes, keepdims=1)
    xc = b.sub(x, mu)
    var = b.op("ReduceMean", [b.mul(xc, xc), ax], keepdims=1) if b.opset >= 18 else \
        b.op("ReduceMean", [b.mul(xc, xc)], axes=axes, keepdims=1)
    r = b.op("Reciprocal", [b.op("Sqrt", [b.add(var, float(eps))])])
    xh = b.mul(xc, r)
    dax = b.const([a + 1 for a in axes], np.int64)
    n = float(np.prod([x_shape[a] for a in axes]))

    def core(b, d):
        md = b.mul(b.op("ReduceSum", [d, dax], keepdims=1), 1.0 / n)
        mxd = b.mul(b.op("ReduceSum", [b.mul(xh, d), dax], keepdims=1), 1.0 / n)
        return b.mul(r, b.sub(b.sub(d, md), b.mul(xh, mxd)))

    def fwd(b, d):
        t = core(b, d)
        t = b.mul(t, scale_b) if scale_b is not None else t
        b.shapes[t] = (K,) + tuple(x_shape)
        return t

    def rev(b, g):
        t = core(b, b.mul(g, scale_b) if scale_b is not None else g)
        b.shapes[t] = (K,) + tuple(x_shape)
        return t

    return Linear(fwd=fwd, rev=rev)


@rule("LayerNormalization")
def _layer_norm(c):
    if len([o for o in c.node.output if o]) > 1:
        c.unsupported("LayerNormalization's Mean/InvStdDev outputs are used by the graph")
    if c.need(1) or (len(c.node.input) > 2 and c.need(2)):
        c.unsupported("scale or bias depends on the input")
    xs = c.shape(c.x)
    axis = c.attr("axis", -1) % len(xs)
    axes = list(range(axis, len(xs)))
    if any(xs[a] is None for a in axes):
        c.unsupported("normalization over the batch axis or a dynamic axis")
    scale = c.b.const(np.asarray(c.const(1, "scale"), c.b.np_float))
    return [_normalize(c, c.x, axes, c.attr("epsilon", 1e-5), scale, c.K, xs)] + [None] * (len(c.node.input) - 1)


@rule("InstanceNormalization")
def _instance_norm(c):
    if c.need(1) or c.need(2):
        c.unsupported("scale or bias depends on the input")
    (ch,), sp = _spatial(c, c.x)
    xs = c.shape(c.x)
    scale = np.asarray(c.const(1, "scale"), c.b.np_float).reshape([ch] + [1] * len(sp))
    axes = list(range(2, len(xs)))
    return [_normalize(c, c.x, axes, c.attr("epsilon", 1e-5), c.b.const(scale), c.K, xs), None, None]


@rule("GroupNormalization")
def _group_norm(c):
    if c.need(1) or c.need(2):
        c.unsupported("scale or bias depends on the input")
    (ch,), sp = _spatial(c, c.x)
    xs = c.shape(c.x)
    groups = int(c.attr("num_groups"))
    if ch % groups:
        c.unsupported(f"{ch} channels in {groups} groups")
    scale = np.asarray(c.const(1, "scale"), c.b.np_float).reshape(-1)
    if scale.size == groups:  # opset 18: one scale per group
        scale = np.repeat(scale, ch // groups)
    scale = scale.reshape([ch] + [1] * len(sp))
    b0, K = c.b, c.K
    gshape = [groups, (ch // groups) * int(np.prod(sp))]
    xg = b0.reshape(c.x, [0] + gshape, shape=(xs[0],) + tuple(gshape))
    inner = _normalize(c, xg, [2], c.attr("epsilon", 1e-5), None, K, (xs[0],) + tuple(gshape))
    sc = b0.const(scale)
    tail = list(xs[1:])

    def fwd(b, d):
        dg = b.reshape(d, [K, -1] + gshape, shape=(K, None) + tuple(gshape))
        t = b.reshape(inner.fwd(b, dg), [K, -1] + tail, shape=(K, None) + tuple(tail))
        return b.op("Mul", [t, sc], shape=(K,) + tuple(xs))

    def rev(b, g):
        gg = b.reshape(b.mul(g, sc), [K, -1] + gshape, shape=(K, None) + tuple(gshape))
        return b.reshape(inner.rev(b, gg), [K, -1] + tail, shape=(K,) + tuple(xs))

    return [Linear(fwd=fwd, rev=rev), None, None]


# ----- elementwise ---------------------------------------------------------------------------------------------
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@rule("Gelu")
def _gelu(c):
    b, x = c.b, c.x
    approx = c.attr("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    if approx == "tanh":
        # y = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        k = math.sqrt(2.0 / math.pi)
        x2 = b.mul(x, x)
        u = b.mul(b.mul(x, b.add(b.mul(x2, 0.044715), 1.0)), k)
        t = b.op("Tanh", [u])
        du = b.mul(b.add(b.mul(x2, 3 * 0.044715), 1.0), k)
        d = b.add(b.mul(b.add(t, 1.0), 0.5), b.mul(b.mul(b.mul(x, 0.5), b.sub(1.0, b.mul(t, t))), du))
        return [Scale(d)]
    # y = x Phi(x): dy = Phi(x) + x phi(x)
    phi_cdf = b.mul(b.add(b.op("Erf", [b.mul(x, 1.0 / math.sqrt(2.0))]), 1.0), 0.5)
    pdf = b.mul(b.op("Exp", [b.mul(b.mul(x, x), -0.5)]), _INV_SQRT_2PI)
    return [Scale(b.add(phi_cdf, b.mul(x, pdf)))]


@rule("Tan")
def _tan(c):
    return [Scale(c.b.add(c.b.mul(c.y, c.y), 1.0))]


@rule("Atan")
def _atan(c):
    return [Scale(c.b.op("Reciprocal", [c.b.add(c.b.mul(c.x, c.x), 1.0)]))]


@rule("Asin", "Acos")
def _asin(c):
    r = c.b.op("Reciprocal", [c.b.op("Sqrt", [c.b.sub(1.0, c.b.mul(c.x, c.x))])])
    return [Scale(r if c.node.op_type == "Asin" else c.b.op("Neg", [r]))]


@rule("Sinh")
def _sinh(c):
    return [Scale(c.b.op("Cosh", [c.x]))]


@rule("Cosh")
def _cosh(c):
    return [Scale(c.b.op("Sinh", [c.x]))]


@rule("Asinh")
def _asinh(c):
    return [Scale(c.b.op("Reciprocal", [c.b.op("Sqrt", [c.b.add(c.b.mul(c.x, c.x), 1.0)])]))]


@rule("Acosh")
def _acosh(c):
    return [Scale(c.b.op("Reciprocal", [c.b.op("Sqrt", [c.b.sub(c.b.mul(c.x, c.x), 1.0)])]))]


@rule("Atanh")
def _atanh(c):
    return [Scale(c.b.op("Reciprocal", [c.b.sub(1.0, c.b.mul(c.x, c.x))]))]


@rule("ThresholdedRelu")
def _thresholded_relu(c):
    return [Scale(c.b.cast_float(c.b.op("Greater", [c.x, c.b.const(float(c.attr("alpha", 1.0)))])))]


@rule("Celu")
def _celu(c):
    # x > 0: 1; else exp(x / alpha) = (y / alpha) + 1
    alpha = float(c.attr("alpha", 1.0))
    return [Scale(c.b.where(c.positive_mask(c.x), 1.0, c.b.add(c.b.mul(c.y, 1.0 / alpha), 1.0)))]


@rule("Mish")
def _mish(c):
    # y = x tanh(softplus(x)): dy = t + x (1 - t^2) sigmoid(x)
    b, x = c.b, c.x
    t = b.op("Tanh", [b.op("Softplus", [x])])
    return [Scale(b.add(t, b.mul(b.mul(x, b.sub(1.0, b.mul(t, t))), b.op("Sigmoid", [x]))))]


# ----- gathers, padding, tiling, expanding ----------------------------------------------------------------------
@rule("Gather")
def _gather(c):
    if c.need(1):
        c.unsupported("indices depend on the input")
    xs = c.shape(c.x)
    axis = c.attr("axis", 0) % len(xs)
    if c.b.value(c.node.input[1]) is None:
        return _gather_run_time_indices(c, axis)
    if xs[axis] is None:
        c.unsupported("gather along the batch axis or a dynamic axis: the output would not keep every point")
    idx = np.asarray(c.const(1, "indices")).astype(np.int64)
    n = xs[axis]
    x, y = c.x, c.y
    flat = np.where(idx < 0, idx + n, idx).reshape(-1)
    K = c.K
    ys = c.shape(c.y)
    iname = c.b.const(idx, np.int64)
    sel = np.zeros((flat.size, n), c.b.np_float)  # rows: gathered positions; adjoint g -> sel^T g along the axis
    sel[np.arange(flat.size), flat] = 1.0
    pre, post = list(xs[:axis]), list(xs[axis + 1:])

    def rev(b, g):
        # g [K, *pre, *idx shape, *post] -> [K, *pre, n_idx, *post]; the target is read off x's run-time shape
        # (the batch axis may be anywhere in pre or post)
        xsh = b.shape_of(x)
        parts = [b.const([K], np.int64)]
        if axis > 0:
            parts.append(b.op("Slice", [xsh, b.const([0], np.int64), b.const([axis], np.int64)], dtype=_INT64))
        parts.append(b.const([flat.size], np.int64))
        if axis + 1 < len(xs):
            parts.append(b.op("Slice", [xsh, b.const([axis + 1], np.int64), b.const([len(xs)], np.int64)],
                              dtype=_INT64))
        tgt = b.op("Concat", parts, axis=0, dtype=_INT64, shape=(len(xs) + 1,))
        g2 = b.op("Reshape", [b.expand_like(g, y, K), tgt], shape=(K,) + tuple(pre) + (flat.size,) + tuple(post))
        return _matmul_along(b, g2, axis + 1, sel)

    return [Linear(fwd=lambda b, d: b.op("Gather", [d, iname], axis=axis + 1, shape=(K,) + tuple(ys)), rev=rev), None]


def _gather_run_time_indices(c, axis):
    """Gather with indices computed at run time (not from the input's values: MaxPool's argmax positions in a
    Jacobian graph, differentiated again). The indices may address a batch axis folded with others, so the
    derivative gets a real batch axis first; the adjoint scatter-adds g back along the axis."""
    xs, ys = c.shape(c.x), c.shape(c.y)
    K, x, y, idx = c.K, c.x, c.y, c.node.input[1]
    ir = len(c.shape(idx))

    def fwd(b, d):
        return b.op("Gather", [b.expand_like(d, x, K), idx], axis=axis + 1, shape=(K,) + tuple(ys))

    def rev(b, g):
        # g [K, *pre, *idx shape, *post] -> [K, *pre, n_idx, *post]; indices broadcast to it; scatter-add into zeros
        gs = b.shape_of(b.expand_like(g, y, K))
        pre = b.op("Slice", [gs, b.const([0], np.int64), b.const([axis + 1], np.int64)], dtype=_INT64)
        post = b.op("Slice", [gs, b.const([axis + 1 + ir], np.int64), b.const([len(ys) + 1], np.int64)],
                    dtype=_INT64)
        tgt = b.op("Concat", [pre, b.const([-1], np.int64), post], axis=0, dtype=_INT64, shape=(len(xs) + 1,))
        g2 = b.op("Reshape", [b.expand_like(g, y, K), tgt])
        iflat = b.op("Reshape", [idx, b.const([1] * (axis + 1) + [-1] + [1] * (len(xs) - axis - 1), np.int64)],
                     dtype=_INT64)
        iexp = b.op("Expand", [iflat, b.shape_of(g2)], dtype=_INT64)
        r = b.op("ScatterElements", [_zeros_like_k(b, x, K), iexp, g2], axis=axis + 1, reduction="add")
        b.shapes[r] = (K,) + tuple(xs)
        return r

    return [Linear(fwd=fwd, rev=rev), None]


@rule("GatherElements")
def _gather_elements(c):
    if c.need(1):
        c.unsupported("indices depend on the input")
    xs, ys = c.shape(c.x), c.shape(c.y)
    axis = c.attr("axis", 0) % len(xs)
    if xs[axis] is None:
        c.unsupported("gather along the batch axis or a dynamic axis")
    K, x, y = c.K, c.x, c.y
    idx = c.node.input[1]

    def kidx(b, like):
        return b.op("Expand", [b.unsqueeze(idx, [0]), b.k_shape(K, like)], dtype=_INT64)

    def fwd(b, d):
        return b.op("GatherElements", [b.expand_like(d, x, K), kidx(b, y)], axis=axis + 1, shape=(K,) + tuple(ys))

    def rev(b, g):
        zeros = _zeros_like_k(b, x, K)
        return b.op("ScatterElements", [zeros, kidx(b, y), b.expand_like(g, y, K)], axis=axis + 1, reduction="add",
                    shape=(K,) + tuple(xs))

    return [Linear(fwd=fwd, rev=rev), None]


@rule("Pad")
def _pad(c):
    mode = c.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        c.unsupported(f"mode {mode!r} (only constant padding)")
    if any(c.need(i) for i in range(1, len(c.node.input))):
        c.unsupported("pads depend on the input")
    xs = c.shape(c.x)
    rank = len(xs)
    pads = [int(p) for p in (c.const(1, "pads").reshape(-1) if len(c.node.input) > 1 and c.node.input[1]
                             else c.attr("pads"))]
    axes = list(range(rank))
    if len(c.node.input) > 3 and c.node.input[3]:
        axes = [int(a) % rank for a in c.const(3, "axes").reshape(-1)]
    begin, end = [0] * rank, [0] * rank
    for k, a in enumerate(axes):
        begin[a], end[a] = pads[k], pads[len(axes) + k]
    if any((begin[a] or end[a]) and xs[a] is None for a in range(rank)):
        c.unsupported("padding of the batch axis or a dynamic axis")
    K = c.K
    fp = c.b.const([0] + begin + [0] + end, np.int64)
    rp = c.b.const([0] + [-p for p in begin] + [0] + [-p for p in end], np.int64)
    return [Linear(fwd=lambda b, d: b.op("Pad", [d, fp], mode="constant", shape=(K,) + tuple(c.shape(c.y))),
                   rev=lambda b, g: b.op("Pad", [g, rp], mode="constant", shape=(K,) + tuple(xs)))] + \
        [None] * (len(c.node.input) - 1)


@rule("Tile")
def _tile(c):
    if c.need(1):
        c.unsupported("repeats depend on the input")
    xs = c.shape(c.x)
    reps = [int(r) for r in c.const(1, "repeats").reshape(-1)]
    if any(r != 1 and d is None for r, d in zip(reps, xs)):
        c.unsupported("tiling along the batch axis or a dynamic axis")
    K = c.K
    fr = c.b.const([1] + reps, np.int64)
    split, red = [K], []
    for a, (r, d) in enumerate(zip(reps, xs)):
        if r != 1:
            red.append(len(split))
            split.append(r)
        split.append(-1 if d is None else d)

    def rev(b, g):
        gs = b.reshape(g, split)
        return b.op("ReduceSum", [gs, b.const(red, np.int64)], keepdims=0, shape=(K,) + tuple(xs))

    return [Linear(fwd=lambda b, d: b.op("Tile", [d, fr], shape=(K,) + tuple(c.shape(c.y))), rev=rev), None]


@rule("Expand")
def _expand(c):
    if c.need(1):
        c.unsupported("the target shape depends on the input")
    xs, ys = c.shape(c.x), c.shape(c.y)
    K = c.K
    tgt = c.node.input[1]
    tl = c.shape(tgt)
    if tl is None or tl[0] is None:
        c.unsupported("target shape of unknown length")
    extra = len(ys) - len(xs)  # leading axes x gains
    red = [i + 1 for i, d in enumerate(xs) if d == 1 and ys[i + extra] != 1]

    def fwd(b, d):
        parts = [b.const([K] + [1] * (len(ys) - tl[0]), np.int64), tgt]
        shape = b.op("Concat", parts, axis=0, dtype=_INT64, shape=(len(ys) + 1,))
        if extra > 0:
            d = b.unsqueeze(d, list(range(1, 1 + extra)))
        return b.op("Expand", [d, shape], shape=(K,) + tuple(ys))

    def rev(b, g):
        if extra > 0:
            g = b.op("ReduceSum", [g, b.const(list(range(1, 1 + extra)), np.int64)], keepdims=0)
        if red:
            g = b.op("ReduceSum", [g, b.const(red, np.int64)], keepdims=1)
        b.shapes[g] = (K,) + tuple(xs)
        return g

    return [Linear(fwd=fwd, rev=rev), None]


# ----- resize ---------------------------------------------------------------------------------------------------
@rule("Resize")
def _resize(c):
    mode = c.attr("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("nearest", "linear"):
        c.unsupported(f"mode {mode!r} (nearest and linear are supported)")
    if any(c.need(i) for i in range(1, len(c.node.input))):
        c.unsupported("scales or sizes depend on the input")
    xs, ys = c.shape(c.x), c.shape(c.y)
    if any(d is None for d in ys[1:]) or any(d is None for d in xs[1:]):
        c.unsupported("resize with run-time sizes")
    # separable: one interpolation matrix per resized axis, read off the op itself on unit vectors
    attrs = {a.name: helper.get_attribute_value(a) for a in c.node.attribute}
    mats = []
    for a in range(1, len(xs)):
        if xs[a] == ys[a]:
            continue
        n_in, n_out = xs[a], ys[a]
        shape_in = [1] * len(xs)
        shape_in[a] = n_in
        eye = np.zeros([n_in] + shape_in[1:])
        for i in range(n_in):
            eye[(i,) + tuple(i if k == a else 0 for k in range(1, len(xs)))] = 1.0
        sizes = np.array([n_in] + [n_out if k == a else 1 for k in range(1, len(xs))], np.int64)
        node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"],
                                **{k: v for k, v in attrs.items() if k not in ("scales",)})
        from onnx.reference import ReferenceEvaluator

        g = helper.make_graph([node], "r", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                              [helper.make_tensor("sizes", TensorProto.INT64, [len(sizes)], sizes)])
        out = ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])).run(
            None, {"x": eye})[0]
        mats.append((a, out.reshape(n_in, n_out)))  # row i: the output along the axis for input e_i

    def fwd(b, d):
        for a, m in mats:
            d = _matmul_along(b, d, a + 1, m.astype(b.np_float))
        return d

    def rev(b, g):
        for a, m in reversed(mats):
            g = _matmul_along(b, g, a + 1, m.T.astype(b.np_float).copy())
        return g

    return [Linear(fwd=fwd, rev=rev)] + [None] * (len(c.node.input) - 1)


# ----- einsum ---------------------------------------------------------------------------------------------------
@rule("Einsum")
def _einsum(c):
    eq = c.attr("equation")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    eq = eq.replace(" ", "")
    if "->" not in eq:
        c.unsupported("an implicit-output equation; write it with '->'")
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    free = [ch for ch in "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba" if ch not in eq]
    k = free[0]
    K = c.K
    terms = []
    for i, spec in enumerate(ins):
        if not c.need(i):
            terms.append(None)
            continue
        letters = spec.replace("...", "")
        if len(set(letters)) != len(letters):
            c.unsupported(f"operand {i} repeats an index ({spec!r}: a diagonal)")
        others = [s for j, s in enumerate(ins) if j != i]
        if any(ch not in out and all(ch not in s for s in others) for ch in letters):
            c.unsupported(f"operand {i} has an index summed over on its own ({spec!r})")
        if "..." in spec and "..." not in out:
            c.unsupported("an ellipsis summed over")
        fwd_eq = ",".join(k + s if j == i else s for j, s in enumerate(ins)) + "->" + k + out
        rev_eq = ",".join([k + out] + others) + "->" + k + spec
        names = list(c.node.input)

        def fwd(b, d, i=i, fwd_eq=fwd_eq):
            ops = [d if j == i else n for j, n in enumerate(names)]
            return b.op("Einsum", ops, equation=fwd_eq, shape=(K,) + tuple(c.shape(c.y)))

        def rev(b, g, i=i, rev_eq=rev_eq):
            ops = [g] + [n for j, n in enumerate(names) if j != i]
            r = b.op("Einsum", ops, equation=rev_eq)
            xs = c.shape(names[i])
            b.shapes[r] = (K,) + tuple(xs)
            return r

        terms.append(Linear(fwd=fwd, rev=rev))
    return terms


__all__ = []
_ = ONE  # re-exported term kinds are used through the rules module
