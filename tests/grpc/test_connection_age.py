"""The max connection age reaches gRPC's server options; 0 turns it off."""

from __future__ import annotations

from server.app import server_options
from tests.helpers.servers import make_settings


def test_connection_age_becomes_grpc_options() -> None:
    options = dict(server_options(make_settings(max_connection_age_s=2.5, max_connection_age_grace_s=0.5)))
    assert options["grpc.max_connection_age_ms"] == 2500
    assert options["grpc.max_connection_age_grace_ms"] == 500


def test_zero_age_means_connections_live_forever() -> None:
    options = dict(server_options(make_settings(max_connection_age_s=0)))
    assert "grpc.max_connection_age_ms" not in options and "grpc.max_connection_age_grace_ms" not in options
