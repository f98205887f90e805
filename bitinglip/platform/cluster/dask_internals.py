"""Every use of Dask's private API, in one place.

Dask has no public call for what these do: a scheduler's or worker's task
table, the scheduler's clients' wishes, a worker's thread count and declared
resources, cancelling only the keys someone wants, whether a task's thread has left the worker's pool, whether a running task was released, the
scheduler's HTTP server and dashboard navigation, and registering a worker
plugin from the scheduler itself (a scheduler preload has no client).  Everything else in BitingLip uses the public API.  An
upgrade of distributed that moves one of these fails
tests/unit/test_dask_internals.py, which names the attribute, instead of a
job in production.

The functions that take ``dask_scheduler``/``dask_worker`` last can be sent
with ``Client.run_on_scheduler``/``Client.run``, which pass them that way.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

#: the client name under which the scheduler keeps ``fire_and_forget``'s wishes
FIRE_AND_FORGET = "fire-and-forget"


# --- the scheduler's and the workers' task tables
def scheduler_holds_any(keys: Iterable[Any], dask_scheduler: Any) -> bool:
    """On the scheduler: whether it knows any of ``keys``."""
    tasks = dask_scheduler.tasks
    return any(key in tasks for key in keys)


def scheduler_holds_none(keys: Iterable[Any], dask_scheduler: Any) -> bool:
    """On the scheduler: whether none of ``keys`` is known any more."""
    return not scheduler_holds_any(keys, dask_scheduler)


def worker_holds_any(keys: Iterable[Any], dask_worker: Any) -> bool:
    """On a worker: whether it holds a task (running, waiting or a result) of ``keys``."""
    tasks = dask_worker.state.tasks
    return any(key in tasks for key in keys)


def held_for_good(keys: Iterable[Any], dask_scheduler: Any) -> bool:
    """On the scheduler: every key is known and either wanted by the
    fire-and-forget client or already finished (its work is done; the
    scheduler drops that wish once a task ends)."""
    for key in keys:
        ts = dask_scheduler.tasks.get(key)
        if ts is None:
            return False
        if ts.state not in ("memory", "erred") and not any(
                cs.client_key == FIRE_AND_FORGET for cs in ts.who_wants):
            return False
    return True


def cancel_wanted(keys: Iterable[Any], client_id: str, reason: str, dask_scheduler: Any) -> int:
    """On the scheduler, in one step of its event loop: cancel those of
    ``keys`` that someone still wants, for every client (``force``), and
    return how many.  ``Client.cancel`` sends every key, and the scheduler
    asserts that each one it knows is wanted: a fire-and-forget task that
    has just finished is known but wanted by no one, and that assertion
    would stop the cancel halfway and drop the client's connection."""
    tasks = dask_scheduler.tasks
    wanted = [key for key in keys if (ts := tasks.get(key)) is not None and ts.who_wants]
    if wanted and client_id in dask_scheduler.clients:
        dask_scheduler.stimulus_cancel(wanted, client_id, True, reason, "")
    return len(wanted)


def scheduler_holds_each(client: Any, groups: list[list[Any]]) -> list[bool]:
    """For each group of keys, whether the scheduler knows any of them (one round trip)."""
    return list(client.run_on_scheduler(_holds_each, groups))


def _holds_each(groups: list[list[Any]], dask_scheduler: Any) -> list[bool]:
    return [scheduler_holds_any(keys, dask_scheduler) for keys in groups]


def cluster_holds_any(client: Any, keys: Collection[Any]) -> bool:
    """Whether the scheduler or any worker still holds a task of ``keys``:
    a worker keeps a cancelled task running until it returns, after the
    scheduler forgot it."""
    keys = list(keys)
    if client.run_on_scheduler(scheduler_holds_any, keys):
        return True
    return any(client.run(worker_holds_any, keys).values())


# --- a worker's own layout (distributed 2026.8 has no Worker.nthreads/total_resources)
def worker_threads(worker: Any) -> int:
    """The worker's task threads."""
    return int(worker.state.nthreads)


def worker_resources_declared(worker: Any) -> dict[str, float]:
    """The resources the worker was started with (``GPU``, ...), not what is free now."""
    return dict(worker.state.total_resources)


def worker_memory_limit(worker: Any) -> int | None:
    """The worker's memory limit in bytes; None where it has none."""
    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
    return int(limit) if limit else None


# --- a task's thread
def secede_once() -> bool:
    """Take the calling task's thread out of its worker's thread pool
    (``distributed.secede``: the worker starts another task) unless it is out
    already: seceding twice would remove the thread from the pool twice.
    False where the caller is not a task on a worker's pool thread."""
    from distributed import secede
    from distributed.threadpoolexecutor import thread_state

    if getattr(thread_state, "proceed", None) is not True:
        return False
    secede()
    return True


def task_released(worker: Any, key: Any) -> bool:
    """On a worker, from the thread that runs task ``key``: whether the
    scheduler has let go of it while it still runs here (its client cancelled
    or released its future: state ``cancelled``; or the worker forgot it).
    Dask cannot stop a running thread, so a long task asks this itself."""
    ts = worker.state.tasks.get(key)
    return ts is None or ts.state in ("cancelled", "released", "forgotten")


# --- the scheduler as a host for BitingLip's views
async def register_worker_plugin_from_scheduler(scheduler: Any, plugin: Any, name: str) -> None:
    """Register ``plugin`` on every worker, present and future, from the
    scheduler: a ``--preload`` has no client for ``Client.register_plugin``,
    so this calls the handler behind it directly (``comm=None``)."""
    from distributed.protocol.pickle import dumps

    await scheduler.register_worker_plugin(None, dumps(plugin), name=name, idempotent=True)


def add_http_routes(scheduler: Any, handlers: list[tuple[Any, ...]]) -> bool:
    """Serve tornado ``handlers`` on the scheduler's dashboard server;
    False where it has none (started without a dashboard)."""
    app = getattr(scheduler, "http_application", None)
    if app is None:
        return False
    app.add_handlers(r".*", handlers)
    return True


def add_dashboard_page(scheduler: Any, page: str) -> None:
    """Link ``page`` from the top bar of every dashboard page.

    Dask draws that bar from ``template_variables(scheduler)["pages"]`` of
    ``distributed.dashboard.scheduler``: memoized per scheduler and shared
    by every page it renders, so an entry added here shows on all of them."""
    try:
        from distributed.dashboard.scheduler import template_variables
    except ImportError:  # no bokeh: no dashboard to link from
        return
    pages = template_variables(scheduler)["pages"]
    if page not in pages:
        pages.append(page)  # rendered as <a href="{page}">{Page}</a>


def worker_table(scheduler: Any) -> list[dict[str, Any]]:
    """The scheduler's workers by address: name, declared resources,
    process memory and memory limit in bytes."""
    return [{"address": address, "name": str(ws.name), "resources": dict(ws.resources or {}),
             "memory_bytes": int(ws.memory.process), "memory_limit": int(ws.memory_limit or 0)}
            for address, ws in sorted(scheduler.workers.items())]


def scheduler_plugins(scheduler: Any) -> list[Any]:
    """The scheduler plugins running on ``scheduler``."""
    return list(scheduler.plugins.values())
