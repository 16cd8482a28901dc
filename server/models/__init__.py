"""Which models are served and their lifecycle: the model repository's configs and labels, the registry of
served models by name (typed against a small ServedModel protocol, so it never imports what builds them), and
loading, reloading and unloading at run time. Never imports runtimes/."""
