"""avatar-llm-serve: an OpenAI-compatible, first-token-first front end on vLLM's async engine."""

__version__ = "0.1.0"
