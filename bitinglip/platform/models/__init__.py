"""The model manager: names, registry, sources, integrity, access log, residency.

The names below are the package's public API; code outside the platform imports them from here.
Modules inside the platform import each other by module path (``bitinglip.platform.models.registry``).
"""

from bitinglip.platform.models.names import PACKAGED_MODELS, ModelRef, catalogue, resolve_listed, resolve_model
from bitinglip.platform.models.registry import Manifest, Registry, is_ref, parse_ref
from bitinglip.platform.models.registry_cli import register as register_model_commands

__all__ = ["PACKAGED_MODELS", "Manifest", "ModelRef", "Registry", "catalogue", "is_ref", "parse_ref",
           "register_model_commands", "resolve_listed", "resolve_model"]
