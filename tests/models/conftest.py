"""Tests of server/models/: repository configs, several models in one server, loading and unloading at run time.

Fixtures only; what they are built from lives in tests/helpers/."""
