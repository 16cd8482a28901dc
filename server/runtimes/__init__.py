"""Model runtimes: torch, onnxruntime and openvino behind one interface (base.Runtime), chosen by measurement in
factory.create_runtime (selection.py); the DeepLabV3 weights every runtime starts from (weights.py). Never
imports models/."""
