"""Scheduler-side plugins: job status, metrics, the Jobs page.

The names below are the package's public API; code outside the platform imports them from here.
Modules inside the platform import each other by module path (``bitinglip.platform.ops.ops_plugin``).
"""

from bitinglip.platform.ops.ops_plugin import OpsPlugin, install
from bitinglip.platform.ops.status_plugin import RedisStatusPlugin

__all__ = ["OpsPlugin", "RedisStatusPlugin", "install"]
