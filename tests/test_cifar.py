"""CIFAR-10 reader: a test-built batches directory, corrupt files, offline behaviour, normalisation."""
import pickle

import numpy as np
import pytest
import torch

from leastcontrol.data import load_dataset
from leastcontrol.data import cifar
from leastcontrol.errors import DataFormatError, DatasetNotFoundError


def _build(directory, n=12, seed=0):
    g = np.random.default_rng(seed)
    expected = {}
    for name in cifar.TRAIN_BATCHES + (cifar.TEST_BATCH,):
        data = g.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = g.integers(0, 10, size=n)
        cifar.write_cifar_batch(directory / name, data, labels)
        expected[name] = (data, labels)
    return expected


def test_reads_a_batches_directory(tmp_path):
    expected = _build(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert ds.train_x.shape == (60, 3, 32, 32) and ds.test_x.shape == (12, 3, 32, 32)
    assert ds.n_classes == 10 and ds.input_shape == (3, 32, 32)
    data, labels = expected["data_batch_2"]
    # Channel-major rows: pixel (c, i, j) of image k is data[k, 1024 c + 32 i + j].
    assert float(ds.train_x[12, 1, 3, 5]) == pytest.approx(data[0, 1024 + 32 * 3 + 5] / 255.0)
    assert ds.train_y[12:24].tolist() == labels.tolist()
    # The batches may also sit one level down, as unpacked from the official archive.
    sub = tmp_path / "outer" / "cifar-10-batches-py"
    sub.mkdir(parents=True)
    _build(sub)
    assert load_dataset("cifar10", data_dir=tmp_path / "outer", download=False).train_x.shape[0] == 60


def test_corrupt_and_missing_batches_fail_clearly(tmp_path, monkeypatch):
    _build(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataFormatError, match="data_batch_3: not a readable CIFAR-10 batch"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    # A pickle that would build an arbitrary object is refused, not executed.
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({"data": print}))
    with pytest.raises(DataFormatError, match="refusing to load"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    cifar.write_cifar_batch(tmp_path / "data_batch_3", np.zeros((2, 3072), np.uint8), [0, 11])
    with pytest.raises(DataFormatError, match="integers in \\[0, 9\\]"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    monkeypatch.setenv("LEASTCONTROL_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 not found.*LEASTCONTROL_OFFLINE.*--data-dir"):
        load_dataset("cifar10", data_dir=tmp_path / "empty")


def test_download_checks_the_archive_sha256(tmp_path, monkeypatch):
    def fake_fetch(url, dest, timeout):
        dest.write_bytes(b"not the archive")
    monkeypatch.setattr(cifar, "_fetch", fake_fetch)
    monkeypatch.delenv("LEASTCONTROL_OFFLINE", raising=False)
    with pytest.raises(DataFormatError, match="sha256"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not list(tmp_path.glob("*.tar.gz"))  # the bad download is gone


def test_normalize_and_augment():
    x = torch.rand(64, 3, 32, 32)
    z = cifar.normalize(x)
    assert torch.allclose(z[:, 0], (x[:, 0] - 0.4914) / 0.2023)
    g = torch.Generator().manual_seed(0)
    a = cifar.augment(x, g)
    assert a.shape == x.shape
    # Every augmented image is a shifted (and maybe mirrored) copy: its pixels are the original's or padding.
    i = 0
    found = any(torch.equal(a[i, :, 4:28, 4:28], cand[:, 4 + dy:28 + dy, 4 + dx:28 + dx])
                for cand in (x[i], x[i].flip(-1)) for dy in range(-4, 5) for dx in range(-4, 5))
    assert found
