"""What every gRPC servicer of segserve does the same way: deadlines, errors to statuses, reading requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc

from server.core.pipeline import SegmentationPipeline
from server.errors import SegservError
from server.grpc.interceptor import Context

log = logging.getLogger(__name__)

T = TypeVar("T")


def call_deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def guarded(context: Context, call: Awaitable[T]) -> T:
    """Runs a call, turning SegservError into its status and anything else into INTERNAL (logged).

    The abort happens outside the except blocks on purpose: raised inside, the abort's exception would
    chain the error, whose traceback holds the failed call's frames (an upload's chunks among their
    locals) until the cyclic collector runs; that counts objects, not bytes, and refused uploads piled
    up by gigabytes."""
    try:
        return await call
    except SegservError as exc:
        code, message = exc.code, exc.message
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception:
        log.exception("unexpected error")
        code, message = grpc.StatusCode.INTERNAL, "internal error; see the server log"
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:
        # The call is gone before its answer: a caller that cancels mid-upload ends its request stream
        # as a finished one would, and the cancellation reaches this task only after.
        raise asyncio.CancelledError from None
    raise AssertionError("unreachable: abort raises")


async def read_message(context: Context) -> Any:
    """The caller's next message, or None after its last one.

    Requests are read with `context.read()`, never through gRPC's request iterator: in grpcio's aio
    server, an iterator left unfinished (a refused upload, a cancelled stream) keeps its call alive for
    good, with what gRPC had received for it; refused uploads grew the server by about 100 KB each."""
    message = await context.read()
    return None if message is grpc.aio.EOF else message  # type: ignore[attr-defined]  # EOF: not in the stubs


async def refuse_new_call(pipeline: SegmentationPipeline) -> None:
    pipeline.admit().release()  # raises the refusal a caller should hear now
