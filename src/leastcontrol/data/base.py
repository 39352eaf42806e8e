"""The in-memory ``Dataset`` container, the data-set registry and ``load_dataset``.

The loaders are registered in ``DATASETS`` by the package's ``__init__``, so this
module imports none of them.
"""
from __future__ import annotations

import math
import numbers
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..registry import Registry
from .download import PathArg


@dataclass
class Dataset:
    """A classification data set held in memory as tensors.

    Attributes:
        name: registry name of the data set.
        train_x: float32 inputs of shape ``(N, *input_shape)``, values in [0, 1].
        train_y: int64 class labels of shape ``(N,)``.
        test_x: float32 test inputs of shape ``(M, *input_shape)``.
        test_y: int64 test labels of shape ``(M,)``.
        n_classes: number of classes; labels lie in ``[0, n_classes)``.
        input_shape: shape of one input, e.g. ``(1, 28, 28)``.
        val_x, val_y: a validation set held out of the training set (:meth:`hold_out`), or ``None``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    input_shape: tuple
    val_x: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if y.ndim != 1:
                raise ValueError(f"{self.name}: {split}_y must be 1-D, got shape {tuple(y.shape)}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: {split}_x has {x.shape[0]} samples but {split}_y has {y.shape[0]}"
                )
            if tuple(x.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"{self.name}: {split}_x has sample shape {tuple(x.shape[1:])}, "
                    f"expected input_shape {self.input_shape}"
                )

    @property
    def n_features(self) -> int:
        """Number of input features, the product of ``input_shape``."""
        return math.prod(self.input_shape)

    def summary(self) -> str:
        """One line describing the data set: name, split sizes, input shape, classes."""
        shape = "x".join(str(d) for d in self.input_shape)
        held = "" if self.val_y is None else f" / {len(self.val_y)} validation"
        return (
            f"{self.name}: {len(self.train_y)} train{held} / {len(self.test_y)} test, "
            f"input {shape} ({self.n_features} features), {self.n_classes} classes"
        )

    def hold_out(self, n: int) -> "Dataset":
        """The data set with the last ``n`` training samples held out as its validation set.

        Raises:
            ValueError: ``n`` leaves no training sample.
        """
        if not 0 < n < len(self.train_y):
            raise ValueError(f"{self.name}: a validation set of {n} samples leaves no training sample out of "
                             f"{len(self.train_y)}; hold out fewer (data.validation)")
        k = len(self.train_y) - n
        return dataclasses.replace(self, train_x=self.train_x[:k], train_y=self.train_y[:k],
                                   val_x=self.train_x[k:], val_y=self.train_y[k:])


#: Data-set loaders by name. Each factory takes ``(data_dir=None, download=True)``.
DATASETS: Registry[Dataset] = Registry("dataset")


def _check_limit(name: str, value: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _head(t: torch.Tensor, n: Optional[int]) -> torch.Tensor:
    if n is None or n >= t.shape[0]:
        return t
    # clone so the unused remainder of the full tensor can be freed
    return t[:n].clone()


def load_dataset(
    name: str,
    data_dir: PathArg = None,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    download: bool = True,
) -> Dataset:
    """Load a registered data set.

    Args:
        name: one of ``DATASETS.names()`` ("cifar10", "digits", "idx", "mnist").
        data_dir: directory holding the data files (see ``resolve_data_dir``);
            required for "idx", ignored for "digits".
        limit_train: keep only the first N training samples.
        limit_test: keep only the first N test samples.
        download: allow "mnist" to download missing files.

    Returns:
        The loaded ``Dataset``.

    Raises:
        ValueError: unknown name, or a limit that is not a positive integer.
        ConfigError: "idx" without ``data_dir``.
        DatasetNotFoundError: the data files are missing and could not be downloaded.
        DataFormatError: a data file is corrupt or inconsistent.
    """
    factory = DATASETS.factory(name)
    n_train = _check_limit("limit_train", limit_train)
    n_test = _check_limit("limit_test", limit_test)
    ds = factory(data_dir=data_dir, download=download)
    if n_train is None and n_test is None:
        return ds
    return Dataset(
        name=ds.name,
        train_x=_head(ds.train_x, n_train),
        train_y=_head(ds.train_y, n_train),
        test_x=_head(ds.test_x, n_test),
        test_y=_head(ds.test_y, n_test),
        n_classes=ds.n_classes,
        input_shape=ds.input_shape,
    )
