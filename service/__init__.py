"""Serving: the model store behind ONNX Runtime, dynamic batching and HTTP. Never imports torch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("committee")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
