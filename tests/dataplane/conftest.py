"""Fixtures only; what they are built from lives in tests/helpers/."""
