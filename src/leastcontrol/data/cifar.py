"""CIFAR-10 from the standard python-pickle batches directory.

The directory (``cifar-10-batches-py``) holds ``data_batch_1`` … ``data_batch_5``
and ``test_batch``: pickled dicts with ``data`` (uint8, ``(10000, 3072)``,
channel-major 32×32 images) and ``labels``. Pickles are read with a restricted
unpickler that builds only plain containers and numpy arrays, never arbitrary
objects. When online, the official archive is downloaded once and checked
against its SHA-256 before it is unpacked.

Images come out in [0, 1]; the per-channel normalisation of the published
set-ups (:data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`) and the random-crop + flip
augmentation are applied by the training loop (see :func:`normalize`,
:func:`augment`).
"""
from __future__ import annotations

import http.client
import io
import logging
import pickle
import shutil
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..atomic import atomic_target
from ..errors import DataFormatError, DatasetNotFoundError
from .base import Dataset
from .download import OFFLINE_ENV, PathArg, download_dir, is_offline, resolve_data_dir, sha256_file
# Bound here, not called as download.fetch, so a test can stub the network of this loader alone.
from .download import fetch as _fetch

logger = logging.getLogger(__name__)

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
_FIX = ("put the CIFAR-10 python batches (data_batch_1..5, test_batch) in {dir}, or pass --data-dir DIR "
        "(the cifar-10-batches-py directory) / set LEASTCONTROL_DATA")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes and numpy arrays; refuses every other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataFormatError(f"{path}: not a readable CIFAR-10 batch ({exc}); download the data set again")
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataFormatError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels' entries, found {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or labels.size == 0 or labels.min() < 0 or labels.max() > 9:
        raise DataFormatError(f"{path}: 'labels' must be {data.shape[0]} integers in [0, 9]")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _find_batches(directory: Path) -> Optional[Path]:
    """The directory that holds the batch files: ``directory`` or its ``cifar-10-batches-py``."""
    for candidate in (directory, directory / "cifar-10-batches-py"):
        if all((candidate / name).is_file() for name in TRAIN_BATCHES + (TEST_BATCH,)):
            return candidate
    return None


def download_cifar10(directory: Path) -> str:
    """:func:`_download_into` ``directory``; folders created for a download that stored nothing are
    removed again."""
    try:
        with download_dir(directory):
            return _download_into(directory)
    except OSError as exc:
        return f"cannot create {directory}: {exc}"


def _download_into(directory: Path) -> str:
    """Download the official archive into ``directory``, check its SHA-256, unpack the batches.

    Returns:
        An empty string on success, else why it failed (network).

    Raises:
        DataFormatError: the download does not match :data:`ARCHIVE_SHA256` (it is deleted).
    """
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / "cifar-10-python.tar.gz"
    try:
        with atomic_target(archive) as tmp:
            logger.info("downloading %s", URL)
            _fetch(URL, tmp, 120.0)
            actual = sha256_file(tmp)
            if actual != ARCHIVE_SHA256:
                raise DataFormatError(f"{URL}: sha256 {actual}, expected {ARCHIVE_SHA256}; the download was "
                                      "deleted, retry later or download it by hand")
    except DataFormatError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return f"{URL}: {exc}"
    with tarfile.open(archive) as tar:
        for name in TRAIN_BATCHES + (TEST_BATCH, "batches.meta"):
            member = tar.getmember(f"cifar-10-batches-py/{name}")
            with tar.extractfile(member) as src, atomic_target(directory / name) as tmp, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return ""


def load_cifar10(data_dir: PathArg = None, download: bool = True) -> Dataset:
    """Load CIFAR-10 (50000 train / 10000 test, ``(3, 32, 32)`` in [0, 1], 10 classes).

    Looks in ``data_dir`` (or its ``cifar-10-batches-py``), else ``$LEASTCONTROL_DATA/cifar10``,
    else the user cache; downloads when allowed and online.

    Raises:
        DatasetNotFoundError: the batches are missing and could not be downloaded.
        DataFormatError: a batch is corrupt, or a download failed its checksum.
    """
    directory = resolve_data_dir(data_dir, "cifar10")
    found = _find_batches(directory)
    if found is None:
        if not download:
            reason = "Downloading was disabled (download=False)."
        elif is_offline():
            reason = f"Downloading was skipped because {OFFLINE_ENV} is set."
        else:
            failure = download_cifar10(directory)
            reason = f"Download failed: {failure}." if failure else ""
        found = _find_batches(directory)
        if found is None:
            raise DatasetNotFoundError(f"CIFAR-10 not found in {directory}. {reason} Fix: {_FIX.format(dir=directory)}.")
    train = [_read_batch(found / name) for name in TRAIN_BATCHES]
    test_x, test_y = _read_batch(found / TEST_BATCH)

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).float().div_(255.0)

    return Dataset("cifar10", images(np.concatenate([x for x, _ in train])),
                   torch.from_numpy(np.concatenate([y for _, y in train])), images(test_x),
                   torch.from_numpy(test_y), 10, (3, 32, 32))


def normalize(x: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """Per-channel ``(x − mean) / std`` of a batch ``(B, 3, H, W)``."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def augment(x: torch.Tensor, generator: Optional[torch.Generator] = None, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and random horizontal flip of a batch ``(B, C, H, W)``."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    flip = torch.rand(B, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def write_cifar_batch(path: Path, data: np.ndarray, labels) -> None:
    """Write one batch in the official format (used by tests and to build small CIFAR-format sets)."""
    buf = io.BytesIO()
    pickle.dump({b"batch_label": b"leastcontrol", b"labels": list(map(int, labels)),
                 b"data": np.ascontiguousarray(data, dtype=np.uint8).reshape(len(labels), -1)}, buf, protocol=2)
    with atomic_target(Path(path)) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
