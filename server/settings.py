"""The one settings object: SEGSERVE_* environment variables, overridable by CLI flags."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ModelName = Literal["deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101"]
RuntimeName = Literal["auto", "torch", "onnxruntime", "openvino"]
Precision = Literal["auto", "fp32", "fp16", "bf16", "int8"]
LogFormat = Literal["text", "json"]

MIN_MAX_SIZE = 16


class ModelSettings(BaseModel):
    """One model's settings: what its runtime, batcher and warm-up read, and nothing of the server's (no ports,
    no certificates, no queue). Each field has the name and meaning of the Settings field it defaults to
    (Settings.model_settings); a model's config file overrides some of them (server/models/repository.py,
    ModelFile, which validates them as Settings does)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: ModelName
    """The architecture."""
    weights: str
    device: str
    runtime: RuntimeName
    precision: Precision
    cache_dir: str
    capture: bool
    max_size: int = Field(ge=MIN_MAX_SIZE)
    max_batch_size: int = Field(ge=1)
    max_batch_delay_ms: float = Field(ge=0)
    adaptive_batching: bool
    model_instances: int = Field(ge=1)
    inference_threads: int = Field(ge=0)
    channels_last: bool
    warmup: bool


class Settings(BaseSettings):
    """Server settings. Each field is SEGSERVE_<NAME> in the environment and --<name> on the CLI."""

    model_config = SettingsConfigDict(env_prefix="SEGSERVE_", extra="ignore", protected_namespaces=())

    host: str = Field("[::]", description="Address the gRPC server binds to.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    http_port: int = Field(
        8000,
        ge=-1,
        le=65535,
        description="HTTP port: Open Inference Protocol REST (/v2) and POST /v1/segment, on the gRPC bind "
        "address and TLS settings (0 picks a free one, -1 turns it off).",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest an HTTP connection (the HTTP and metrics ports) may take to send a request's head "
        "(request line and headers; under TLS, the handshake too), from its connection or, between requests, "
        "from the head's first byte; then it is answered 408 and closed, so slow senders cannot hold sockets.",
    )
    http_max_connections: int = Field(
        512,
        ge=1,
        description="HTTP connections open at once on the HTTP port; a connection beyond it is answered 503 and "
        "closed at once, so that HTTP callers never take every file descriptor from gRPC.",
    )
    model: ModelName = Field(
        "deeplabv3_mobilenet_v3_large",
        description="DeepLabV3 variant to serve when neither model_repository nor models is set.",
    )
    model_repository: str | None = Field(
        None,
        description="Folder of models, one subfolder per model (its name is the model's) with a config.yaml: "
        "architecture, weights, labels, max_size, max_batch_size, max_batch_delay_ms.",
    )
    models: str | None = Field(
        None,
        description="Several models in one line, NAME=ARCHITECTURE[,...] (weights: the weights setting), "
        "e.g. fast=deeplabv3_mobilenet_v3_large,best=deeplabv3_resnet101.",
    )
    default_model: str | None = Field(
        None,
        description="The model a request without a model name gets (unset: the first model that loaded, "
        "never one that failed).",
    )
    model_control: bool = Field(
        False,
        description="Load, reload and unload repository models at run time (the inference protocol's "
        "RepositoryModelLoad/Unload; python -m client load/unload). Off: those calls are refused.",
    )
    control_token: str | None = Field(
        None,
        description="The token model control takes while it is on: load, unload and the repository index must "
        "send 'authorization: Bearer TOKEN' (gRPC metadata or HTTP header). Unset: one is made at start and "
        "written to control_token_file.",
    )
    control_token_file: str | None = Field(
        None,
        description="Where a made control token is kept (mode 0600; a later start reuses it); python -m client "
        "reads it from there too. Unset: segserve-<uid>/control-token in the system's temporary folder.",
    )
    max_models: int = Field(
        0, ge=0, description="Most models loaded at once (0: no limit); a load past it is refused (RESOURCE_EXHAUSTED)."
    )
    max_model_weights_bytes: int = Field(
        0,
        ge=0,
        description="Most bytes of weights loaded at once, all models together (0: no limit); a load past it is "
        "refused (RESOURCE_EXHAUSTED).",
    )
    weights: str = Field(
        "auto",
        description="auto (pretrained, random if unavailable), pretrained (fail if unavailable), "
        "random, or a path to a state_dict file.",
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N.")
    runtime: RuntimeName = Field(
        "auto",
        description="Engine that runs the model: auto (each installed one timed at the first start on this "
        "machine, the fastest serves; the verdict is cached), torch, onnxruntime or openvino.",
    )
    precision: Precision = Field(
        "auto",
        description="auto (bf16 where the CPU computes it natively, openvino int8 where it has int8 units, "
        "fp16 or bf16 on CUDA, when faster and its masks agree with fp32's on 99.5% of the check images' "
        "pixels and 95% of each image's; int8 only where that could be judged; else fp32); fp32 (masks "
        "identical on every machine); bf16 (openvino on the CPU, torch on CUDA); fp16 (torch on CUDA); int8 "
        "(onnxruntime or openvino, statically quantized, served unchecked; masks differ).",
    )
    cache_dir: str = Field(
        "auto",
        description="Folder for exported graphs (auto: $XDG_CACHE_HOME/segserve or ~/.cache/segserve; a temp "
        "folder when not writable).",
    )
    capture: bool = Field(
        False, description="torch on CUDA: capture CUDA graphs per input shape (torch.compile reduce-overhead)."
    )
    max_size: int = Field(
        512, ge=MIN_MAX_SIZE, description="Longest image side fed to the model; also the cap on the per-request option."
    )
    max_batch_size: int = Field(8, ge=1, description="Most images in one model batch (1 turns batching off).")
    max_batch_delay_ms: float = Field(
        5.0, ge=0, description="Longest a request waits for others to share its batch while more are on the way."
    )
    adaptive_batching: bool = Field(
        True, description="Cap each shape's batches at the size the model runs cheapest per image (measured)."
    )
    max_queue: int = Field(64, ge=1, description="Requests admitted at once; more are refused with RESOURCE_EXHAUSTED.")
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Largest encoded image accepted, in bytes.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Largest decoded image accepted, in pixels.")
    max_message_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest unary gRPC message; bigger images go through SegmentUpload."
    )
    upload_budget_bytes: int = Field(
        192 * 1024 * 1024,
        ge=1,
        description="Upload bytes held at once across all SegmentUpload calls; a chunk that would pass it ends "
        "its call with RESOURCE_EXHAUSTED.",
    )
    stream_max_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Bytes one stream (SegmentStream, ModelStreamInfer) holds at once: requests read and not yet "
        "answered plus responses not yet sent; past it the stream reads no more until its caller reads.",
    )
    stream_budget_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1,
        description="The same bytes across all streams and HTTP responses being sent; past it streams that hold "
        "something stop reading, and others' requests (and HTTP requests) are refused with RESOURCE_EXHAUSTED.",
    )
    http2_window_bytes: int = Field(
        1024 * 1024,
        ge=0,
        description="Bytes gRPC takes in for one call before the server reads them (its HTTP/2 stream window), "
        "with window auto-tuning (BDP probing) off; 0 leaves gRPC's auto-tuning, which grows it to 4 MiB or more.",
    )
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for the next chunk of an upload; a stalled upload is ended and freed."
    )
    workers: int = Field(0, ge=0, description="Threads for decoding and encoding (0: one per CPU core).")
    inference_threads: int = Field(
        0, ge=0, description="Threads the runtime uses for one model call on the CPU (0: one per CPU core)."
    )
    model_instances: int = Field(
        1,
        ge=1,
        le=64,
        description="Batches a model runs at once (Triton's instance count, OpenVINO's streams), the inference "
        "threads shared among them: more raise throughput under load, and a lone request then gets only its "
        "share of the threads (docs/performance.md). onnxruntime and openvino.",
    )
    channels_last: bool = Field(True, description="Run the model in channels_last memory format.")
    warmup: bool = Field(True, description="Run the model once per expected shape before reporting SERVING.")
    grace_period_s: float = Field(10.0, ge=0, description="Seconds in-flight requests get to finish on SIGTERM.")
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: LogFormat = Field(
        "text",
        description="text (one readable line per record) or json (one JSON object per line: time, level, logger, "
        "message, trace_id and span_id inside a traced call, and the access line's fields as fields).",
    )
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        description="Seconds before a client connection is asked to reconnect, so clients spread onto replicas "
        "added since (0: never).",
    )
    max_connection_age_grace_s: float = Field(
        30.0, ge=0, description="Seconds calls on an aged connection get to finish before it is closed."
    )
    metrics_port: int = Field(
        9464,
        ge=-1,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (0 picks a free one, -1 turns it off).",
    )
    reload: bool = Field(
        False,
        description="Development: restart the server process when a .py file of its source changes "
        "(under debugpy the debugger follows the new process).",
    )
    tls_cert: str | None = Field(
        None, description="PEM certificate chain file; with tls_key, serve TLS instead of plaintext."
    )
    tls_key: str | None = Field(None, description="PEM private key file of tls_cert.")
    tls_client_ca: str | None = Field(
        None, description="PEM CA file; when set (with TLS), callers must present a client certificate it signed."
    )

    @model_validator(mode="after")
    def _one_way_to_name_models(self) -> Settings:
        if self.model_repository and self.models:
            raise ValueError("model_repository and models are two ways to list models: set one of them")
        if self.model_control and not self.model_repository:
            raise ValueError("model_control loads models from a repository: set model_repository too")
        return self

    @model_validator(mode="after")
    def _tls_files_make_sense(self) -> Settings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs TLS: set tls_cert and tls_key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file {path}")
        return self

    def model_settings(self, **overrides: Any) -> ModelSettings:
        """The settings of a model that overrides nothing but `overrides` (ModelSettings' field names)."""
        return ModelSettings(**{name: getattr(self, name) for name in ModelSettings.model_fields} | overrides)

    @property
    def worker_threads(self) -> int:
        return self.workers or max(2, os.cpu_count() or 2)


def validation_problems(exc: ValidationError) -> str:
    """A pydantic ValidationError as one readable line: 'max_batch_size: Input should be ...; port: ...'."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "python -m server") -> argparse.ArgumentParser:
    """One flag per settings field; help shows the environment variable and the default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="segserve gRPC server. Every flag can also be set as SEGSERVE_<NAME>.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        env = "SEGSERVE_" + name.upper()
        # argparse formats help with %: a literal one (as in "99.5%") must be doubled.
        help_text = f"{field.description} [env {env}, default: {field.default}]".replace("%", "%%")
        if field.annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, metavar=name.upper(), help=help_text)
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Environment first, then flags given on the command line win."""
    parser = build_parser()
    overrides: dict[str, Any] = vars(parser.parse_args(argv))
    return Settings(**overrides)
