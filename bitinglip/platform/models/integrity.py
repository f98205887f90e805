"""File hashes and weight formats: what a model's files must be before they load.

A registered model carries a sha256 per file.  :class:`FileVerifier` checks a
model folder against them before the first load and again whenever a file's
size or mtime changes; hashing is skipped while nothing on disk moved.
Pickle-based weights can run code when loaded, so they are refused unless
an admin sets ``BITINGLIP_ALLOW_PICKLE``.

A folder being registered holds regular files and folders only
(:func:`scan_source`): a link could pull ``/etc`` into a cache every worker
reads, and a link to ``/dev/zero`` or a FIFO would never end.  The hub cache
is the one exception: its snapshots are links into the repository's own
``blobs/``, which are followed there and nowhere else.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bitinglip.errors import IntegrityError, ModelTooLargeError, UnsafeModelFileError, UnsafeWeightsError

#: the registry's own file in each version folder; never part of the model
MANIFEST_FILE = "bitinglip-manifest.json"
#: suffixes of weight files that torch.load / pickle would read
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors",)
_CHUNK = 1 << 20
#: modes of a registered copy, whatever the source had (the umask may narrow them further):
#: nobody but the owner writes, nothing is executable, no setuid/setgid/sticky bits
FILE_MODE = 0o644
DIR_MODE = 0o755
_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"))


def is_pickle(rel: str) -> bool:
    return rel.lower().endswith(PICKLE_SUFFIXES)


def model_files(root: str | os.PathLike[str]) -> list[str]:
    """Relative paths (``/``-separated, sorted) of a model folder's files,
    leaving out hidden entries (``.git``, ``.gitattributes``) and the manifest.

    Links are listed, never walked into: a link to a folder is one entry, so
    a link dropped into a registered version shows up as an unexpected file."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        linked = [d for d in dirnames if (here / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in linked)
        for name in filenames + linked:
            if name.startswith(".") or name == MANIFEST_FILE:
                continue
            found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


@dataclass(frozen=True)
class SourceFile:
    """One file of a model folder being registered."""

    rel: str
    #: what to read: the file itself, or the hub blob its snapshot link points to
    path: Path
    size: int
    #: (st_dev, st_ino) when scanned: the copy must read this very file
    identity: tuple[int, int] = (0, 0)


def _what(mode: int) -> str:
    return next((name for test, name in _SPECIAL if test(mode)), "not a regular file")


def scan_source(root: str | os.PathLike[str], *, max_bytes: int, where: str,
                links_within: str | os.PathLike[str] | None = None) -> list[SourceFile]:
    """The files of a model folder to register, sorted by path, before any is read.

    Refuses (:class:`UnsafeModelFileError`, naming the file) a link, unless it
    resolves to a regular file inside ``links_within`` (the hub repository a
    snapshot belongs to), and any FIFO, socket or device; refuses
    (:class:`ModelTooLargeError`) files whose sizes, read with ``lstat`` or
    from the blob, add up to more than ``max_bytes``."""
    root = Path(root)
    inside = Path(os.path.realpath(links_within)) if links_within is not None else None
    found: list[SourceFile] = []
    total = 0
    pending = [root]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith(".") or entry.name == MANIFEST_FILE:  # as model_files leaves them
                    continue
                rel = Path(entry.path).relative_to(root).as_posix()
                st = entry.stat(follow_symlinks=False)
                path = Path(entry.path)
                if stat.S_ISDIR(st.st_mode):
                    pending.append(path)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    target = Path(os.path.realpath(path))
                    if inside is None or not target.is_relative_to(inside):
                        allowed = f"outside the hub repository {inside}" if inside else "in a model folder"
                        raise UnsafeModelFileError(
                            f"{where}: {rel!r} is a symbolic link (to {os.readlink(path)!r}); links are refused "
                            f"{allowed}: copy the real file into the folder instead")
                    try:
                        st = os.stat(target)
                    except FileNotFoundError:
                        raise UnsafeModelFileError(f"{where}: {rel!r} is a link to a missing file") from None
                    path = target
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeModelFileError(f"{where}: {rel!r} is {_what(st.st_mode)}; a model folder may hold "
                                               "only regular files and folders")
                total += st.st_size
                if total > max_bytes:
                    raise ModelTooLargeError(
                        f"{where}: the files add up to more than {max_bytes} bytes (BITINGLIP_MODEL_MAX_BYTES) "
                        f"by {rel!r}; nothing was copied")
                found.append(SourceFile(rel, path, st.st_size, (st.st_dev, st.st_ino)))
    return sorted(found, key=lambda f: f.rel)


def _open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a regular file for reading, or refuse: never through a link, and
    never blocking on a FIFO that was swapped in after a check."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        if os.path.islink(path):
            raise UnsafeModelFileError(f"{path} became a symbolic link; refused") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeModelFileError(f"{path} is {_what(mode)}; refused")
    return os.fdopen(fd, "rb")


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
    with _open_regular(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def make_dirs(root: Path, rel: str) -> Path:
    """``root / rel``, creating missing folders with :data:`DIR_MODE`."""
    path = root
    for part in Path(rel).parts:
        path = path / part
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
    return path


def copy_hashed(src: Path, dst: Path, limit: int, where: str = "",
                identity: tuple[int, int] | None = None) -> tuple[int, str]:
    """Copy the regular file ``src`` to the new file ``dst`` (mode
    :data:`FILE_MODE`), hashing in the same pass; refuse with
    :class:`ModelTooLargeError` once more than ``limit`` bytes come, so a
    file that grows after it was measured cannot fill the disk, and with
    :class:`UnsafeModelFileError` when ``src`` is no longer the file
    ``identity`` names (a folder on its path was swapped for a link)."""
    digest, size = hashlib.sha256(), 0
    with _open_regular(src) as fin:
        st = os.fstat(fin.fileno())
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise UnsafeModelFileError(f"{where or src}: is no longer the file that was checked (a folder on "
                                       "its path was replaced, maybe by a link); refused")
        with os.fdopen(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE), "wb") as fout:
            while chunk := fin.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ModelTooLargeError(f"{where or src}: grew past the size cap (BITINGLIP_MODEL_MAX_BYTES) "
                                             "while it was copied")
                digest.update(chunk)
                fout.write(chunk)
    return size, digest.hexdigest()


def tree_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One sha256 for a whole version: of the sorted ``sha256  path`` lines."""
    lines = "".join(f"{files[rel]['sha256']}  {rel}\n" for rel in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _stats(root: Path, rels: Iterable[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for rel in rels:
        st = os.lstat(root / rel)  # a file swapped for a link counts as changed
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
        st = os.lstat(root / rel)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"model files at {root}: {rel!r} is no longer a regular file "
                                 f"({'a symbolic link' if stat.S_ISLNK(st.st_mode) else _what(st.st_mode)})")
        size = st.st_size
        if size != int(want["size"]):
            raise IntegrityError(f"model files at {root}: {rel!r} has {size} bytes, the manifest says {want['size']}")
        got = sha256_file(root / rel)
        if got != want["sha256"]:
            raise IntegrityError(f"model files at {root}: {rel!r} has sha256 {got[:16]}..., "
                                 f"the manifest says {str(want['sha256'])[:16]}... (the file was changed or corrupted)")


class FileVerifier:
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
