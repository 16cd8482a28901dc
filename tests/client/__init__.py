"""The client library and CLI, video included."""
