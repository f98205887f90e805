"""A failed REST job's error comes from what the scheduler passes plugins on
the move to ``erred`` (public ``SchedulerPlugin.transition`` arguments), not
from the scheduler's task table."""

from __future__ import annotations

from typing import Any

from bitinglip.platform.ops.status_plugin import ANNOTATION, RedisStatusPlugin, _error_text

JOB = "e" * 32


def _key(part: int | str) -> str:
    return f"bitinglip-{JOB}-{part}"


def test_the_first_failed_task_and_its_error_are_the_jobs() -> None:
    plugin = RedisStatusPlugin("redis://127.0.0.1:1/0", job_ttl_s=60)
    keys = [_key(0), _key(1), _key("manifest")]
    plugin.update_graph(None, annotations={ANNOTATION: {k: {"id": JOB} for k in keys}})
    plugin.transition(_key(1), "processing", "erred", stimulus_id="s", cause=_key(1),
                      exception_text="ValueError('boom')", worker="tcp://w")
    # the dependents follow without details; the job's error stays the cause's
    plugin.transition(_key("manifest"), "waiting", "erred", stimulus_id="s")
    track = plugin._jobs[JOB]
    assert track.state == "failed"
    assert track.error == f"{_key(1)}: ValueError('boom')"


def test_without_details_the_error_still_names_the_task() -> None:
    assert _error_text("k", {}) == "k: a task failed"
    assert _error_text("k", {"cause": "c", "exception_text": None}) == "c: a task failed"
    assert len(_error_text("k", {"exception_text": "x" * 5000})) == 2000


def test_the_scheduler_passes_the_cause_and_exception_text_to_plugins() -> None:
    """The contract the status plugin relies on, against the installed distributed."""
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    seen: list[tuple[str, dict[str, Any]]] = []

    class Record(SchedulerPlugin):
        name = "record-erred"

        def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
            if finish == "erred":
                seen.append((key, kwargs))

    def fail() -> None:
        raise ValueError("boom")

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc, \
            Client(lc) as client:
        lc.scheduler.add_plugin(Record())
        failing = client.submit(fail, key="failing-part", pure=False)
        after = client.submit(lambda x: x, failing, key="after-it")
        client.gather([after], errors="skip")
    first_key, details = seen[0]
    assert first_key == "failing-part"
    assert _error_text(first_key, details) == "failing-part: ValueError('boom')"
    assert [k for k, _ in seen] == ["failing-part", "after-it"]  # the cause first, then its dependents
