"""Locating, downloading and loading MNIST and other MNIST-format IDX directories.

A directory in MNIST format holds the four files ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each either plain or gzipped (``NAME.gz``).
Fashion-MNIST and KMNIST ship in the same layout.
"""
from __future__ import annotations

import http.client
import logging
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..atomic import atomic_target
from ..errors import ConfigError, DataFormatError, DatasetNotFoundError
from .base import Dataset
from .download import OFFLINE_ENV, PathArg, download_dir, is_offline, resolve_data_dir, sha256_uncompressed
# Bound here, not called as download.fetch, so a test can stub the network of this loader alone.
from .download import fetch as _fetch
from .idx import read_idx

logger = logging.getLogger(__name__)

#: Split -> (images file, labels file), without the optional ``.gz``.
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES: tuple[str, ...] = tuple(f for pair in SPLIT_FILES.values() for f in pair)

#: SHA-256 of the *uncompressed* canonical MNIST files; checked only after a download.
SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Base URLs tried in order; each serves ``NAME.gz``.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT_S = 30.0

_FIX_MNIST = "put the four MNIST IDX files (gzipped or not) in {dir}, or pass --data-dir DIR / set LEASTCONTROL_DATA"
_FIX_IDX = "put the four MNIST-format IDX files (gzipped or not) in {dir}, or pass --data-dir DIR pointing at them"


def find_idx_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """Look for the four MNIST-format files in ``directory``.

    Args:
        directory: directory to search.

    Returns:
        ``(found, missing)``: a map from base name to the file found (plain
        preferred over ``.gz``) and the list of base names not found.
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in FILE_NAMES:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            missing.append(name)
    return found, missing


def download_mnist(
    directory: Path, names: Optional[list[str]] = None, timeout: float = DOWNLOAD_TIMEOUT_S
) -> list[str]:
    """Download MNIST files into ``directory``, verifying their SHA-256 (:func:`_download_into`);
    folders created for a download that stored nothing are removed again."""
    try:
        with download_dir(directory):
            return _download_into(directory, names, timeout)
    except OSError as exc:
        return [f"cannot create {directory}: {exc}"]


def _download_into(directory: Path, names: Optional[list[str]], timeout: float) -> list[str]:
    """Download MNIST files into ``directory``, verifying their SHA-256.

    Each file goes to a temporary file in ``directory`` and is moved to
    ``NAME.gz`` only after its uncompressed content matches ``SHA256``.

    Args:
        directory: destination directory (created if needed).
        names: base names to fetch; default all four.
        timeout: per-request timeout in seconds.

    Returns:
        Messages describing what could not be fetched (empty if all succeeded).
        After a file fails on every mirror with network errors the remaining
        files are not attempted.

    Raises:
        DataFormatError: a file was downloaded but failed its checksum on
            every mirror that served it; the bad download is deleted.
    """
    names = list(FILE_NAMES if names is None else names)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [f"cannot create {directory}: {exc}"]
    failures: list[str] = []
    for name in names:
        errors: list[str] = []
        bad_checksum: list[str] = []
        for mirror in MIRRORS:
            url = f"{mirror}{name}.gz"
            try:
                with atomic_target(directory / f"{name}.gz") as tmp:
                    logger.info("downloading %s", url)
                    _fetch(url, tmp, timeout)
                    try:
                        actual = sha256_uncompressed(tmp)
                    except (OSError, EOFError, zlib.error) as exc:
                        actual = f"unreadable gzip ({exc})"
                    if actual != SHA256[name]:
                        # leaving the block by exception deletes the temp file
                        raise _ChecksumMismatch(f"{url}: sha256 {actual}, expected {SHA256[name]}")
                break
            except _ChecksumMismatch as exc:
                bad_checksum.append(str(exc))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                errors.append(f"{url}: {exc}")
        else:
            if bad_checksum:
                raise DataFormatError(
                    f"downloaded MNIST file {name} failed its checksum and was deleted: "
                    + "; ".join(bad_checksum)
                    + f". Download it by hand into {directory} or retry later."
                )
            failures.append(f"{name}: " + "; ".join(errors))
            rest = names[names.index(name) + 1 :]
            if rest:
                # every mirror failed at the network level: do not wait out the rest
                failures.append(f"not attempted: {', '.join(rest)}")
            break
    return failures


class _ChecksumMismatch(Exception):
    pass


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check one split's images and labels."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataFormatError(f"{images_path}: images must be 3-D (N, H, W), got shape {images.shape}")
    if labels.ndim != 1:
        raise DataFormatError(f"{labels_path}: labels must be 1-D (N,), got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataFormatError(f"{images_path}: contains no samples")
    if labels.dtype.kind not in "iu":
        raise DataFormatError(f"{labels_path}: labels must be integers, got {labels.dtype}")
    if labels.min() < 0:
        raise DataFormatError(f"{labels_path}: labels must be non-negative, found {labels.min()}")
    if images.dtype != np.uint8:
        if images.dtype.kind != "f":
            raise DataFormatError(f"{images_path}: images must be uint8 or float in [0, 1], got {images.dtype}")
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise DataFormatError(f"{images_path}: float images must be finite and lie in [0, 1]")
    return images, labels


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(images).unsqueeze(1)
    if images.dtype == np.uint8:
        return t.to(torch.float32).div_(255.0)
    return t.to(torch.float32)


def load_idx_directory(directory: Path, name: str, n_classes: Optional[int] = None) -> Dataset:
    """Load the four MNIST-format files from ``directory`` into a ``Dataset``.

    No checksums are checked, so any MNIST-format directory works.

    Args:
        directory: directory holding the files (plain or gzipped).
        name: name given to the returned data set.
        n_classes: number of classes; default max label + 1 over train and test.

    Returns:
        A ``Dataset`` with inputs of shape ``(1, H, W)``.

    Raises:
        DatasetNotFoundError: some of the files are missing.
        DataFormatError: a file is corrupt or the files are inconsistent.
    """
    found, missing = find_idx_files(directory)
    if missing:
        raise DatasetNotFoundError(
            f"{name} data not found: missing {', '.join(missing)} (plain or .gz) in {directory}. "
            f"Fix: {_FIX_IDX.format(dir=directory)}."
        )
    splits = {}
    for split, (img_name, lbl_name) in SPLIT_FILES.items():
        splits[split] = _read_split(found[img_name], found[lbl_name])
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataFormatError(
            f"{directory}: train images are {train_x.shape[1:]} but test images are {test_x.shape[1:]}"
        )
    max_label = int(max(train_y.max(), test_y.max()))
    if n_classes is None:
        n_classes = max_label + 1
    elif max_label >= n_classes:
        raise DataFormatError(f"{directory}: label {max_label} out of range for {n_classes} classes")
    return Dataset(
        name=name,
        train_x=_images_to_tensor(train_x),
        train_y=torch.from_numpy(train_y.astype(np.int64)),
        test_x=_images_to_tensor(test_x),
        test_y=torch.from_numpy(test_y.astype(np.int64)),
        n_classes=n_classes,
        input_shape=(1, *train_x.shape[1:]),
    )


def load_mnist(data_dir: PathArg = None, download: bool = True) -> Dataset:
    """Load MNIST, downloading the missing files if allowed.

    Args:
        data_dir: directory to use; see ``resolve_data_dir`` for the default.
        download: fetch missing files from ``MIRRORS`` (skipped when the
            environment variable ``LEASTCONTROL_OFFLINE=1``).

    Returns:
        A ``Dataset`` named "mnist": 60000/10000 samples of shape (1, 28, 28), 10 classes.

    Raises:
        DatasetNotFoundError: files are missing and could not be downloaded.
        DataFormatError: a file is corrupt, or a download failed its checksum.
    """
    directory = resolve_data_dir(data_dir, "mnist")
    _, missing = find_idx_files(directory)
    if missing:
        if not download:
            reason = "Downloading was disabled (download=False)."
        elif is_offline():
            reason = f"Downloading was skipped because {OFFLINE_ENV} is set."
        else:
            failures = download_mnist(directory, missing)
            reason = "Download failed: " + " | ".join(failures) + "." if failures else ""
        _, missing = find_idx_files(directory)
        if missing:
            raise DatasetNotFoundError(
                f"MNIST not found: missing {', '.join(missing)} (plain or .gz) in {directory}. {reason} "
                f"Fix: {_FIX_MNIST.format(dir=directory)}."
            )
    return load_idx_directory(directory, "mnist", n_classes=10)


def load_idx_dataset(data_dir: PathArg) -> Dataset:
    """Load any MNIST-format directory (Fashion-MNIST, KMNIST, ...); never downloads.

    Args:
        data_dir: the directory; required.

    Returns:
        A ``Dataset`` named "idx" with ``n_classes`` = max label + 1.

    Raises:
        ConfigError: ``data_dir`` is None.
        DatasetNotFoundError: some of the files are missing.
        DataFormatError: a file is corrupt or the files are inconsistent.
    """
    if data_dir is None:
        raise ConfigError(
            "--dataset idx needs --data-dir DIR (a directory holding the four MNIST-format IDX files)"
        )
    return load_idx_directory(Path(data_dir).expanduser(), "idx")
