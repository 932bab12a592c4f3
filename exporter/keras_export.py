"""Keras / SavedModel -> frozen forward ONNX graph (tf2onnx).

The model is traced with ``tf.function``, every variable and captured tensor (weights, the Normalization
layer's adapted mean and variance, BatchNormalization moving statistics) is frozen into a constant with
``convert_variables_to_constants_v2``, and the frozen GraphDef goes through ``tf2onnx.convert.from_graph_def``.
That avoids two known traps of tf2onnx 1.17 with Keras 3: ``from_keras`` fails, and ``from_function`` turns
captured tensors into extra graph inputs. The result has exactly the model's inputs, a dynamic batch dimension
named ``batch``, clean tensor names (the Keras input and output names) and only standard ONNX ops.
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


def load_model(model_or_path):
    """Return a TracedModel for a keras.Model, a ``.keras``/``.h5`` file or a SavedModel directory."""
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
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types for corrupt files
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


def to_onnx(traced: TracedModel, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Freeze the traced model and convert it to a clean, checked forward ONNX model."""
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
        raise ExportError(f"tf2onnx could not convert the model: {type(exc).__name__}: {exc}") from exc
    rename = dict(zip(tf_inputs, traced.input_names))
    rename.update(zip(tf_outputs, traced.output_names))
    model = _rename(model, rename)
    model = legalize(model)
    _set_batch_dim(model)
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


def _set_batch_dim(model: onnx.ModelProto):
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"


def keras_to_onnx(model_or_path, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Convenience: load (if needed), trace, freeze and convert; returns the forward ONNX model."""
    return to_onnx(load_model(model_or_path), opset=opset)
