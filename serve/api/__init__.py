"""The HTTP layer. It never imports vLLM: it reaches the engine through ``serve.engine.base``."""
