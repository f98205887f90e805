"""The cluster manager: local cluster, TLS, process supervision, the dev stack (up/down).

The names below are the package's public API; code outside the platform imports them from here.
Modules inside the platform import each other by module path (``bitinglip.platform.cluster.local``).
"""

from bitinglip.platform.cluster.bootstrap import check_main_guard
from bitinglip.platform.cluster.dask_internals import cluster_holds_any, scheduler_holds_each
from bitinglip.platform.cluster.local import (
    check_reachable,
    cpu_count,
    gpu_count,
    local_cluster,
    worker_process_env,
    worker_resources,
)
from bitinglip.platform.cluster.processes import supervise
from bitinglip.platform.cluster.stack import DEFAULT_RUN_DIR, port_free, running_secret
from bitinglip.platform.cluster.stack import register as register_stack_commands
from bitinglip.platform.cluster.tls import (
    add_tls_arguments,
    check_address,
    dask_cli_arguments,
    security,
    settings_with_tls,
)

__all__ = ["DEFAULT_RUN_DIR", "add_tls_arguments", "check_address", "check_main_guard", "check_reachable", "cluster_holds_any", "cpu_count",
           "dask_cli_arguments", "gpu_count", "local_cluster", "port_free", "register_stack_commands", "running_secret", "scheduler_holds_each",
           "security",
           "settings_with_tls", "supervise", "worker_process_env", "worker_resources"]
