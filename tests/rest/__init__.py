"""Tests of server/rest/: the Open Inference Protocol over HTTP and POST /v1/segment."""
