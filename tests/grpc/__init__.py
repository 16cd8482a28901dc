"""Tests of server/grpc/: every Segmenter and inference RPC over real gRPC, TLS, overload, hostile input and streams."""
