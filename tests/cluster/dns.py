"""A DNS server that stands in for cluster DNS: the headless Service's name answers its ready endpoints.

No CoreDNS can be had here (no registry, not packaged by Debian). This answers what CoreDNS would for a
headless Service, `segserve.<namespace>.svc.cluster.local`: one A record per ready address of its
Endpoints, read from the API every half second. Any other name is NXDOMAIN. Clients reach it with a
target naming the server, `dns://ADDRESS:PORT/segserve.default.svc.cluster.local:50051`, which is
what `dns:///segserve.default.svc.cluster.local:50051` is inside a cluster.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable


class EndpointsDNS:
    def __init__(self, address: str, name: str, addresses: Callable[[], list[str]], refresh_s: float = 0.5) -> None:
        self.name = name.rstrip(".").lower()
        self._addresses = addresses
        self._current: list[str] = []
        self._stop = threading.Event()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((address, 0))
        self._socket.settimeout(0.2)
        self.port = int(self._socket.getsockname()[1])
        self.address = address
        self.queries = 0
        self._threads = [
            threading.Thread(target=self._serve, daemon=True, name="endpoints-dns"),
            threading.Thread(target=self._refresh, args=(refresh_s,), daemon=True, name="endpoints-dns-refresh"),
        ]

    def target(self, port: int) -> str:
        return f"dns://{self.address}:{self.port}/{self.name}:{port}"

    def __enter__(self) -> EndpointsDNS:
        self._current = self._addresses()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._socket.close()

    def _refresh(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self._current = self._addresses()
            except Exception:  # the API busy for a moment: keep the last answer
                time.sleep(every_s)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._socket.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(query)
            if reply:
                self._socket.sendto(reply, peer)

    def _answer(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        ident, _flags, questions = struct.unpack(">HHH", query[:6])
        if questions != 1:
            return None
        labels, offset = [], 12
        while offset < len(query) and query[offset]:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode(errors="replace"))
            offset += 1 + length
        qtype, qclass = struct.unpack(">HH", query[offset + 1 : offset + 5])
        question = query[12 : offset + 5]
        name = ".".join(labels).lower()
        self.queries += 1
        if name != self.name:  # NXDOMAIN, authoritative
            return struct.pack(">HHHHHH", ident, 0x8583, 1, 0, 0, 0) + question
        records = self._current if qtype == 1 and qclass == 1 else []  # A only; AAAA: no records
        answers = b"".join(struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(address) for address in records)
        return struct.pack(">HHHHHH", ident, 0x8580, 1, len(records), 0, 0) + question + answers
