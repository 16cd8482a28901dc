# segserve images, one file with three targets:
#   server (the default, production): the gRPC server with the model's weights baked in; no debugpy.
#   debug: server plus debugpy, for docker-compose.debug.yml and the dev container. Never deploy it.
#   ui: the Gradio page; no torch.
# docker build -t segserve .                                       # server, deeplabv3_mobilenet_v3_large
# docker build --build-arg MODEL=deeplabv3_resnet50 -t segserve:r50 .
# docker build --target ui -t segserve-ui .
# docker build --build-arg WEIGHTS=random -t segserve:random .      # no download: random weights, said in ModelInfo
# docker build --build-arg WEIGHTS=docker/weights/mine.pt -t segserve:mine .   # a state_dict baked in (air-gapped)
# docker build --build-arg BASE_IMAGE=my-registry/python:3.11-slim-bookworm .  # another Debian-based Python 3.11
#
# No `# syntax=` line: BuildKit would pull that frontend image from Docker Hub; the engine's own is enough.
#
# The source lives in /app and is not pip-installed (PYTHONPATH=/app), so a bind mount of the checkout
# on /app replaces it: edit, restart, no rebuild.

ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The containers run as this user (numeric in USER, so Kubernetes' runAsNonRoot can check it);
# the code and packages stay root's, so the service cannot rewrite them.
RUN useradd --create-home --uid 10001 --user-group app
WORKDIR /app

# ---- the Gradio page ---------------------------------------------------------------------------------
FROM base AS ui
COPY pyproject.toml constraints.txt /build/
COPY docker/requirements.py /build/docker/requirements.py
RUN python /build/docker/requirements.py --without torch torchvision onnx onnxruntime openvino debugpy watchfiles > /build/requirements.txt \
    && pip install -c /build/constraints.txt -r /build/requirements.txt
COPY protos/ /app/protos/
COPY client/ /app/client/
COPY server/ /app/server/
COPY gradio_ui/ /app/gradio_ui/
USER 10001:10001
ENV SEGSERVE_UI_HOST=0.0.0.0 \
    SEGSERVE_UI_PORT=7860 \
    SEGSERVE_UI_TARGET=dns:///server:50051 \
    GRADIO_ANALYTICS_ENABLED=False
EXPOSE 7860
CMD ["python", "-m", "gradio_ui"]

# ---- the server's runtime: dependencies, weights, code ------------------------------------------------
FROM base AS runtime
# A CPU build of torch is a fifth of the size of the default CUDA one. For a GPU image pass
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (and run with --gpus all).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Before pyproject.toml is copied: an edit there must not install torch (gigabytes) again.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY pyproject.toml constraints.txt /build/
COPY docker/requirements.py /build/docker/requirements.py
RUN python /build/docker/requirements.py --without gradio debugpy watchfiles > /build/requirements.txt \
    && pip install -c /build/constraints.txt -r /build/requirements.txt

# Weights at build time, before the code, so a code change does not download them again.
# WEIGHTS=pretrained downloads them; random takes none (the server says so in ModelInfo); a path under
# docker/weights/ bakes that state_dict in, loaded once here to prove it fits MODEL.
ARG MODEL=deeplabv3_mobilenet_v3_large
ARG WEIGHTS=pretrained
ENV TORCH_HOME=/opt/torch
COPY docker/fetch_weights.py /build/docker/fetch_weights.py
COPY docker/weights/ /app/docker/weights/
RUN python /build/docker/fetch_weights.py "${MODEL}" "${WEIGHTS}"
# pretrained: a missing cache is a start-up error, never a silent fall back to random weights.
# A path is relative to /app, the working directory (under the debug overlay, the checkout it was built from).
ENV SEGSERVE_MODEL=${MODEL} \
    SEGSERVE_WEIGHTS=${WEIGHTS} \
    SEGSERVE_HOST=0.0.0.0 \
    SEGSERVE_PORT=50051

COPY protos/ /app/protos/
COPY server/ /app/server/
COPY client/ /app/client/
USER 10001:10001
# Every port the server opens by default (server/settings.py): gRPC, HTTP (Open Inference Protocol REST and
# /v1/segment; SEGSERVE_HTTP_PORT=-1 turns it off) and the Prometheus metrics. All three bind SEGSERVE_HOST,
# every interface in the image. deploy/k8s's Deployment declares the same three.
EXPOSE 50051 8000 9464
# Asks the gRPC health service: exit 0 only when SERVING, which is once the model is loaded and warmed up.
# On the port the server listens on, SEGSERVE_PORT (several servers on one host network each take their own).
HEALTHCHECK --interval=10s --timeout=8s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "exec python -m client health --target \"127.0.0.1:${SEGSERVE_PORT}\""]
CMD ["python", "-m", "server"]

# ---- debug: the server plus debugpy (remote code execution for whoever reaches its port) -----------------
FROM runtime AS debug
USER 0
RUN python /build/docker/requirements.py --only debugpy watchfiles > /build/requirements-debug.txt \
    && pip install -c /build/constraints.txt -r /build/requirements-debug.txt
USER 10001:10001
# debugpy listens on the container's loopback only, and 5678 is deliberately not EXPOSEd: `docker run -P`
# publishes every EXPOSEd port on all of the host's interfaces, and on a bridge network anything that
# reaches the container's address (other containers, the bridge) would reach a 0.0.0.0 listener.
# Attach from inside the container (VS Code's dev container), or run it on the host's network, where the
# container's loopback is the host's: docker run --network host -e SEGSERVE_HOST=127.0.0.1 IMAGE
# (docker-compose.debug.yml does that; docs/debugging.md).
CMD ["python", "-Xfrozen_modules=off", "-m", "debugpy", "--listen", "127.0.0.1:5678", "-m", "server"]

# ---- server: the production image, and the default target (last stage) ----------------------------------
FROM runtime AS server
