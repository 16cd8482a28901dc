"""Files derived from the model (exported graphs), cached on disk and never trusted blindly.

Each file's name carries a hash of its key (model, weights fingerprint, library versions, export code
version...), so a change of any of them misses the cache instead of loading a stale file. Beside it, a
JSON record holds the key and the file's sha256; a file whose record is missing, or whose bytes no
longer match, is rebuilt. Builds write to a temporary name and are renamed into place, under a lock
file, so servers starting together build once and never read a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "segserve"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def resolve_cache_root(setting: str) -> Path:
    """The configured folder ("auto": XDG_CACHE_HOME/segserve or ~/.cache/segserve); a temp folder if not writable."""
    root = default_cache_root() if setting == "auto" else Path(os.path.expanduser(setting))
    if _writable_dir(root):
        return root
    fallback = Path(tempfile.gettempdir()) / f"segserve-cache-{os.getuid()}"
    log.warning("cache folder %s is not writable; exported graphs go to %s (rebuilt after a reboot)", root, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def source_sha256(path: str) -> str:
    """A hash of a source file, for keys: an edit to the code that makes a file never reuses the old file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def key_digest(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def is_valid(path: Path, key: dict[str, str]) -> bool:
    """True when the file exists, its record names this key, and its bytes hash to what was recorded."""
    try:
        record = json.loads(_record_path(path).read_text())
        return bool(
            record.get("key") == key
            and path.stat().st_size == record.get("bytes")
            and file_sha256(path) == record.get("sha256")
        )
    except (OSError, ValueError, AttributeError):
        return False


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cached_file(
    root: Path, stem: str, suffix: str, key: dict[str, str], build: Callable[[Path], None], *, rebuild: bool = False
) -> Path:
    """The path of a verified file for `key`; `build(tmp_path)` writes it when missing, stale or corrupt.

    `rebuild=True` throws away a file that verified but could not be used (its consumer failed to load it).
    """
    path = root / f"{stem}-{key_digest(key)}{suffix}"
    if not rebuild and is_valid(path, key):
        log.info("using cached %s", path)
        return path
    with _locked(root / f".{path.name}.lock"):
        if not rebuild and is_valid(path, key):  # another process built it while this one waited
            return path
        if path.exists():
            log.warning("cached %s is corrupt or unusable; rebuilding it", path)
        started = time.monotonic()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.building")
        try:
            build(tmp)
            record = {"key": key, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
            # The record goes first: a reader between the two renames sees a mismatch and rebuilds, never trusts.
            _write_atomically(_record_path(path), json.dumps(record, indent=1).encode())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("built %s in %.1f s", path, time.monotonic() - started)
    return path
