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
from . import cifar, digits, mnist
from .base import DATASETS, Dataset, load_dataset
from .download import PathArg, resolve_data_dir
from .idx import read_idx, write_idx

__all__ = ["DATASETS", "Dataset", "load_dataset", "read_idx", "write_idx", "resolve_data_dir"]


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
