"""Channel settings shared by the sync and asyncio clients."""

from __future__ import annotations

import json
import os

DEFAULT_TARGET = os.environ.get("SEGSERVE_TARGET", "localhost:50051")
MAX_RECEIVE_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_SEND_MESSAGE_BYTES = 64 * 1024 * 1024

# Per-call balancing over every address a target resolves to (dns:///name:port, ipv4:a:p,b:p), and
# a retry, on another replica, of calls that failed with UNAVAILABLE or CANCELLED before any response
# arrived (a replica that died or drained mid-call). Every Segmenter method is safe to repeat: none has
# side effects. CANCELLED because gRPC's own stop answers so for the calls it had taken in but not yet
# handed to a handler (grpc/grpc#41785, still so in grpcio 1.85): a replica that stops while callers keep
# coming sends some. Their caller did not cancel them, and gRPC never retries a call its caller cancelled.
# gRPC retries a call only until its first response arrives and while what it sent still fits
# the per-call retry buffer (RETRY_BUFFER_BYTES), so a SegmentStream that has started answering is
# never replayed. No waitForReady: with every replica down a call fails at once rather than waiting
# for its deadline. Client-side health checking: each replica's health is watched, and one that says
# NOT_SERVING (loading, or draining on SIGTERM) gets no new calls from the moment it says so; without
# it, a draining replica would keep receiving calls until its listener closed. See docs/scaling.md.
HEALTH_SERVICE = "segserve.v1.Segmenter"
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": HEALTH_SERVICE},
    "methodConfig": [
        {
            "name": [{"service": "segserve.v1.Segmenter"}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ],
}


# gRPC's default (256 KiB) would leave most photos unretried; this covers any unary Segment and
# uploads up to 8 MiB. The channel-wide cap (grpc.retry_buffer_size, 256 MiB) still bounds memory.
RETRY_BUFFER_BYTES = 8 * 1024 * 1024


def channel_options() -> list[tuple[str, object]]:
    return [
        # Masks and overlays of large photos exceed gRPC's 4 MiB default; the server sends at most this much.
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        # Unary requests stay under the upload threshold; this only catches a runaway caller before the network.
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
    ]
