"""What callers make the server hold outside the model queue: upload bytes and unsent stream responses.

Both are counted here so /metrics can show them; the upload bytes are also bounded here (one budget
for all SegmentUpload calls), since a per-call limit alone lets dozens of slow uploads hold gigabytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import Overloaded

# The client library's chunk size: an upload starts only while the budget has room for one such chunk.
MIN_ROOM = 1024 * 1024


class UploadBudget:
    """Bytes of upload chunks held at once across all calls. Single event loop: no locking needed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def hold(self) -> UploadHold:
        return UploadHold(self)


class UploadHold:
    """One upload's share of the budget; grows chunk by chunk, given back in one go when the call ends."""

    def __init__(self, budget: UploadBudget) -> None:
        self.budget = budget
        self.held = 0

    def check_room(self) -> None:
        """Before an upload's first chunk is read: refuse at once when not even one more chunk would fit."""
        self._refuse_past(min(MIN_ROOM, self.budget.limit), "an upload")

    def add(self, size: int) -> None:
        self._refuse_past(size, f"this chunk of {size} bytes")
        self.budget.in_flight += size
        self.held += size

    def _refuse_past(self, size: int, what: str) -> None:
        budget = self.budget
        if budget.in_flight + size > budget.limit:
            raise Overloaded(
                f"server busy: uploads in progress hold {budget.in_flight} bytes and {what} would pass "
                f"SEGSERVE_UPLOAD_BUDGET_BYTES={budget.limit}; retry later or on another replica"
            )

    def release(self) -> None:
        self.budget.in_flight -= self.held
        self.held = 0

    def __enter__(self) -> UploadHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class StreamCounts:
    """SegmentStream calls open, and responses made but not yet sent (each holds a window slot)."""

    open_streams: int = 0
    unsent_responses: int = 0
