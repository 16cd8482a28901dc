"""Big JSON bodies parsed in a child process, so that parsing never holds the server's GIL for long.

`json.loads` parses a whole body in one C call that holds the GIL, and most of that time is spent making a
Python object of every number: a body of megabytes of PIXELS held it for hundreds of milliseconds, a faster
parser no less (docs/performance.md, "gRPC health while big JSON bodies are parsed"), and gRPC health, the
event loop and every other thread waited meanwhile. So the HTTP door hands a body of MIN_BYTES or more to a
child (`python -m server.rest.json_worker`: json and numpy only), which parses it and sends the message back
with each input's numeric `data` as one numpy array, the form the tensor code builds anyway; the server then
only copies arrays in.

The child never changes an answer: it runs the same `load` as the server would, so an invalid body gets the
same reason, and it leaves as lists whatever is not a plain array of numbers (ragged, mixed with strings,
integers numpy cannot hold), which the server then reads as before. A child that fails (killed, out of
memory) costs that one body an in-process parse and is started again for the next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np

log = logging.getLogger(__name__)

MIN_BYTES = 256 * 1024
"""Bodies from this size go to the child; smaller ones parse in place in well under a millisecond's GIL hold
per kilobyte, less than the round trip would cost."""
_LENGTH = struct.Struct("<Q")


def load(document: bytes) -> tuple[Any, str | None]:
    """The parsed document and None, or None and why it is not JSON (the HTTP door's 400 reason)."""
    try:
        return json.loads(document), None
    except RecursionError:
        return None, "the JSON is nested too deeply"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"the body is not valid JSON: {exc}"


def _numeric_array(data: list[Any]) -> np.ndarray | None:
    """`data` as one array when it is a rectangular nest of numbers (booleans included), else None."""
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        return None
    return array if array.dtype.kind in "biuf" else None


def with_arrays(message: Any) -> Any:
    """The message with each input's numeric `data` list made one array; anything else as it was."""
    inputs = message.get("inputs") if isinstance(message, dict) else None
    for tensor in inputs if isinstance(inputs, list) else ():
        if isinstance(tensor, dict) and isinstance(tensor.get("data"), list):
            array = _numeric_array(tensor["data"])
            if array is not None:
                tensor["data"] = array
    return message


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"the stream ended after {len(data)} of {size} bytes")
    return data


def _serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The child's loop: a length-prefixed document in, a length-prefixed pickle of load's answer out."""
    while header := requests.read(_LENGTH.size):  # empty: the server closed its end
        if len(header) != _LENGTH.size:
            raise EOFError("the stream ended inside a length")
        (size,) = _LENGTH.unpack(header)
        parsed, problem = load(_read_exactly(requests, size))
        payload = pickle.dumps((with_arrays(parsed) if problem is None else None, problem), protocol=5)
        del parsed
        answers.write(_LENGTH.pack(len(payload)))
        answers.write(payload)
        answers.flush()


class JsonWorker:
    """The server's side: one child, started on first use, one body at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None

    def parse(self, document: bytes) -> tuple[Any, str | None]:
        """What `load(document)` answers, parsed in the child (numeric data as arrays)."""
        with self._lock:
            try:
                child = self._started()
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write(_LENGTH.pack(len(document)))
                child.stdin.write(document)
                child.stdin.flush()
                (size,) = _LENGTH.unpack(_read_exactly(child.stdout, _LENGTH.size))
                answer: tuple[Any, str | None] = pickle.loads(_read_exactly(child.stdout, size))
                return answer
            except (OSError, EOFError, ValueError, pickle.UnpicklingError, struct.error) as exc:
                log.warning("the JSON worker failed (%s); this body parses in the server, the next in a new one", exc)
                self._stop()
        return load(document)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is None or self._child.poll() is not None:
            root = str(Path(__file__).resolve().parents[2])  # where `server` is, whatever the working folder
            path = os.environ.get("PYTHONPATH")
            env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
            self._child = subprocess.Popen(
                [sys.executable, "-m", "server.rest.json_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
        return self._child

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):  # a pipe to a dead child: its unsent bytes are void
                        stream.close()

    def close(self) -> None:
        """Ends the child (it also ends by itself when the server's end of its pipe closes)."""
        with self._lock:
            self._stop()


WORKER = JsonWorker()
"""The process's one worker, shared by its HTTP doors (a body at a time, as they parse one at a time)."""


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
