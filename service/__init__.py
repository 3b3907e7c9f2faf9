"""Serving: the model store behind ONNX Runtime, dynamic batching and HTTP. Never imports torch."""

__version__ = "0.1.0"
