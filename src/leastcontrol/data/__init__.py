"""Data sets: the ``Dataset`` container, loaders by name, and IDX file I/O.

>>> from leastcontrol.data import load_dataset
>>> ds = load_dataset("digits", limit_train=100)   # doctest: +SKIP
"""
from .base import DATASETS, Dataset, load_dataset
from .idx import read_idx, write_idx
from .download import resolve_data_dir

__all__ = ["DATASETS", "Dataset", "load_dataset", "read_idx", "write_idx", "resolve_data_dir"]
