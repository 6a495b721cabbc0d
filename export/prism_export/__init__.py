"""prism_export: the export stage (checkpoint → ONNX → fp16/int8 → TensorRT) and model factories.

Needs the ``torch`` extra. The runtime (``prism_rt``) never imports this package.
"""
