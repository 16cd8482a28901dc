"""What a drain waits for: the calls of segserve's own services still in progress, and the last arrival.

A shutdown that stops gRPC while calls are still arriving cancels the ones gRPC has taken in but not yet
handed to a handler: the caller sees CANCELLED (grpc/grpc#41785; the GOAWAY and that cancelling are one
call, so no server can avoid it for callers that never stop). So App.stop keeps the server answering (new
calls refused with UNAVAILABLE, which clients retry elsewhere) until the admitted calls are done and
callers have stopped arriving, and only then stops gRPC; segserve's client also retries CANCELLED, for the
callers that kept arriving past MAX_LULL_WAIT_S. Health checks and reflection are
not counted: client-side health watches stay open for as long as the channel does.
"""

from __future__ import annotations

import asyncio
import time

# A drain is over once nothing of ours has arrived for this long (clients that watch health leave at once;
# the rest are refused and retry elsewhere) ...
QUIET_S = 0.25
# ... or, for callers that keep coming whatever health says, after this long past the last admitted call.
MAX_LULL_WAIT_S = 2.0
POLL_S = 0.01


class CallTracker:
    """Counts calls in progress; the interceptor reports each arrival and each end."""

    def __init__(self) -> None:
        self.active = 0
        self.last_arrival = 0.0

    def arrived(self) -> None:
        self.active += 1
        self.last_arrival = time.monotonic()

    def left(self) -> None:
        self.active -= 1

    async def settled(self, deadline: float) -> bool:
        """Waits until no call is in progress and callers have stopped arriving, or until `deadline`
        (time.monotonic()). True when settled before the deadline.

        The quiet time counts from the drain's start at the earliest: calls that reached gRPC while the
        event loop was busy are seen only once it runs again, and they must be answered, not cancelled."""
        began = time.monotonic()
        while self.active > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        lull_deadline = min(deadline, time.monotonic() + MAX_LULL_WAIT_S)
        while time.monotonic() < lull_deadline:
            if self.active == 0 and time.monotonic() - max(self.last_arrival, began) >= QUIET_S:
                return True
            await asyncio.sleep(POLL_S)
        return self.active == 0
