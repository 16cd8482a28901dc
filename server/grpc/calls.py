"""What every gRPC servicer of segserve does the same way: deadlines, errors to statuses, reading requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from server.errors import InvalidRequest, SegservError, without_server_paths
from server.grpc.interceptor import Context

log = logging.getLogger(__name__)

T = TypeVar("T")


def call_deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, SegservError):
        return error.code, without_server_paths(error.message)
    log.error("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> None:
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:
        # The call is gone before its answer: a caller that cancels mid-upload ends its request stream
        # as a finished one would, and the cancellation reaches this task only after.
        raise asyncio.CancelledError from None
    raise AssertionError("unreachable: abort raises")


async def guarded(context: Context, call: Awaitable[T]) -> T:
    """Runs a call, turning SegservError into its status and anything else into INTERNAL (logged).

    The abort happens outside the except blocks on purpose: raised inside, the abort's exception would
    chain the error, whose traceback holds the failed call's frames (an upload's chunks among their
    locals) until the cyclic collector runs; that counts objects, not bytes, and refused uploads piled
    up by gigabytes."""
    try:
        return await call
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:
        code, message = _status_of(exc)
    await _abort(context, code, message)
    raise AssertionError("unreachable: abort raises")


async def at_once(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)`, a call that answers at once (a data-plane lookup), as an awaitable for `guarded`, which
    answers its refusals with their status."""
    return function(*args)


async def guarded_stream(
    context: Context, open_stream: Callable[[], AsyncGenerator[T, None]]
) -> AsyncGenerator[T, None]:
    """A response stream of the data plane's, its answers passed on; what ends it with an error (a refusal
    before the first answer, a request side that failed) becomes the call's status, as in `guarded`. The
    stream is closed here however the call ends, so its places go back at once."""
    stream: AsyncGenerator[T, None] | None = None
    try:
        stream = open_stream()
        async for answer in stream:
            yield answer
        return
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:
        code, message = _status_of(exc)
    finally:
        if stream is not None:
            await stream.aclose()
    await _abort(context, code, message)


def authorization(context: Context) -> str | None:
    """The caller's `authorization` metadata (the model-control token), None when it sent none."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


async def read_message(context: Context) -> Any:
    """The caller's next message, or None after its last one.

    Requests are read with `context.read()`, never through gRPC's request iterator: in grpcio's aio
    server, an iterator left unfinished (a refused upload, a cancelled stream) keeps its call alive for
    good, with what gRPC had received for it, so every refused upload grew the server for good
    (docs/operations.md, 'Where a stalled stream's memory went')."""
    try:
        message = await context.read()
    except DecodeError as exc:  # bytes that are no message of the call's type: the caller's error, said once
        raise InvalidRequest(f"a request could not be parsed: {exc}") from None
    return None if message is grpc.aio.EOF else message  # type: ignore[attr-defined]  # EOF: not in the stubs
