"""Channels with or without TLS, and the request id sent with each call."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import grpc

from client.channel import channel_options
from client.tracing import trace_metadata

REQUEST_ID_KEY = "x-request-id"


def tls_credentials(
    ca_file: str | Path | None = None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS trusting `ca_file` (None: the system's roots); `cert_file` and `key_file` for client-certificate auth."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    extra_options: list[tuple[str, object]] | None = None,
) -> grpc.Channel:
    options = [*channel_options(), *(extra_options or [])]
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def open_aio_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=channel_options())
    return grpc.aio.secure_channel(target, credentials, options=channel_options())


def request_metadata(request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """The caller's request id (a fresh one when None), which the server writes in its log line for the call,
    and the caller's current trace (W3C traceparent, client/tracing.py), which a traced server continues."""
    return ((REQUEST_ID_KEY, request_id or uuid.uuid4().hex), *trace_metadata())


def control_token(token: str | None = None) -> str | None:
    """The model-control token to send with load and unload: `token`, else SEGSERVE_CONTROL_TOKEN, else the file
    a server on this host writes for this user (SEGSERVE_CONTROL_TOKEN_FILE, or the server's default place:
    segserve-<uid>/control-token in the system's temporary folder). None when there is none."""
    if token:
        return token
    if os.environ.get("SEGSERVE_CONTROL_TOKEN"):
        return os.environ["SEGSERVE_CONTROL_TOKEN"]
    named = os.environ.get("SEGSERVE_CONTROL_TOKEN_FILE")
    path = Path(named) if named else Path(tempfile.gettempdir()) / f"segserve-{os.getuid()}" / "control-token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def control_metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer TOKEN` for a model-control call, with the request id; no token: the request id only
    (the server then answers UNAUTHENTICATED, saying where to find the token)."""
    found = control_token(token)
    return (*request_metadata(), *((("authorization", f"Bearer {found}"),) if found else ()))
