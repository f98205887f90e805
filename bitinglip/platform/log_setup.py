"""Old name of :mod:`bitinglip.platform.cluster.worker_log_preload`, kept because deployments
name it (``DASK_DISTRIBUTED__WORKER__PRELOAD: "['bitinglip.platform.log_setup']"``)."""

from bitinglip.platform.cluster.worker_log_preload import dask_setup  # noqa: F401
