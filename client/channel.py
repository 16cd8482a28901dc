"""Channel settings shared by the sync and asyncio clients."""

from __future__ import annotations

import json
import os

DEFAULT_TARGET = os.environ.get("SEGSERVE_TARGET", "localhost:50051")
MAX_RECEIVE_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_SEND_MESSAGE_BYTES = 64 * 1024 * 1024

# Per-call balancing over every address a target resolves to (dns:///name:port, ipv4:a:p,b:p),
# and a retry of calls that never reached a replica.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [
                {"service": "segserve.v1.Segmenter", "method": "Segment"},
                {"service": "segserve.v1.Segmenter", "method": "GetModelInfo"},
            ],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_options() -> list[tuple[str, object]]:
    return [
        # Masks and overlays of large photos exceed gRPC's 4 MiB default; the server sends at most this much.
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        # Unary requests stay under the upload threshold; this only catches a runaway caller before the network.
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
    ]
