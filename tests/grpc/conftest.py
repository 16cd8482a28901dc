"""Tests of server/grpc/: every Segmenter and inference RPC over real gRPC, TLS, overload, hostile input and streams.

Fixtures only; what they are built from lives in tests/helpers/."""
