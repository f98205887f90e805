"""Deployments name the Dask preloads by their old module paths; those keep working."""

import importlib

import pytest


@pytest.mark.parametrize(("old", "new"), [
    ("bitinglip.platform.scheduler_setup", "bitinglip.platform.ops.scheduler_preload"),
    ("bitinglip.platform.log_setup", "bitinglip.platform.cluster.worker_log_preload"),
])
def test_old_preload_name_is_the_same_preload(old, new):
    assert importlib.import_module(old).dask_setup is importlib.import_module(new).dask_setup
