"""Helpers of the model-manager tests: byte flipping, and a hub cache laid
out on disk in huggingface_hub's own format."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte in the middle of a file (its size stays the same)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out_hub_cache(cache: Path, repo_id: str, commit: str, source: Path,
                      extra: dict[str, bytes] | None = None) -> Path:
    """Write ``source``'s files into ``cache`` as the hub would after a
    download of ``repo_id`` at ``commit``: ``models--org--name/blobs/<hash>``
    (sha256 for LFS files like weights, the git blob sha1 for small ones),
    ``snapshots/<commit>/<file>`` as relative links to the blobs, and
    ``refs/main`` holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    files = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    files.update(extra or {})
    for rel, data in files.items():
        lfs = rel.endswith((".safetensors", ".bin"))
        blob = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        (repo / "blobs" / blob).write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo / "blobs" / blob, link.parent), link)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
