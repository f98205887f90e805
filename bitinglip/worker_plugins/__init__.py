"""Dask worker plugins."""

from bitinglip.worker_plugins.models import ModelPlugin, get_model_plugin

__all__ = ["ModelPlugin", "get_model_plugin"]
