"""Dask worker plugins."""

from bitinglip.worker_plugins.model_plugin import ModelPlugin, get_model_plugin

__all__ = ["ModelPlugin", "get_model_plugin"]
