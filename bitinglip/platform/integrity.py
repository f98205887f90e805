"""File hashes and weight formats: what a model's files must be before they load.

A registered model carries a sha256 per file.  :class:`Verifier` checks a
model folder against them before the first load and again whenever a file's
size or mtime changes; hashing is skipped while nothing on disk moved.
Pickle-based weights can run code when loaded, so they are refused unless
an admin sets ``BITINGLIP_ALLOW_PICKLE``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bitinglip.platform.errors import IntegrityError, UnsafeWeightsError

#: the registry's own file in each version folder; never part of the model
MANIFEST_FILE = "bitinglip-manifest.json"
#: suffixes of weight files that torch.load / pickle would read
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors",)
_CHUNK = 1 << 20


def is_pickle(rel: str) -> bool:
    return rel.lower().endswith(PICKLE_SUFFIXES)


def model_files(root: str | os.PathLike[str]) -> list[str]:
    """Relative paths (``/``-separated, sorted) of a model folder's files,
    leaving out hidden entries (``.git``, ``.gitattributes``) and the manifest."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name == MANIFEST_FILE:
                continue
            found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def refuse_pickle(rels: Iterable[str], allow: bool, where: str) -> None:
    """Raise :class:`UnsafeWeightsError` naming the first pickle-based file."""
    if allow:
        return
    for rel in rels:
        if is_pickle(rel):
            raise UnsafeWeightsError(
                f"{where}: {rel!r} is a pickle-based weight file, which can run code when loaded; "
                "BitingLip loads .safetensors only (an admin may set BITINGLIP_ALLOW_PICKLE=1)")


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashed(src: Path, dst: Path) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` (following links), hashing in the same pass."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def tree_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One sha256 for a whole version: of the sorted ``sha256  path`` lines."""
    lines = "".join(f"{files[rel]['sha256']}  {rel}\n" for rel in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _stats(root: Path, rels: Iterable[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for rel in rels:
        st = os.stat(root / rel)
        out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def check_files(root: str | os.PathLike[str], expected: Mapping[str, Mapping[str, Any]],
                only: Iterable[str] | None = None) -> None:
    """Raise :class:`IntegrityError` naming the first file that is missing,
    unexpected, of the wrong size or with the wrong sha256."""
    root = Path(root)
    actual = set(model_files(root))
    for rel in sorted(set(expected) - actual):
        raise IntegrityError(f"model files at {root}: {rel!r} is missing (the manifest lists it)")
    for rel in sorted(actual - set(expected)):
        raise IntegrityError(f"model files at {root}: {rel!r} is not in the manifest (added after registration)")
    for rel in sorted(expected if only is None else only):
        want = expected[rel]
        size = os.path.getsize(root / rel)
        if size != int(want["size"]):
            raise IntegrityError(f"model files at {root}: {rel!r} has {size} bytes, the manifest says {want['size']}")
        got = sha256_file(root / rel)
        if got != want["sha256"]:
            raise IntegrityError(f"model files at {root}: {rel!r} has sha256 {got[:16]}..., "
                                 f"the manifest says {str(want['sha256'])[:16]}... (the file was changed or corrupted)")


class Verifier:
    """Remembers the size and mtime of each file it has hashed, per folder,
    and hashes again only the files whose size or mtime changed."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def ensure(self, root: str | os.PathLike[str], expected: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Check ``root`` against ``expected``; return the files hashed now
        (empty when nothing changed since the last check)."""
        key = str(root)
        try:
            stats = _stats(Path(root), model_files(root))
        except FileNotFoundError as exc:
            raise IntegrityError(f"model files at {root}: {exc.filename} vanished during the check") from None
        with self._lock:
            seen = self._seen.get(key, {})
        changed = sorted(rel for rel in stats if seen.get(rel) != stats[rel])
        if not changed and set(seen) == set(stats):
            return []
        check_files(root, expected, only=[rel for rel in changed if rel in expected])
        with self._lock:
            self._seen[key] = stats
        return changed

    def forget(self, root: str | os.PathLike[str]) -> None:
        with self._lock:
            self._seen.pop(str(root), None)
