"""What runs on a worker for the gateway's OpenAI-compatible online routes.

Kept beside :func:`~bitinglip.platform.jobs.runner.predict_texts` rather
than inside it: the OpenAI bodies need figures ``/v1/infer`` does not (the
tokens each input took, for ``usage``), and the generation row contract
(messages, per-row sampling options) grows here without touching the runner.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from typing import Any

from bitinglip.platform.jobs.runner import _current_worker, _on_engine, abandon_tick, predict_texts
from bitinglip.platform.jobs.vocabulary import TOKENS_TOPIC
from bitinglip.platform.tasks.builtin import get_task
from bitinglip.platform.tasks.engines.base import TextFn


def predict_counted(task_name: str, model: str, options: Mapping[str, Any], texts: list[str]) -> list[dict[str, Any]]:
    """:func:`predict_texts`'s outputs, each with ``tokens``: how many tokens
    its text took for this model (OpenAI's ``usage.prompt_tokens``)."""
    from bitinglip.platform.plugins.model_plugin import get_model_plugin

    outputs = predict_texts(task_name, model, options, texts)
    task = get_task(task_name)
    merged = task.check_options(options)
    # tokenizing again costs little beside the model, and keeps predict_texts as /v1/infer knows it
    with get_model_plugin().use(task, model, merged) as loaded:
        ids, _ = task.tokenize(loaded, texts, merged)
    return [{**out, "tokens": len(row)} for out, row in zip(outputs, ids)]


def predict_generation(task_name: str, model: str, options: Mapping[str, Any], rows: list[dict[str, Any]]
                       ) -> list[dict[str, Any]]:
    """Outputs for generation rows (``{"text"}`` or ``{"messages"}``, each
    with its own ``params``: the generation row contract), in order; the
    engine batches them with whatever else runs on this worker.  The first
    bad row fails the call (the gateway checked them; the batcher reruns a
    failed merged batch request by request).  A row with ``stream`` (an id
    the gateway chose) has its text sent on :data:`TOKENS_TOPIC` as the
    engine produces it; its output is the whole answer all the same."""
    from bitinglip.errors import EngineError, InputError
    from bitinglip.platform.plugins.model_plugin import get_model_plugin

    task = get_task(task_name)
    merged = task.check_options(options)
    checked = [task.check_row(row.get("text"), {"messages": row.get("messages"), "params": row.get("params")},
                              f"request {i}", merged) for i, row in enumerate(rows)]
    with get_model_plugin().use(task, model, merged) as loaded:
        # off the worker's thread pool while the engine works (the thread stayed held for the whole generation,
        # and another tenant's embedding queued behind it), and aborted in the engine once the caller lets go
        run = functools.partial(task.run_rows, on_text=[_sender(row.get("stream")) for row in rows])
        outputs, truncated, failed, _ = _on_engine(run, loaded, checked, merged, abandon_tick(), online=True)
    if failed:
        first = min(failed)
        # a step the engine failed is no fault of the request: a 5xx, not a 400 (run_rows names the error's type)
        error = EngineError if failed[first].startswith(f"{EngineError.__name__}:") else InputError
        raise error(f"request {first}: {failed[first]}")
    return [{**(out or {}), "truncated": cut} for out, cut in zip(outputs, truncated)]


def _sender(stream: Any) -> TextFn | None:
    """Where a streamed row's text goes: a Dask event to the gateway, through
    the scheduler (``Worker.log_event`` is thread-safe and never blocks the
    engine: the worker's event loop sends it, batched with the others of the
    moment).  ``seq`` numbers the events of one run, so the gateway can tell
    a gap or a rerun elsewhere and wait for the whole answer instead."""
    worker = _current_worker()
    if not isinstance(stream, str) or worker is None:
        return None
    seq = itertools.count()

    def send(index: int, text: str) -> None:
        worker.log_event(TOKENS_TOPIC, {"stream": stream, "index": index, "seq": next(seq), "text": text})

    return send
