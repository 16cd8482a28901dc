"""Tests of the Open Inference Protocol as a whole: Triton's perf_analyzer against both doors."""
