"""onnxruntime serving, the C core wrapper, cross-checks, identifiability diagnostics."""
