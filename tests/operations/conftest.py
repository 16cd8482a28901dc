"""Tests of server/operations/: metrics, the per-call log line, the drain under SIGTERM.

Fixtures only; what they are built from lives in tests/helpers/."""
