"""segserve's server: three front doors over one transport-free core.

    grpc/        Segmenter and inference.GRPCInferenceService servicers, their converters, the interceptor
    rest/        the HTTP port: Open Inference Protocol REST under /v2, POST /v1/segment, uvicorn
    inference/   the Open Inference Protocol without transport: tensor contract, tensors, statistics
    operations/  metrics, the per-call access record and log, drain tracking
    core/        one image through one model: value types, decode, batcher, model pipeline, masks, admission
    models/      the model repository's configs, the registry, loading and unloading at run time
    runtimes/    torch, onnxruntime and openvino behind one interface, chosen by measurement; the weights

settings, errors and labels are leaves every package may import; app.py is the composition root, the only
module that knows both doors; __main__ and reload start it. Imports go one way, down this list
(pyproject.toml's [tool.importlinter] states it and `make lint` checks it).
"""
