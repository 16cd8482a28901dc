"""Tests of server/dataplane/: the one API under every door, directly and through each door alike."""
