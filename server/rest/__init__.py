"""The HTTP port: the Starlette app (Open Inference Protocol REST under /v2, POST /v1/segment for curl), its
converters (JSON and Triton's binary tensors <-> the inference domain) and uvicorn in the server's event loop.
Never imports the gRPC port."""
