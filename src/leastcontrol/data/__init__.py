"""Data sets: the ``Dataset`` container, loaders by name, and IDX file I/O.

The modules import one way, each only from those listed before it:

* ``idx``: the IDX file reader and writer;
* ``download``: data directories, the offline switch, fetching, SHA-256 digests;
* ``base``: ``Dataset``, the ``DATASETS`` registry and ``load_dataset``;
* ``digits``, ``mnist``, ``cifar``, ``omniglot``: the loaders, which never import each other;
* this ``__init__``, which registers the loaders in ``DATASETS``.

>>> from leastcontrol.data import load_dataset
>>> ds = load_dataset("digits", limit_train=100)   # doctest: +SKIP
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..config import check_choice, check_number
from ..errors import ConfigError
from . import cifar, digits, mnist
from .base import DATASETS, Dataset, load_dataset
from .download import PathArg, resolve_data_dir
from .idx import read_idx, write_idx

__all__ = ["DATASETS", "DataConfig", "Dataset", "load_dataset", "read_idx", "write_idx", "resolve_data_dir"]


# One input's shape and the number of classes of the shipped data sets whose loaders fix them:
# a training run checks its system against them before it reads any data.
_SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}


NORMALIZE = ("none", "symmetric")


@dataclass
class DataConfig:
    """The ``[data]`` section of a run.

    Args:
        name: ``digits`` (bundled 8×8 digits, offline), ``mnist``, ``idx`` (any MNIST-format
            directory), ``cifar10``.
        dir: directory of the data files (default: ``$LEASTCONTROL_DATA``, else the user cache).
        limit_train, limit_test: keep the first N samples.
        validation: hold out the last N of the (kept) training samples as a validation set, evaluated
            beside the test set (``validation_accuracy`` in the history), as the EP research code
            holds out MNIST's last 10,000 training images.
        augment: ``cifar10`` only: random crop (pad 4) and horizontal flip while training.
        normalize: ``none`` (inputs as read, in [0, 1]) or ``symmetric``: ``2x − 1``, in [−1, 1]
            (torchvision's ``Normalize(0.5, 0.5)``, as pcx feeds MNIST). ``cifar10`` is always
            normalised per channel.
    """

    name: str = "digits"
    dir: Optional[str] = None
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    augment: bool = False
    normalize: str = "none"
    validation: Optional[int] = None

    def __post_init__(self):
        DATASETS.factory(self.name)   # an unknown name raises, listing the valid ones
        check_choice("data.normalize", self.normalize, NORMALIZE)
        if self.normalize != "none" and self.name == "cifar10":
            raise ConfigError("data.normalize is for inputs in [0, 1]; cifar10 is normalised per channel already: "
                              "leave data.normalize out")
        for key in ("limit_train", "limit_test", "validation"):
            check_number(f"data.{key}", getattr(self, key), low=1, strict=False, integer=True, none_ok=True)
        if self.augment and self.name != "cifar10":
            raise ConfigError("data.augment (random crop + flip) is for cifar10 only")

    def shape(self) -> Optional[Tuple[tuple, int]]:
        """``(input_shape, n_classes)`` where the loader fixes them before reading a file, else ``None``
        (``idx`` and registered data sets: known once loaded)."""
        return _SHAPES.get(self.name)

    def load(self, limit_train: Optional[int] = None) -> Dataset:
        """The data set (``limit_train`` overrides the section's, e.g. for evaluation)."""
        data = load_dataset(self.name, self.dir, limit_train or self.limit_train, self.limit_test)
        if self.validation:
            try:
                data = data.hold_out(self.validation)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return data

    def preprocess(self, x: torch.Tensor, generator: torch.Generator | None = None, train: bool = True) -> torch.Tensor:
        """Per-batch input transform: CIFAR-10 is normalised per channel (and augmented when training)."""
        if self.name != "cifar10":
            return x.mul(2).sub_(1) if self.normalize == "symmetric" else x
        if train and self.augment:
            x = cifar.augment(x, generator)
        return cifar.normalize(x)


# Every factory takes ``(data_dir=None, download=True)``, the arguments ``load_dataset`` passes.
def _load_digits(data_dir: PathArg = None, download: bool = True) -> Dataset:
    return digits.load_digits_dataset()


def _load_mnist(data_dir: PathArg = None, download: bool = True) -> Dataset:
    return mnist.load_mnist(data_dir, download=download)


def _load_idx(data_dir: PathArg = None, download: bool = True) -> Dataset:
    return mnist.load_idx_dataset(data_dir)


def _load_cifar10(data_dir: PathArg = None, download: bool = True) -> Dataset:
    return cifar.load_cifar10(data_dir, download=download)


DATASETS.register("digits", _load_digits)
DATASETS.register("mnist", _load_mnist)
DATASETS.register("idx", _load_idx)
DATASETS.register("cifar10", _load_cifar10)
