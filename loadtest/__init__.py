"""Load testing and benchmarking tools for avatar-llm-serve.

- ``python -m loadtest.bench``: async streaming benchmark of any OpenAI-compatible endpoint.
- ``python -m loadtest.compare``: our server vs vLLM's own server vs the raw engine, A/B rounds.
- ``python -m loadtest.engine``: the raw in-process AsyncLLM floor on the same workload.
- ``loadtest/locustfile.py``: a Locust user that reports TTFT, ITL and end-to-end latency.
"""
