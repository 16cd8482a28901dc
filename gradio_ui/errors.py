"""Failed calls as sentences a person can act on: the page shows these, never a traceback."""

from __future__ import annotations

import grpc

from client import SegmentError


def describe_error(error: SegmentError, target: str, *, reachable: bool = False, name: str = "") -> str:
    """One readable sentence for a failed call. `reachable`: the server answered a health check."""
    code, message = error.code, error.message
    subject = f"“{name}”" if name else "That file"
    if code == grpc.StatusCode.UNAVAILABLE:
        if reachable:
            return f"The server at {target} is up but not ready ({message}); try again in a few seconds."
        return f"Cannot reach the segmentation server at {target} — is it running?"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if message.startswith(("max_size", "overlay_opacity")):
            return f"The server refused the options: {message}"
        return f"{subject} is not an image we can read: {message}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "busy" in message:
            return f"The server is busy: {message}. Try again in a moment."
        return f"Image too large: {message}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"The server at {target} took too long to answer ({message})."
    return f"The server at {target} failed: {code.name}: {message}"
