"""Tests of the Open Inference Protocol as a whole: Triton's perf_analyzer against both doors.

Fixtures only; what they are built from lives in tests/helpers/."""
