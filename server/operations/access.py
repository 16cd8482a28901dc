"""The per-call access record and its log line, for every door: which images a call answered, with their
sizes, batches and stage times, then its metrics and one structured log line when it ends.

A door opens a call's record (the gRPC interceptor, or the HTTP app with start_record); what only the
handler knows reaches it through note_image, which writes to the current call's record through a
context variable. Transport-free: the statuses are names ("OK", "UNAVAILABLE"), whatever the protocol.
"""

from __future__ import annotations

import json
import logging
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field

from server.core.types import SegmentResult
from server.operations.logs import FIELDS
from server.operations.metrics import Metrics

log = logging.getLogger("segserve.access")

REQUEST_ID_KEY = "x-request-id"
SINGLE_IMAGE_METHODS = ("Segment", "SegmentUpload", "http Segment")
STREAM_METHODS = ("SegmentStream", "ModelStreamInfer")


@dataclass
class ImageNote:
    image_id: str
    width: int = 0
    height: int = 0
    batch_size: int = 0
    code: str = "OK"
    stages_ms: dict[str, float] = field(default_factory=dict)
    model: str = ""
    """The model that answered (empty when the image was refused before a model was found)."""


@dataclass
class CallRecord:
    request_id: str
    images: list[ImageNote] = field(default_factory=list)


_current: ContextVar[CallRecord | None] = ContextVar("segserve_call", default=None)


def current_request_id() -> str:
    record = _current.get()
    return record.request_id if record else ""


def note_image(note: ImageNote) -> None:
    """Called by the servicer for each image answered (or failed inside a stream)."""
    record = _current.get()
    if record is not None:
        record.images.append(note)


def note_result(request_id: str, result: SegmentResult) -> None:
    """An image answered, with its size, batch and stage times."""
    t = result.timing
    stages = {
        "preprocess": t.preprocess_ms,
        "queue": t.queue_ms,
        "inference": t.inference_ms,
        "postprocess": t.postprocess_ms,
    }
    note_image(ImageNote(request_id, result.width, result.height, t.batch_size, "OK", stages, result.model))


def record_call(
    metrics: Metrics, protocol: str, method: str, code: str, elapsed: float, record: CallRecord, logged: bool
) -> None:
    """A finished call into the metrics, and (when `logged`) its one log line; for every protocol."""
    m = metrics
    m.requests.labels(method, code).inc()
    m.protocol_requests.labels(protocol, code).inc()
    m.latency.labels(method).observe(elapsed)
    images = record.images
    if not images and method in SINGLE_IMAGE_METHODS:
        m.images.labels(code).inc()  # refused before the servicer could note it
    for note in images:
        m.images.labels(note.code).inc()
        if note.model:
            m.model_images.labels(note.model, note.code).inc()
        for stage, ms in note.stages_ms.items():
            m.stage.labels(stage).observe(ms / 1000)
    if not logged:
        return  # health checks and reflection: counted, not logged
    line: dict[str, object] = {"request_id": record.request_id, "protocol": protocol, "method": method}
    if len(images) == 1 and method not in STREAM_METHODS:
        note = images[0]
        line.update(image_id=note.image_id[:128], width=note.width, height=note.height, batch_size=note.batch_size)
        if note.model:
            line.update(model=note.model)
    elif images:
        line.update(images=len(images), failed_images=sum(n.code != "OK" for n in images))
        models = sorted({n.model for n in images if n.model})
        if models:
            line.update(models=models)
    line.update(ms=round(elapsed * 1000, 1), status=code)
    # Text: the fields as one JSON string; SEGSERVE_LOG_FORMAT=json: the fields of the line itself (logs.py).
    fields = {"message": f"{method} {code}", **line}
    log.info("%s", json.dumps(line), extra={FIELDS: fields})


def start_record(request_id: str) -> CallRecord:
    """A call's record, current for note_image in this task; `request_id` empty: one is made up."""
    record = CallRecord(request_id[:128] if request_id else uuid.uuid4().hex)
    _current.set(record)
    return record
