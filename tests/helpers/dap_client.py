"""A small Debug Adapter Protocol client over TCP, the way VS Code talks to debugpy.

Messages are JSON bodies behind a Content-Length header. Requests get responses matched by
request_seq; events and responses arrive in any order, so a reader thread sorts them into a queue.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any


class DAPError(AssertionError):
    pass


class DAPClient:
    def __init__(self, host: str, port: int, connect_timeout: float = 30.0) -> None:
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=2.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.sock.settimeout(None)
        self._file = self.sock.makefile("rb")
        self._seq = 0
        self._lock = threading.Lock()
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._seen: list[dict[str, Any]] = []  # read but not yet asked for
        self.log: list[dict[str, Any]] = []  # every message, for failure reports
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="dap-reader")
        self._reader.start()

    def _read_loop(self) -> None:
        try:
            while True:
                length = None
                while True:
                    line = self._file.readline()
                    if not line:
                        return
                    line = line.strip()
                    if not line:
                        break
                    name, _, value = line.decode("ascii").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length is None:
                    raise DAPError("DAP message without Content-Length")
                message = json.loads(self._file.read(length))
                self.log.append(message)
                self._messages.put(message)
        except (OSError, ValueError):
            return
        finally:
            self._messages.put(None)

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> int:
        """Sends a request and returns its seq, without waiting for the response."""
        with self._lock:
            self._seq += 1
            message: dict[str, Any] = {"seq": self._seq, "type": "request", "command": command}
            if arguments is not None:
                message["arguments"] = arguments
            body = json.dumps(message).encode()
            self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            return self._seq

    def _wait_for(self, match: Any, what: str, timeout: float) -> dict[str, Any]:
        for i, message in enumerate(self._seen):
            if match(message):
                return self._seen.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DAPError(f"no {what} within {timeout:.0f}s; messages so far: {self._summary()}")
            try:
                message = self._messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if message is None:
                raise DAPError(f"connection closed while waiting for {what}; messages: {self._summary()}")
            if match(message):
                return message
            self._seen.append(message)

    def _summary(self) -> str:
        return ", ".join(str(m.get("event") or m.get("command")) for m in self.log[-30:])

    def response(self, seq: int, timeout: float = 30.0) -> dict[str, Any]:
        message = self._wait_for(
            lambda m: m.get("type") == "response" and m.get("request_seq") == seq, f"response to #{seq}", timeout
        )
        if not message.get("success"):
            raise DAPError(f"{message.get('command')} failed: {message.get('message')} {message.get('body')}")
        return message.get("body") or {}

    def request(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return self.response(self.send(command, arguments), timeout)

    def event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        message = self._wait_for(
            lambda m: m.get("type") == "event" and m.get("event") == name, f"{name!r} event", timeout
        )
        return message.get("body") or {}

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(5)


def attach_like_vscode(
    dap: DAPClient, arguments: dict[str, Any], breakpoints: dict[str, list[int]], timeout: float = 60
) -> list[dict[str, Any]]:
    """What VS Code does for an attach configuration: the breakpoints go in before configurationDone.

    Returns the breakpoints as the debugger answered them (`verified` and the line it settled on)."""
    dap.request(
        "initialize",
        {
            "clientID": "pytest",
            "adapterID": "debugpy",
            "pathFormat": "path",
            "linesStartAt1": True,
            "columnsStartAt1": True,
        },
    )
    attaching = dap.send("attach", arguments)
    dap.event("initialized", timeout=timeout)
    answered: list[dict[str, Any]] = []
    for path, lines in breakpoints.items():
        arguments = {"source": {"path": path}, "breakpoints": [{"line": n} for n in lines]}
        answered += dap.request("setBreakpoints", arguments)["breakpoints"]
    dap.request("configurationDone")
    dap.response(attaching, timeout=timeout)
    return answered


@dataclass
class ChildSession:
    dap: DAPClient
    configuration: dict[str, Any]
    breakpoints: list[dict[str, Any]]


def attach_to_subprocess(
    parent: DAPClient, breakpoints: dict[str, list[int]], host: str = "127.0.0.1", timeout: float = 120
) -> ChildSession:
    """VS Code's answer to debugpy's `debugpyAttach` event (a new child process): a second session to the
    adapter, attached with the event's body as the configuration."""
    body = parent.event("debugpyAttach", timeout=timeout)
    child = DAPClient(host, int(body["connect"]["port"]), connect_timeout=30)
    return ChildSession(child, body, attach_like_vscode(child, body, breakpoints))
