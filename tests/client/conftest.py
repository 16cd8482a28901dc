"""The client library and CLI, video included.

Fixtures only; what they are built from lives in tests/helpers/."""
