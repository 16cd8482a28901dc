"""The model-control token (SEGSERVE_CONTROL_TOKEN): what makes loading and unloading models, and reading the
repository index, not anonymous while model control is on.

As TorchServe's token authorization does, a token is made at start when none is configured and written where
the operator (and `python -m client` on the same host, as the same user) finds it; the server logs where. A
later start reuses the file's token, so clients keep working across restarts and several servers of one user
on one host share it. Compared with Triton's restricted protocol groups (a fixed header name and value), a
bearer token is the form HTTP clients, gRPC metadata and proxies already know; docs/operations.md compares them.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import tempfile
from pathlib import Path

from server.errors import Unauthenticated
from server.settings import Settings

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
SCHEME = "Bearer "
TOKEN_BYTES = 32


def default_token_file() -> Path:
    """Per user, in the system's temporary folder: where the server writes a made token and the client looks."""
    return Path(tempfile.gettempdir()) / f"segserve-{os.getuid()}" / "control-token"


def control_token(settings: Settings) -> str:
    """The configured token, or the token file's, or a new one written there (mode 0600 in a 0700 folder)."""
    if settings.control_token:
        return settings.control_token
    path = Path(settings.control_token_file) if settings.control_token_file else default_token_file()
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if token:
        log.info("model control takes the token in %s", path)
        return token
    token = secrets.token_urlsafe(TOKEN_BYTES)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    log.info("model control takes a new token, written to %s (set SEGSERVE_CONTROL_TOKEN to choose one)", path)
    return token


def check_token(expected: str, authorization: str | None) -> None:
    """Refuses (UNAUTHENTICATED) a call whose `authorization` is not 'Bearer <the token>'; compared in constant
    time, and never said why beyond what the caller sent wrong."""
    if not authorization:
        raise Unauthenticated(
            "model control takes the control token: send 'authorization: Bearer TOKEN' (SEGSERVE_CONTROL_TOKEN, "
            "or the token file the server's log names)"
        )
    presented = authorization[len(SCHEME) :] if authorization.startswith(SCHEME) else ""
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise Unauthenticated("the control token sent is not this server's")
