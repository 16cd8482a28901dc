"""Model runtimes: torch, onnxruntime and openvino behind one interface, chosen in factory.create_runtime."""

from server.runtimes.base import ModelFacts, Runtime

__all__ = ["ModelFacts", "Runtime"]
