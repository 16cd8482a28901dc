"""The server's log lines: the text it always wrote, or one JSON object per line (SEGSERVE_LOG_FORMAT=json) that
a log pipeline reads without a parser.

A JSON line holds time (UTC, ISO 8601 with milliseconds), level, logger and message; trace_id and span_id when
the line was written inside a span (W3C hex, as a trace backend shows them); exception with the traceback when
there is one; and the fields a record carries under FIELDS (the access line's request_id, method, status, ms...)
as fields of its own, never as a JSON string inside the message.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

from opentelemetry import trace

from server.settings import LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = "segserve_fields"
"""The attribute (logging's `extra`) holding a record's structured fields; its "message", when there is one,
is the JSON line's message instead of the text line's."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = trace.format_trace_id(context.trace_id)
            line["span_id"] = trace.format_span_id(context.span_id)
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            line["message"] = fields.get("message", line["message"])
            for key, value in fields.items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """The root logger on stderr in `log_format`; warnings.warn's messages go through it too in JSON, so that
    every line of the server's stderr is one object."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
