"""Keras / SavedModel -> frozen forward ONNX graph (tf2onnx).

The model is traced with ``tf.function``, every variable and captured tensor (weights, the Normalization
layer's adapted mean and variance, BatchNormalization moving statistics) is frozen into a constant with
``convert_variables_to_constants_v2``, and the frozen GraphDef goes through ``tf2onnx.convert.from_graph_def``.
That avoids two known traps of tf2onnx 1.17 with Keras 3: ``from_keras`` fails, and ``from_function`` turns
captured tensors into extra graph inputs. The result has exactly the model's inputs, a dynamic batch dimension
named ``batch``, clean tensor names (the Keras input and output names) and only standard ONNX ops. Reshape targets
(and whole-axis reversals) that tf2onnx computes at run time from ``Shape`` are made constant
(:func:`fold_shape_computations`), so every tensor has static sizes after the batch axis. Recurrent layers must be unrolled (:func:`check_recurrent_layers`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nnpartials.errors import ExportError

DEFAULT_OPSET = 17


@dataclass
class TracedModel:
    """A model reduced to what export and validation need: a callable on a list of float32 tensors that
    returns a list of output tensors, and the input/output names and widths."""

    fn: object  # tf.function taking *inputs (each [B, *shape_k]) and returning a list of [B, ...] tensors
    input_names: list
    input_shapes: list  # per-point shape of each input (tuples of ints, without the batch axis)
    output_names: list
    keras_model: object = None
    source: str = "keras"
    normalization: dict | None = field(default=None)
    owner: object = None  # keeps a loaded SavedModel (and its variables) alive while fn is in use

    @property
    def input_widths(self) -> list:
        """Features per point of each input (the product of its shape)."""
        return [int(np.prod(s, dtype=np.int64)) for s in self.input_shapes]


def _clean(name: str, fallback: str) -> str:
    name = (name or "").split(":")[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return name or fallback


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: WPS433

    return tf


def load_model(model_or_path, allow_unsafe_deserialization: bool = False):
    """Return a TracedModel for a keras.Model, a ``.keras``/``.h5`` file or a SavedModel directory.

    ``allow_unsafe_deserialization``: load a file whose Lambda layers hold Python code (Keras's ``safe_mode=False``).
    Loading such a file runs that code, so Keras refuses it by default, and so does this function: pass True only
    for files you trust."""
    tf = _import_tf()
    import keras

    if isinstance(model_or_path, keras.Model):
        return _from_keras(model_or_path)
    path = os.fspath(model_or_path)
    if not os.path.exists(path):
        raise ExportError(f"model path {path!r} does not exist (expected a .keras file or a SavedModel directory)")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ExportError(f"{path!r} is a directory without saved_model.pb; expected a SavedModel directory")
        return _from_saved_model(path, tf)
    if not path.endswith((".keras", ".h5", ".hdf5")):
        raise ExportError(f"{path!r}: expected a .keras (or .h5) file or a SavedModel directory")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=not allow_unsafe_deserialization)
    except Exception as exc:  # keras raises many types for corrupt files
        if not allow_unsafe_deserialization and "safe_mode" in str(exc):
            raise ExportError(
                f"{path!r} holds a Lambda layer (or other Python code stored in the file), and loading it would run "
                f"that code, so Keras refuses it by default. If you trust the file, allow it explicitly: "
                f"nnpartials.export(..., allow_unsafe_deserialization=True), or `nnpartials export --allow-lambda` "
                f"on the command line. (Keras: {str(exc).split('. ')[0].strip()}.)") from exc
        raise ExportError(f"could not load Keras model {path!r}: {type(exc).__name__}: {exc}") from exc
    return _from_keras(model)


def _from_keras(model):
    tf = _import_tf()
    inputs = list(model.inputs)
    if not inputs:
        raise ExportError("the Keras model has no defined inputs; build it (call it once or use keras.Input)")
    names, shapes = [], []
    for i, t in enumerate(inputs):
        shape = tuple(t.shape)
        if len(shape) < 2 or any(d is None for d in shape[1:]):
            raise ExportError(f"input {i} ({t.name}) has shape {shape}; nnpartials exports models whose inputs "
                              f"are [batch, ...] with every axis after the batch axis fixed")
        names.append(_clean(t.name, f"x{i}"))
        shapes.append(tuple(int(d) for d in shape[1:]))
    if len(set(names)) != len(names):
        names = [f"x{i}" for i in range(len(names))]
    out_names = list(getattr(model, "output_names", None) or [])
    n_out = len(model.outputs)
    if len(out_names) != n_out:
        out_names = [f"y{i}" if n_out > 1 else "y_model" for i in range(n_out)]
    out_names = [_clean(n, f"y{i}") for i, n in enumerate(out_names)]
    # "y" and "dy_dx*" are reserved for the companion graph's outputs
    out_names = [n if n != "y" and not n.startswith("dy_d") else f"out_{n}" for n in out_names]
    single = len(inputs) == 1

    @tf.function(autograph=False)
    def fn(*xs):
        out = model(xs[0] if single else list(xs), training=False)
        if isinstance(out, dict):
            out = [out[k] for k in sorted(out)]
        if not isinstance(out, (list, tuple)):
            out = [out]
        return list(out)

    return TracedModel(fn=fn, input_names=names, input_shapes=shapes, output_names=out_names,
                       keras_model=model, source="keras", normalization=_normalization_stats(model))


def _normalization_stats(model):
    """Mean and std of a Normalization layer applied directly to the (single) model input, else None."""
    import keras

    if len(model.inputs) != 1:
        return None
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.layers.Normalization):
            try:
                mean = np.asarray(layer.mean, dtype=np.float64).reshape(-1)
                var = np.asarray(layer.variance, dtype=np.float64).reshape(-1)
            except Exception:  # not adapted / no stats
                return None
            width = int(model.inputs[0].shape[1])
            if mean.size == 1:
                mean, var = np.full(width, mean[0]), np.full(width, var[0])
            if mean.size != width:
                return None
            return {"mean": mean.tolist(), "std": np.sqrt(np.maximum(var, 1e-12)).tolist()}
        return None
    return None


def _from_saved_model(path, tf):
    try:
        obj = tf.saved_model.load(path)
    except Exception as exc:
        raise ExportError(f"could not load SavedModel {path!r}: {type(exc).__name__}: {exc}") from exc
    sigs = getattr(obj, "signatures", {})
    if "serving_default" not in sigs:
        raise ExportError(f"SavedModel {path!r} has no 'serving_default' signature; found {sorted(sigs)}")
    sig = sigs["serving_default"]
    kw = sig.structured_input_signature[1]
    keys = sorted(kw)
    names, shapes = [], []
    for k in keys:
        spec = kw[k]
        shape = tuple(spec.shape)
        if len(shape) < 2 or any(d is None for d in shape[1:]):
            raise ExportError(f"SavedModel input {k!r} has shape {shape}; expected [batch, ...] with fixed axes "
                              f"after the batch axis")
        names.append(_clean(k, "x"))
        shapes.append(tuple(int(d) for d in shape[1:]))
    out_keys = sorted(sig.structured_outputs)
    out_names = [_clean(k, f"y{i}") for i, k in enumerate(out_keys)]
    out_names = [n if n != "y" and not n.startswith("dy_d") else f"out_{n}" for n in out_names]

    @tf.function(autograph=False)
    def fn(*xs):
        res = sig(**{k: x for k, x in zip(keys, xs)})
        return [res[k] for k in out_keys]

    return TracedModel(fn=fn, input_names=names, input_shapes=shapes, output_names=out_names,
                       source="saved_model", owner=obj)


#: TensorFlow ops of a ``tf.while_loop`` over a sequence, which tf2onnx leaves unconverted
_LOOP_OPS = ("TensorList", "TensorArray")


def _loop_hint(what: str) -> str:
    return (f"{what} a TensorFlow while-loop over the time steps (TensorList ops), which tf2onnx cannot convert "
            f"to ONNX, and a loop would not be differentiated anyway. Build the recurrent layers with unroll=True "
            f"(e.g. keras.layers.LSTM(units, unroll=True); the weights are the same, so new_layer.set_weights("
            f"old_layer.get_weights()) carries them over). Unrolling needs a fixed number of time steps.")


def check_recurrent_layers(keras_model) -> None:
    """ExportError naming the recurrent layers (LSTM, GRU, SimpleRNN, any keras.layers.RNN, also inside
    Bidirectional or nested models) that run as a loop (``unroll=False``)."""
    import keras

    if keras_model is None:
        return
    try:
        layers = list(keras_model._flatten_layers(include_self=False, recursive=True))
    except Exception:  # pragma: no cover - private Keras API changed
        layers = list(getattr(keras_model, "layers", []))
    looped = [lay for lay in layers if isinstance(lay, keras.layers.RNN) and not getattr(lay, "unroll", False)]
    if looped:
        names = ", ".join(f"{lay.name!r} ({type(lay).__name__})" for lay in looped)
        raise ExportError(_loop_hint(f"recurrent layer{'s' if len(looped) > 1 else ''} {names} with unroll=False "
                                     f"{'run' if len(looped) > 1 else 'runs'} as"))


def to_onnx(traced: TracedModel, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Freeze the traced model and convert it to a clean, checked forward ONNX model."""
    check_recurrent_layers(traced.keras_model)
    tf = _import_tf()
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    specs = [tf.TensorSpec([None, *s], tf.float32, name=n) for n, s in zip(traced.input_names, traced.input_shapes)]
    try:
        cf = traced.fn.get_concrete_function(*specs)
        frozen = convert_variables_to_constants_v2(cf)
    except Exception as exc:
        raise ExportError(f"could not trace and freeze the model: {type(exc).__name__}: {exc}") from exc
    gdef = frozen.graph.as_graph_def()
    tf_inputs = [t.name for t in frozen.inputs if t.dtype != tf.resource]
    tf_outputs = [t.name for t in frozen.outputs]
    out_shapes = [t.shape.as_list() if t.shape.rank is not None else None for t in frozen.outputs]
    if len(tf_inputs) != len(traced.input_names):
        raise ExportError(f"the frozen graph has {len(tf_inputs)} inputs {tf_inputs}, the model has "
                          f"{len(traced.input_names)} {traced.input_names}; a captured tensor was not frozen")
    if len(tf_outputs) != len(traced.output_names):
        raise ExportError(f"the frozen graph has {len(tf_outputs)} outputs, the model {len(traced.output_names)}")
    import logging

    logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)  # Erfc is legalized below
    try:
        model, _ = tf2onnx.convert.from_graph_def(gdef, input_names=tf_inputs, output_names=tf_outputs, opset=opset)
    except Exception as exc:
        loops = sorted({n.op for n in gdef.node if n.op.startswith(_LOOP_OPS)})
        if loops:
            raise ExportError(_loop_hint(f"the model holds {', '.join(loops)}: a recurrent layer running as")) from exc
        raise ExportError(f"tf2onnx could not convert the model: {type(exc).__name__}: {exc}") from exc
    loops = sorted({n.op_type for n in model.graph.node if n.op_type.startswith(_LOOP_OPS)})
    if loops:
        raise ExportError(_loop_hint(f"the converted graph holds {', '.join(loops)}: a recurrent layer running as"))
    rename = dict(zip(tf_inputs, traced.input_names))
    rename.update(zip(tf_outputs, traced.output_names))
    model = _rename(model, rename)
    model = legalize(model)
    model = fold_shape_computations(model, traced.input_shapes)
    _set_batch_dim(model)
    _set_output_dims(model, out_shapes)
    if [i.name for i in model.graph.input] != traced.input_names:
        raise ExportError(f"exported ONNX inputs {[i.name for i in model.graph.input]} differ from the model's "
                          f"inputs {traced.input_names}")
    model.producer_name = "nnpartials"
    model.doc_string = "forward graph exported by nnpartials (frozen, tf2onnx)"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported forward graph fails onnx.checker: {exc}") from exc
    return model


def _rename(model: onnx.ModelProto, mapping: dict) -> onnx.ModelProto:
    g = model.graph
    # An output that is also an input, or two outputs aliasing one tensor, need an Identity to rename.
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name in mapping:
            vi.name = mapping[vi.name]
    for node in g.node:
        for i, n in enumerate(node.input):
            if n in mapping:
                node.input[i] = mapping[n]
        for i, n in enumerate(node.output):
            if n in mapping:
                node.output[i] = mapping[n]
    return model


def legalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite the non-standard ops tf2onnx may leave behind into standard ONNX.

    * ``Erfc(x)`` (emitted for Keras 3's exact gelu, but not an ONNX op) becomes ``Sub(1, Erf(x))``.
    """
    g = model.graph
    new_nodes = []
    one_name = None
    for node in g.node:
        if node.op_type == "Erfc" and node.domain in ("", "ai.onnx"):
            if one_name is None:
                one_name = "nnp_legalize_one"
                g.initializer.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), one_name))
            erf_out = node.output[0] + "__erf"
            new_nodes.append(helper.make_node("Erf", [node.input[0]], [erf_out], name=node.name + "__erf"))
            new_nodes.append(helper.make_node("Sub", [one_name, erf_out], [node.output[0]], name=node.name))
        else:
            new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    used = {n.domain for n in g.node}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def fold_shape_computations(model: onnx.ModelProto, input_shapes, batches=(3, 7)) -> onnx.ModelProto:
    """Make constant what tf2onnx computes at run time from tensor shapes, where it is the same at every batch size.

    * A Reshape whose target TensorFlow knew only at run time (Dense on a rank-3 input, the heads of
      MultiHeadAttention, Flatten after a convolution) comes as ``Shape -> Gather -> ReduceProd -> Concat ->
      Reshape``. Shape inference cannot see through that, so the tensors after it have unknown sizes and the
      derivative rules refuse them (a softmax over an axis of unknown length). The target becomes a constant: the
      output axes of the same length at every batch size are static, the one that varies (the batch axis, or the
      batch folded with others) becomes -1.
    * ``tf.reverse`` along the time axis (the backward half of a Bidirectional layer) comes as a ReverseSequence
      whose lengths are the whole time axis, computed from ``Shape``; it becomes a Slice with step -1.

    Which is which is read off the forward graph run at two batch sizes (only targets computed from shapes and
    constants are considered, never from values). The dead shape arithmetic is then removed. On any failure the
    model is returned unchanged, and the derivative rules report what they cannot handle."""
    g = model.graph
    known = {t.name for t in g.initializer}
    known.update(n.output[0] for n in g.node if n.op_type == "Constant")
    producer = {o: n for n in g.node for o in n.output}

    def from_shapes_only(name):
        """True when ``name`` is computed from constants and tensor shapes only, never from tensor values."""
        stack, seen = [name], set()
        while stack:
            t = stack.pop()
            if t in known or t in seen:
                continue
            seen.add(t)
            node = producer.get(t)
            if node is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                   for a in node.attribute):
                return False  # a graph input, or control flow
            if node.op_type not in ("Shape", "Size"):
                stack.extend(i for i in node.input if i)
        return True

    def computed(node, i):
        return len(node.input) > i and node.input[i] and node.input[i] not in known and \
            from_shapes_only(node.input[i])

    reshapes = [n for n in g.node if n.op_type == "Reshape" and computed(n, 1)
                and not any(a.name == "allowzero" and a.i for a in n.attribute)]
    reverses = [n for n in g.node if n.op_type == "ReverseSequence" and computed(n, 1)]
    if not reshapes and not reverses:
        return model
    # what to read at each batch size: a reshape's output (its shape), a reverse's input (its shape) and lengths
    names = list(dict.fromkeys([n.output[0] for n in reshapes] + [t for n in reverses for t in n.input[:2]]))
    try:
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        have = {o.name for o in probe.graph.output}
        probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in have)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        inputs = [i.name for i in g.input if i.name not in known]
        runs = []
        for nb in batches:
            feeds = {n: rng.uniform(-1, 1, (nb, *s)).astype(np.float32) for n, s in zip(inputs, input_shapes)}
            runs.append(dict(zip(names, sess.run(names, feeds))))
    except Exception:  # the graph is left as tf2onnx wrote it; the rules report what they cannot handle
        return model
    taken = known | set(producer)

    def new_const(value, hint):
        name, k = f"nnp_{hint}", 0
        while name in taken:
            k += 1
            name = f"nnp_{hint}_{k}"
        taken.add(name)
        g.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    changed = False
    for node in reshapes:
        shapes = [r[node.output[0]].shape for r in runs]
        if len({len(s) for s in shapes}) != 1:
            continue
        vary = [i for i in range(len(shapes[0])) if len({s[i] for s in shapes}) > 1]
        if len(vary) > 1 or any(d == 0 for s in shapes for d in s):
            continue
        node.input[1] = new_const([-1 if i in vary else int(d) for i, d in enumerate(shapes[0])], "reshape_target")
        changed = True
    new_nodes = {}
    for node in reverses:
        time_axis = next((a.i for a in node.attribute if a.name == "time_axis"), 0)
        whole = all(r[node.input[0]].ndim > time_axis and np.all(np.asarray(r[node.input[1]]) ==
                                                                 r[node.input[0]].shape[time_axis]) for r in runs)
        if not whole:
            continue
        ins = [node.input[0], new_const([-1], "reverse_start"), new_const([-(2 ** 63) + 1], "reverse_end"),
               new_const([time_axis], "reverse_axis"), new_const([-1], "reverse_step")]
        new_nodes[id(node)] = helper.make_node("Slice", ins, list(node.output), name=node.name)
        changed = True
    if new_nodes:
        nodes = [new_nodes.get(id(n), n) for n in g.node]
        del g.node[:]
        g.node.extend(nodes)
    return _prune(model) if changed else model


def _prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes whose outputs nothing reads, and unused initializers."""
    g = model.graph

    def reads(node):
        out = set(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for n in sub.node:
                    out |= reads(n)
                out.update(o.name for o in sub.output)
        return out

    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= reads(node)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def _set_output_dims(model: onnx.ModelProto, shapes):
    """Static output sizes after the batch axis where tf2onnx left them unknown: from TensorFlow's static shapes,
    else from ONNX shape inference (with the declared output shapes left out, so they cannot mask it)."""
    inferred = {}
    try:
        bare = onnx.ModelProto()
        bare.CopyFrom(model)
        for vi in bare.graph.output:
            vi.type.tensor_type.ClearField("shape")
        for vi in onnx.shape_inference.infer_shapes(bare, strict_mode=False).graph.output:
            if vi.type.tensor_type.HasField("shape"):
                inferred[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                     for d in vi.type.tensor_type.shape.dim]
    except Exception:  # shape inference is a best effort here
        pass
    for k, vi in enumerate(model.graph.output):
        dims = list(vi.type.tensor_type.shape.dim)
        for shape in ((shapes or [])[k] if k < len(shapes or []) else None, inferred.get(vi.name)):
            if shape is None or len(shape) != len(dims):
                continue
            for d, v in zip(dims[1:], shape[1:]):
                if v is not None and not d.HasField("dim_value"):
                    d.Clear()
                    d.dim_value = int(v)


def _set_batch_dim(model: onnx.ModelProto):
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"


def keras_to_onnx(model_or_path, opset: int = DEFAULT_OPSET, allow_unsafe_deserialization: bool = False
                  ) -> onnx.ModelProto:
    """Convenience: load (if needed), trace, freeze and convert; returns the forward ONNX model."""
    return to_onnx(load_model(model_or_path, allow_unsafe_deserialization=allow_unsafe_deserialization), opset=opset)
