"""Dask worker plugins."""

from bitinglip.platform.plugins.model_plugin import ModelPlugin, get_model_plugin

__all__ = ["ModelPlugin", "get_model_plugin"]
