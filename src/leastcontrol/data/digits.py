"""scikit-learn's bundled 8x8 handwritten digits, available offline."""
from __future__ import annotations

import numpy as np
import torch

from .base import Dataset

#: Fraction of the 1797 samples used for training.
TRAIN_FRACTION = 0.8
#: Seed of the fixed permutation that defines the train/test split.
SPLIT_SEED = 0


def load_digits_dataset() -> Dataset:
    """Load the digits data set with a fixed 80/20 train/test split.

    Pixel values (0..16) are scaled to [0, 1]; inputs have shape ``(1, 8, 8)``.
    The split is ``numpy.random.RandomState(0).permutation(n)``: the first 80 %
    of the permuted indices are the training set.

    Returns:
        A ``Dataset`` named "digits" with 1437 training and 360 test samples.
    """
    # Imported on first use: scikit-learn takes about a second to import, and only this data set needs it.
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    n = len(y)
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    n_train = int(TRAIN_FRACTION * n)
    xt = torch.from_numpy((x / 16.0).astype(np.float32).reshape(n, 1, 8, 8))
    yt = torch.from_numpy(y.astype(np.int64))
    tr, te = torch.from_numpy(perm[:n_train]), torch.from_numpy(perm[n_train:])
    return Dataset(
        name="digits",
        train_x=xt[tr],
        train_y=yt[tr],
        test_x=xt[te],
        test_y=yt[te],
        n_classes=10,
        input_shape=(1, 8, 8),
    )
