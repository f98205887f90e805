"""Each private Dask API BitingLip uses, against the installed distributed:
an upgrade that moves one fails here, naming it, not in a job.

One in-process cluster (a thread-based worker, so the test reaches the real
Scheduler and Worker objects) with a dashboard, for the whole module."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bitinglip.platform.cluster import dask_internals as di


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, Any, Any]]:
    import dask
    from distributed import Client, LocalCluster

    # the worker lives in pytest's process, whose memory (GBs late in the suite) is not the worker's: without
    # this its memory monitor pauses it against the 1 GiB limit below, and no task runs
    no_pause = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}
    with dask.config.set(no_pause), LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0",
                      resources={"GPU": 1}, memory_limit="1GiB") as lc, Client(lc) as client:
        client.wait_for_workers(1)
        yield client, lc.scheduler, next(iter(lc.workers.values()))


def _wait(name: str) -> int:
    """A task that runs until the Dask Event ``name`` is set."""
    from distributed import Event

    Event(name).wait(30)
    return 1


def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_task_tables(cluster: tuple[Any, Any, Any]) -> None:
    client, scheduler, worker = cluster
    future = client.submit(sum, [1, 2], key="dask-internals-sum")
    assert future.result() == 3
    assert di.scheduler_holds_any(["nope", future.key], scheduler)
    assert not di.scheduler_holds_none([future.key], scheduler)
    assert di.scheduler_holds_none(["nope"], scheduler)
    assert di.worker_holds_any([future.key], worker)
    assert not di.worker_holds_any(["nope"], worker)
    assert di.scheduler_holds_each(client, [["nope"], ["nope", future.key]]) == [False, True]
    assert di.cluster_holds_any(client, [future.key])
    assert not di.cluster_holds_any(client, ["nope"])
    future.release()
    _until(lambda: di.scheduler_holds_none([future.key], scheduler))


def test_held_for_good_tells_fire_and_forget_from_a_client_wish(cluster: tuple[Any, Any, Any]) -> None:
    from distributed import Event, fire_and_forget

    client, scheduler, _ = cluster
    gate = Event("dask-internals-gate", client=client)

    held = client.submit(_wait, gate.name, key="dask-internals-held")
    forgotten = client.submit(_wait, gate.name, key="dask-internals-fire")
    fire_and_forget(forgotten)
    _until(lambda: di.scheduler_holds_any([held.key], scheduler) and di.scheduler_holds_any([forgotten.key], scheduler))
    assert client.run_on_scheduler(di.held_for_good, [forgotten.key])
    assert not client.run_on_scheduler(di.held_for_good, [held.key, forgotten.key])  # only this client wants it
    assert not client.run_on_scheduler(di.held_for_good, ["nope"])
    gate.set()
    assert held.result() == 1
    assert client.run_on_scheduler(di.held_for_good, [held.key])  # finished: done, whoever wants it


def test_worker_layout(cluster: tuple[Any, Any, Any]) -> None:
    _, _, worker = cluster
    assert di.worker_threads(worker) == 2
    assert di.worker_resources_declared(worker) == {"GPU": 1}
    assert di.worker_memory_limit(worker) == 2**30
    assert di.worker_memory_limit(object()) is None


def test_worker_table(cluster: tuple[Any, Any, Any]) -> None:
    _, scheduler, worker = cluster
    (row,) = di.worker_table(scheduler)
    assert row["address"] == worker.address and row["name"] == str(worker.name)
    assert row["resources"] == {"GPU": 1} and row["memory_limit"] == 2**30
    assert isinstance(row["memory_bytes"], int)


def test_scheduler_plugins_and_worker_plugins_from_the_scheduler(cluster: tuple[Any, Any, Any]) -> None:
    from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

    client, scheduler, worker = cluster

    class Marker(SchedulerPlugin):
        name = "dask-internals-marker"

    class Noted(WorkerPlugin):
        def setup(self, worker: Any) -> None:
            worker.dask_internals_noted = True

    client.register_plugin(Marker())
    assert any(isinstance(p, Marker) for p in di.scheduler_plugins(scheduler))

    async def register(dask_scheduler: Any) -> None:
        await di.register_worker_plugin_from_scheduler(dask_scheduler, Noted(), "dask-internals-noted")

    client.run_on_scheduler(register)
    _until(lambda: "dask-internals-noted" in worker.plugins)
    assert worker.dask_internals_noted


_three = threading.Barrier(3)


def _secede_and_meet() -> tuple[bool, bool]:
    first, second = di.secede_once(), di.secede_once()
    _three.wait(20)  # only reachable by all three if seceding gave the 2 threads back
    return first, second


def test_secede_once_gives_the_thread_back_once(cluster: tuple[Any, Any, Any]) -> None:
    client, _, _ = cluster
    futures = [client.submit(_secede_and_meet, pure=False) for _ in range(3)]
    assert [f.result(timeout=60) for f in futures] == [(True, False)] * 3
    assert di.secede_once() is False  # not a task on a worker's thread


def test_dashboard_routes_and_navigation(cluster: tuple[Any, Any, Any]) -> None:
    from tornado.web import RequestHandler

    _, scheduler, _ = cluster

    class Hello(RequestHandler):
        def get(self) -> None:
            self.write("hello")

    assert di.add_http_routes(scheduler, [(r"/dask-internals/hello", Hello)])
    base = f"http://127.0.0.1:{scheduler.http_server.port}"
    assert httpx.get(f"{base}/dask-internals/hello", timeout=10).text == "hello"

    from distributed.dashboard.scheduler import template_variables

    di.add_dashboard_page(scheduler, "dask-internals-page")
    di.add_dashboard_page(scheduler, "dask-internals-page")
    assert template_variables(scheduler)["pages"].count("dask-internals-page") == 1


def test_no_dashboard_no_routes() -> None:
    class Bare:
        pass

    assert not di.add_http_routes(Bare(), [])


def _released_after_cancel(gate: str) -> None:
    """From inside a running task, as runner.abandon_tick looks: not released at first; released once its
    client cancelled it (the test then sets the gate); says so through the event ``gate + "-seen"``."""
    from distributed import Event, get_worker

    worker = get_worker()
    key = worker.get_current_task()
    if di.task_released(worker, key):
        return
    Event(gate).wait(30)
    deadline = time.monotonic() + 10
    while not di.task_released(worker, key) and time.monotonic() < deadline:
        time.sleep(0.01)
    if di.task_released(worker, key):
        Event(gate + "-seen").set()


def test_task_released_tells_a_running_task_its_future_was_cancelled(cluster: tuple[Any, Any, Any]) -> None:
    from distributed import Event

    client, _, worker = cluster
    gate = "dask-internals-released"
    running = client.submit(_released_after_cancel, gate, key="dask-internals-released-task")
    _until(lambda: worker.state.tasks.get(running.key) is not None
           and worker.state.tasks[running.key].state == "executing")
    assert not di.task_released(worker, running.key)
    running.cancel()
    _until(lambda: di.task_released(worker, running.key))
    Event(gate, client=client).set()
    assert Event(gate + "-seen", client=client).wait(30)
    assert di.task_released(worker, "never-submitted")


def test_cancel_wanted_skips_a_known_key_nobody_wants(cluster: tuple[Any, Any, Any]) -> None:
    """A key the scheduler knows but no client wants (here: a dependency
    whose future was dropped; in a job: a fire-and-forget partition that has
    just ended) would trip the scheduler's assertion in ``Client.cancel``."""
    from distributed import Event

    client, scheduler, _ = cluster
    gate = Event("dask-internals-cancel-gate", client=client)

    first = client.submit(_wait, gate.name, key="dask-internals-cancel-first")
    second = client.submit(lambda x: x + 1, first, key="dask-internals-cancel-second")
    first_key = first.key
    del first
    _until(lambda: first_key in scheduler.tasks and not scheduler.tasks[first_key].who_wants)
    assert client.run_on_scheduler(di.cancel_wanted, [first_key, second.key, "nope"], client.id, "test") == 1
    _until(lambda: second.status == "cancelled")
    gate.set()
    assert client.submit(lambda: 7, pure=False).result(timeout=30) == 7  # the client's connection held
    assert client.run_on_scheduler(di.cancel_wanted, ["nope"], client.id, "test") == 0
