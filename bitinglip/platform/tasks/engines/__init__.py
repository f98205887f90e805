"""Generation engines: one long-lived engine per worker and model, fed by
every partition running there (continuous batching across partitions and
jobs).  ``base`` is the interface and the shapes of requests and results;
``vllm_engine`` runs vLLM in the worker's own process; ``hf_engine`` runs
transformers' continuous batching where vLLM is not installed or does not
support the model.  Neither engine module is imported here: each imports its
library when an engine starts."""

from bitinglip.platform.tasks.engines.base import Engine, GenRequest, GenResult, TickFn

__all__ = ["Engine", "GenRequest", "GenResult", "TickFn"]
