"""Verified downloads into a cache: SHA-256 and size pinned in code, atomic writes, clear offline errors.

The cache directory is ``$BNLAB_DATA`` if set, else ``$XDG_CACHE_HOME/bnlab``
(``~/.cache/bnlab``). A file is only ever visible in the cache under its final
name once it is complete and its digest matched: downloads go to a temporary
file in the same directory, are verified, then renamed (atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Resource", "DownloadError", "cache_dir", "fetch", "sha256_of"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One remote file: where it lives (mirrors in order), its size and SHA-256."""

    filename: str
    urls: tuple[str, ...]
    size: int
    sha256: str
    source: str = field(default="", compare=False)  # where the digest was taken from


class DownloadError(RuntimeError):
    """A resource could not be obtained or did not match its pinned digest."""


def cache_dir(subdir: str = "") -> Path:
    root = os.environ.get("BNLAB_DATA")
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "bnlab"
    return base / subdir if subdir else base


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, res: Resource) -> str | None:
    """None if ``path`` is ``res``; otherwise what is wrong with it."""
    size = path.stat().st_size
    if size != res.size:
        return f"size {size} bytes, expected {res.size}"
    digest = sha256_of(path)
    if digest != res.sha256:
        return f"SHA-256 {digest}, expected {res.sha256}"
    return None


def _manual_hint(res: Resource, target: Path) -> str:
    return (
        f"To install it by hand, download {res.urls[0]} on a machine with internet access "
        f"and copy it to {target} (expected size {res.size} bytes, SHA-256 {res.sha256}); "
        f"or set BNLAB_DATA to a directory that holds it under {target.parent.name}/{res.filename}."
    )


def fetch(res: Resource, subdir: str, *, progress=None, timeout: float = 60.0) -> Path:
    """The verified local path of ``res``, downloading it into the cache if needed.

    A cached file that fails verification is an error (never silently used or
    replaced). ``progress(done_bytes, total_bytes)`` is called while downloading.
    """
    target = cache_dir(subdir) / res.filename
    if target.exists():
        problem = _verify(target, res)
        if problem is not None:
            raise DownloadError(
                f"{target} is corrupted or not the expected file: {problem}. "
                f"Delete it to download it again. " + _manual_hint(res, target)
            )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in res.urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{res.filename}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                done = 0
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, res.size)
                out.flush()
                os.fsync(out.fileno())
            problem = _verify(tmp, res)
            if problem is not None:
                errors.append(f"{url}: downloaded file has {problem}")
                continue
            os.replace(tmp, target)  # atomic: the cache never holds a partial file
            return target
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            errors.append(f"{url}: {exc}")
        finally:
            if tmp.exists():
                tmp.unlink()
    raise DownloadError(
        f"could not download {res.filename} ({'; '.join(errors)}). " + _manual_hint(res, target)
    )
