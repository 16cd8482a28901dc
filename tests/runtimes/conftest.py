"""Tests of server/runtimes/: the weights, each runtime's agreement with torch, auto's choice, the export cache.

Fixtures only; what they are built from lives in tests/helpers/."""
