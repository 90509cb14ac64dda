"""The HTTP layer. It never imports vLLM: it reaches the engine only through ``serve.engine.base``."""
