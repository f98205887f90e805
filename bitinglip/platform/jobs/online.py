"""What runs on a worker for the gateway's OpenAI-compatible online routes.

Kept beside :func:`~bitinglip.platform.jobs.runner.predict_texts` rather
than inside it: the OpenAI bodies need figures ``/v1/infer`` does not (the
tokens each input took, for ``usage``), and the generation row contract
(messages, per-row sampling options) grows here without touching the runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bitinglip.platform.jobs.runner import predict_texts
from bitinglip.platform.tasks.builtin import get_task


def predict_counted(task_name: str, model: str, options: Mapping[str, Any], texts: list[str]) -> list[dict[str, Any]]:
    """:func:`predict_texts`'s outputs, each with ``tokens``: how many tokens
    its text took for this model (OpenAI's ``usage.prompt_tokens``)."""
    from bitinglip.worker_plugins.model_plugin import get_model_plugin

    outputs = predict_texts(task_name, model, options, texts)
    task = get_task(task_name)
    merged = task.check_options(options)
    # tokenizing again costs little beside the model, and keeps predict_texts as /v1/infer knows it
    with get_model_plugin().use(task, model, merged) as loaded:
        ids, _ = task.tokenize(loaded, texts, merged)
    return [{**out, "tokens": len(row)} for out, row in zip(outputs, ids)]
