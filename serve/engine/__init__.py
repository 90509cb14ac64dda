"""The engine seam: the HTTP layer talks to an engine only through ``serve.engine.base``."""
