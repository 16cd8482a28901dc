"""Whole-process scenarios: python -m server started, stopped, reloaded, debugged, soaked, scaled; the docs and the no-skips rule.

Fixtures only; what they are built from lives in tests/helpers/."""
