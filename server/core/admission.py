"""The admission bound: SEGSERVE_MAX_QUEUE places shared by every door and every model.

A place is taken before a request's bytes are read and given back only once its answer is no longer the
server's to keep, so the bound counts every image the server holds, whatever model or protocol it came by.
"""

from __future__ import annotations

from server.errors import Overloaded


class Admission:
    """Counts the places taken; refuses past `limit` with RESOURCE_EXHAUSTED and the figures."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> AdmissionSlot:
        if self.taken >= self.limit:
            raise Overloaded(f"server busy: {self.taken} requests in progress (SEGSERVE_MAX_QUEUE={self.limit})")
        self.taken += 1
        return AdmissionSlot(self)


class AdmissionSlot:
    """One of SEGSERVE_MAX_QUEUE places. Held from admission until the answer is no longer the server's
    to keep: a unary answer returned, an upload's whole life (from its first chunk), a stream item
    until its response is sent. So the queue limit bounds every image the server holds, all models together."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.taken -= 1
            self._admission = None

    def __enter__(self) -> AdmissionSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
