"""Tests of server/core/: decoding, the batcher and its sizing, masks against the known-answer model, the byte budgets.

Fixtures only; what they are built from lives in tests/helpers/."""
