"""The scheduler preload of ``bitinglip scheduler``
(``dask scheduler --preload bitinglip.platform.ops.scheduler_preload``).

It adds the ops plugin (Jobs page, per-job metrics) and, when ``REDIS_URL``
is set, the plugin that writes job status to Redis for the gateway; both
start with the scheduler, before any client connects.
"""

from __future__ import annotations

from typing import Any

import click


@click.command()
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="json: one JSON object per log line")
def dask_setup(scheduler: Any, log_format: str | None) -> None:
    from bitinglip.platform.ops.ops_plugin import OpsPlugin
    from bitinglip.platform.ops.status_plugin import RedisStatusPlugin
    from bitinglip.settings import get_settings

    if log_format is not None:
        from bitinglip.logs import configure

        configure(log_format)
    settings = get_settings()
    scheduler.add_plugin(OpsPlugin(), idempotent=True)
    if settings.redis_url:
        plugin = RedisStatusPlugin(settings.redis_url, settings.job_ttl_s)
        scheduler.add_plugin(plugin, name=plugin.name, idempotent=True)
