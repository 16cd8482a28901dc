"""The client library and CLI, video included.

Fixtures only; what they are built from lives in tests/helpers/ and, for the two clients behind one
interface and the stand-in replicas, beside them (both_clients.py, standins.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.client.both_clients import KINDS, connect


@pytest.fixture(params=KINDS)
def client_kind(request: pytest.FixtureRequest) -> str:
    """ "sync" or "async": a test that takes it (or `connect_client`) runs once with each client."""
    return str(request.param)


@pytest.fixture
def connect_client(client_kind: str) -> Any:
    """`connect_client(target, **SegmentClient's keyword arguments)`: the client of this run, with SegmentClient's
    blocking calls (the async one through tests/client/both_clients.py's SyncOverAsync). Use it in `with`."""
    return lambda target, **kwargs: connect(client_kind, target, **kwargs)
