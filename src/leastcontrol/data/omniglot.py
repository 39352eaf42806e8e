"""Omniglot from its original zip archives, and the few-shot class splits built on it.

The archives (Lake et al., 2015) hold ``<archive>/<alphabet>/<characterNN>/<id>_<k>.png``:
20 drawings (105×105, 1 bit, strokes black) of every character. Any of
``images_background.zip``, ``images_evaluation.zip``,
``images_background_small1.zip`` and ``images_background_small2.zip`` is read
the same way; images are resized to ``size × size`` grey levels in [0, 1] with
strokes at 1.

The development protocol (``small_split_protocol``) meta-trains on the
characters of ``images_background_small1`` and meta-tests on the alphabets of
``images_background_small2`` that small1 does not contain (Japanese katakana,
Sanskrit, Tagalog), so no character of the test split is seen in meta-training.

>>> from leastcontrol.data.omniglot import small_split_protocol
>>> train, test = small_split_protocol("data/omniglot")        # doctest: +SKIP
>>> train.images.shape, test.images.shape                        # doctest: +SKIP
(torch.Size([136, 20, 28, 28]), torch.Size([106, 20, 28, 28]))
"""
from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..errors import DataFormatError, DatasetNotFoundError
from .download import PathArg, resolve_data_dir

ARCHIVES = ("images_background", "images_evaluation", "images_background_small1", "images_background_small2")
DRAWINGS_PER_CHARACTER = 20
_SOURCE = "https://github.com/brendenlake/omniglot (python/*.zip)"


@dataclass
class CharacterSet:
    """Drawings of a set of characters.

    Attributes:
        images: ``(C, 20, size, size)`` float, strokes at 1, background at 0.
        characters: ``C`` names ``"alphabet/characterNN"`` (the identity of a class).
    """

    images: torch.Tensor
    characters: List[str]

    def __post_init__(self):
        if self.images.shape[0] != len(self.characters):
            raise DataFormatError(f"{self.images.shape[0]} image groups for {len(self.characters)} characters")

    @property
    def alphabets(self) -> List[str]:
        return sorted({c.split("/")[0] for c in self.characters})

    def select_alphabets(self, keep: Sequence[str]) -> "CharacterSet":
        """The characters of the named alphabets only."""
        index = [i for i, c in enumerate(self.characters) if c.split("/")[0] in set(keep)]
        return CharacterSet(self.images[index], [self.characters[i] for i in index])


def archive_path(name: str, data_dir: PathArg = None) -> Path:
    """Where ``<name>.zip`` is: in ``data_dir``, else ``$LEASTCONTROL_DATA[/omniglot]``, else the user cache.

    Raises:
        DatasetNotFoundError: the archive is not there (Omniglot is never downloaded silently).
    """
    if name not in ARCHIVES:
        raise DatasetNotFoundError(f"unknown Omniglot archive '{name}'; valid: {', '.join(ARCHIVES)}")
    directory = resolve_data_dir(data_dir, "omniglot")
    path = directory / f"{name}.zip"
    if not path.is_file():
        raise DatasetNotFoundError(
            f"Omniglot archive {path.name} not found in {directory}; download it from {_SOURCE} "
            "and pass --data-dir DIR (the directory holding the zip files) or set LEASTCONTROL_DATA")
    return path


def _decode(data: bytes, size: int, member: str) -> np.ndarray:
    # Imported on first use: the CLI imports this module at startup (through meta.tasks), and
    # only reading an archive needs Pillow.
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            grey = im.convert("L")
            if grey.size != (size, size):
                grey = grey.resize((size, size), Image.Resampling.LANCZOS)
            return 1.0 - np.asarray(grey, dtype=np.float32) / 255.0
    except Exception as exc:  # PIL raises several unrelated types for a bad file
        raise DataFormatError(f"{member}: not a readable image ({exc}); the archive is corrupt, download it again")


def read_archive(path: PathArg, size: int = 28) -> CharacterSet:
    """Every character of one Omniglot zip archive, resized to ``size × size``.

    Raises:
        DatasetNotFoundError: no such file.
        DataFormatError: not a zip archive, a corrupt image, or a character without 20 drawings.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"Omniglot archive {path} not found; download it from {_SOURCE}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataFormatError(f"{path}: not a readable zip archive ({exc}); download it again from {_SOURCE}")
    groups: dict = {}
    with zf:
        for member in sorted(zf.namelist()):
            parts = member.split("/")
            if not member.endswith(".png") or len(parts) < 4:
                continue
            key = f"{parts[-3]}/{parts[-2]}"
            try:
                data = zf.read(member)
            except (zipfile.BadZipFile, OSError, zlib.error) as exc:
                raise DataFormatError(f"{path}: member {member} is corrupt ({exc}); download the archive again")
            groups.setdefault(key, []).append(_decode(data, size, member))
    if not groups:
        raise DataFormatError(f"{path}: no <alphabet>/<character>/*.png images inside; is it an Omniglot archive?")
    bad = [k for k, v in groups.items() if len(v) != DRAWINGS_PER_CHARACTER]
    if bad:
        raise DataFormatError(f"{path}: character {bad[0]} has {len(groups[bad[0]])} drawings, expected "
                              f"{DRAWINGS_PER_CHARACTER}; the archive is incomplete, download it again")
    names = sorted(groups)
    images = torch.from_numpy(np.stack([np.stack(groups[k]) for k in names]))
    return CharacterSet(images, names)


#: Meta-test alphabets of the development protocol: those of small2 absent from small1.
SMALL_TEST_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")


def small_split_protocol(data_dir: PathArg = None, size: int = 28) -> Tuple[CharacterSet, CharacterSet]:
    """Meta-train on ``images_background_small1``, meta-test on small2's alphabets not in small1.

    Returns:
        ``(train, test)`` character sets with no character in common.
    """
    train = read_archive(archive_path("images_background_small1", data_dir), size)
    small2 = read_archive(archive_path("images_background_small2", data_dir), size)
    test = small2.select_alphabets([a for a in small2.alphabets if a not in set(train.alphabets)])
    if not test.characters:
        raise DataFormatError("images_background_small2 has no alphabet absent from small1; check the archives")
    return train, test


def standard_protocol(data_dir: PathArg = None, size: int = 28) -> Tuple[CharacterSet, CharacterSet]:
    """Meta-train on ``images_background`` (30 alphabets), meta-test on ``images_evaluation`` (20 others)."""
    return (read_archive(archive_path("images_background", data_dir), size),
            read_archive(archive_path("images_evaluation", data_dir), size))


PROTOCOLS = {"small": small_split_protocol, "standard": standard_protocol}


def load_protocol(name: str = "small", data_dir: PathArg = None, size: int = 28) -> Tuple[CharacterSet, CharacterSet]:
    """A protocol by name (``small`` or ``standard``)."""
    if name not in PROTOCOLS:
        raise DatasetNotFoundError(f"unknown Omniglot protocol '{name}'; valid: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name](data_dir, size)
