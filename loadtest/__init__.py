"""Load testing and benchmarking tools for avatar-llm-serve.

- ``python -m loadtest.bench``: async streaming benchmark of any OpenAI-compatible endpoint.
- ``python -m loadtest.compare``: our server vs vLLM's own server vs the raw engine, A/B rounds.
- ``python -m loadtest.engine``: the raw in-process AsyncLLM floor on the same workload.
- ``python -m loadtest.personas``: N persona adapters (LoRA) against the base model, one server.
- ``python -m loadtest.vllm_client``: vLLM's own benchmark client (``compare --client vllm``).
- ``loadtest/locustfile.py``: a Locust user that reports TTFT, ITL and end-to-end latency.
- ``python -m loadtest.soak``: mixed traffic for a set time, then checks that nothing leaked.
- ``python -m loadtest.voice``: voice-agent sessions, open loop: avatars served at a latency SLO.

A pure client: nothing here imports the server (``serve``).
"""

# The name our server gives its built-in demo model: the tools' default model (a client cannot
# import it from the server; tests/unit/test_docs.py checks the two agree).
DEMO_MODEL_NAME = "avatar-demo"
