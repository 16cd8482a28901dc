"""Tests of server/operations/: metrics, the per-call log line, the drain under SIGTERM."""
