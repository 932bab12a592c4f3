"""Keras -> ONNX export, derivative rules, C weight files, bundles."""
