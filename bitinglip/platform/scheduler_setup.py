"""Old name of :mod:`bitinglip.platform.ops.scheduler_preload`, kept because deployments
name it (``dask scheduler --preload bitinglip.platform.scheduler_setup``)."""

from bitinglip.platform.ops.scheduler_preload import dask_setup  # noqa: F401
