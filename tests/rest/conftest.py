"""Tests of server/rest/: the Open Inference Protocol over HTTP and POST /v1/segment.

Fixtures only; what they are built from lives in tests/helpers/."""
