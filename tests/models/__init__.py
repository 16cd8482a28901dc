"""Tests of server/models/: repository configs, several models in one server, loading and unloading at run time."""
