"""What the loaders share: where data live, the offline switch, fetching and SHA-256 digests.

Data directories are resolved by :func:`resolve_data_dir`
(``$LEASTCONTROL_DATA``, else the user cache); setting ``LEASTCONTROL_OFFLINE=1``
makes the loaders skip every download (:func:`is_offline`). :func:`fetch` is the
only network access of the package; the loaders check what it brings against
their published SHA-256 (:func:`sha256_file`, :func:`sha256_uncompressed`)
before they keep it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import urllib.request
import zlib
from pathlib import Path
from typing import Iterator, Optional, Union

from ..paths import user_cache_dir
from .idx import is_gzip_bytes

#: A directory argument: a path, or None for the default.
PathArg = Optional[Union[str, "os.PathLike[str]"]]

DATA_ENV = "LEASTCONTROL_DATA"
OFFLINE_ENV = "LEASTCONTROL_OFFLINE"


def resolve_data_dir(data_dir: PathArg = None, dataset_name: str = "mnist") -> Path:
    """Decide which directory holds (or will hold) a data set's files.

    Order: the explicit ``data_dir``; else ``$LEASTCONTROL_DATA/<name>`` if that
    subdirectory exists, else ``$LEASTCONTROL_DATA``; else the user cache
    ``$XDG_CACHE_HOME/leastcontrol/<name>`` or ``~/.cache/leastcontrol/<name>``.

    Args:
        data_dir: explicit directory, or None.
        dataset_name: data-set name used for subdirectories.

    Returns:
        The resolved directory (it may not exist yet).
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        sub = root / dataset_name
        return sub if sub.is_dir() else root
    return user_cache_dir(dataset_name)


def is_offline() -> bool:
    """True when ``$LEASTCONTROL_OFFLINE`` is 1, true, yes or on: the loaders must not download."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@contextlib.contextmanager
def download_dir(directory: Path) -> Iterator[Path]:
    """``directory`` created (with missing parents) for a download; the folders this created are
    removed again at the end if they are still empty, so a failed download into a mistyped path
    leaves nothing behind.

    Raises:
        OSError: the directory cannot be created.
    """
    created = []
    folder = directory
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield directory
    finally:
        for folder in created:   # deepest first; a folder that holds anything stays, and so do its parents
            try:
                folder.rmdir()
            except OSError:
                break


def fetch(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` (the only network access in this package)."""
    request = urllib.request.Request(url, headers={"User-Agent": "leastcontrol"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f, 1 << 20)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes as they are."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_uncompressed(path: Path) -> str:
    """SHA-256 of a file's content after gunzipping it (if it is gzipped)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        gz = is_gzip_bytes(f.read(2))
        f.seek(0)
        if not gz:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            return digest.hexdigest()
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(inflater.decompress(chunk))
        digest.update(inflater.flush())
        if not inflater.eof:
            raise zlib.error("truncated gzip stream")
    return digest.hexdigest()
