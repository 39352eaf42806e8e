"""Tests for leastcontrol.data: IDX I/O, data-set loading, MNIST location and download."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from leastcontrol.data import DATASETS, Dataset, load_dataset, read_idx, resolve_data_dir, write_idx
from leastcontrol.data import mnist as mnist_mod
from leastcontrol.errors import ConfigError, DataFormatError, DatasetNotFoundError

NAMES = mnist_mod.FILE_NAMES


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """Isolate every test from the user's environment and home cache."""
    monkeypatch.delenv("LEASTCONTROL_DATA", raising=False)
    monkeypatch.delenv("LEASTCONTROL_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _make_split(rng, n, h=28, w=28):
    images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


def _write_dir(directory: Path, n_train=20, n_test=10, gz=False, seed=0):
    """Write a tiny MNIST-format directory; return the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for (img, lbl), n in zip(mnist_mod.SPLIT_FILES.values(), (n_train, n_test)):
        x, y = _make_split(rng, n)
        suffix = ".gz" if gz else ""
        write_idx(directory / (img + suffix), x, gzip=gz)
        write_idx(directory / (lbl + suffix), y, gzip=gz)
        arrays[img], arrays[lbl] = x, y
    return arrays


# ---------------------------------------------------------------- IDX format


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 9, 3, 255], dtype=np.uint8),
        np.array([[-5, 1000], [7, -300000]], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        np.array([1.5, -2.25], dtype=np.float64),
        np.array([-128, 127], dtype=np.int8),
        np.array([-1, 30000], dtype=np.int16),
    ],
    ids=["u8-3d", "u8-1d", "i32", "f32", "f64", "i8", "i16"],
)
def test_idx_round_trip(tmp_path, array, gz):
    path = tmp_path / "a.idx"
    write_idx(path, array, gzip=gz)
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == gz
    out = read_idx(path)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable
    assert os.listdir(tmp_path) == ["a.idx"]  # no temp file left behind


def test_idx_header_layout(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.array([1, 2, 3], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 1, 2, 3])


def test_gzip_detected_by_content_not_extension(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "plain.gz", arr)  # not compressed despite the name
    write_idx(tmp_path / "packed", arr, gzip=True)  # compressed without .gz
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed"), arr)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    assert not list(tmp_path.iterdir())


def test_truncated_data_rejected(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 5, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_trailing_data_rejected(tmp_path):
    path = tmp_path / "x"
    write_idx(path, np.zeros(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataFormatError, match="size mismatch"):
        read_idx(path)


def test_bad_magic_rejected(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataFormatError, match="bad.*magic"):
        read_idx(path)
    (tmp_path / "short").write_bytes(b"\x00")
    with pytest.raises(DataFormatError, match="short"):
        read_idx(tmp_path / "short")


def test_unknown_dtype_code_rejected(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataFormatError, match="dtype code 0x07"):
        read_idx(path)


def test_truncated_header_rejected(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x01")
    with pytest.raises(DataFormatError, match="header"):
        read_idx(path)


def test_garbage_gzip_rejected(tmp_path):
    path = tmp_path / "garbage.gz"
    path.write_bytes(b"\x1f\x8b" + b"this is not deflate data" * 3)
    with pytest.raises(DataFormatError, match="garbage.gz.*gzip"):
        read_idx(path)
    # a gzip stream cut in half
    good = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x10" + bytes(range(16)) * 50)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataFormatError, match="gzip"):
        read_idx(path)


# ----------------------------------------------------------------- "idx" set


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_directory(tmp_path, gz):
    arrays = _write_dir(tmp_path / "fmnist", gz=gz)
    ds = load_dataset("idx", data_dir=tmp_path / "fmnist")
    assert isinstance(ds, Dataset) and ds.name == "idx"
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.test_x.dtype == torch.float32 and ds.test_y.dtype == torch.int64
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    assert ds.input_shape == (1, 28, 28) and ds.n_features == 784 and ds.n_classes == 10
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().div(255).unsqueeze(1)
    assert torch.equal(ds.train_x, expected)
    assert "20 train / 10 test" in ds.summary()


def test_limits_take_first_samples(tmp_path):
    _write_dir(tmp_path)
    full = load_dataset("idx", data_dir=str(tmp_path))
    ds = load_dataset("idx", data_dir=tmp_path, limit_train=7, limit_test=3)
    assert len(ds.train_y) == 7 and len(ds.test_y) == 3
    assert torch.equal(ds.train_x, full.train_x[:7]) and torch.equal(ds.train_y, full.train_y[:7])
    assert torch.equal(ds.test_x, full.test_x[:3]) and torch.equal(ds.test_y, full.test_y[:3])
    big = load_dataset("idx", data_dir=tmp_path, limit_train=10_000, limit_test=10_000)
    assert len(big.train_y) == 20 and len(big.test_y) == 10


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_bad_limits_rejected(bad):
    with pytest.raises(ValueError, match="limit_train"):
        load_dataset("digits", limit_train=bad)
    with pytest.raises(ValueError, match="limit_test"):
        load_dataset("digits", limit_test=bad)


def test_idx_n_classes_is_max_label_plus_one(tmp_path):
    _write_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(10, 12, dtype=np.uint8))
    assert load_dataset("idx", data_dir=tmp_path).n_classes == 13


def test_mismatched_counts_rejected(tmp_path):
    _write_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, dtype=np.uint8))
    with pytest.raises(DataFormatError, match="20 images.*19 labels"):
        load_dataset("idx", data_dir=tmp_path)


def test_wrong_ndim_rejected(tmp_path):
    _write_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((10, 1), dtype=np.uint8))
    with pytest.raises(DataFormatError, match="1-D"):
        load_dataset("idx", data_dir=tmp_path)
    _write_dir(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 784), dtype=np.uint8))
    with pytest.raises(DataFormatError, match="3-D"):
        load_dataset("idx", data_dir=tmp_path)


def test_idx_needs_data_dir():
    with pytest.raises(ConfigError, match="--data-dir"):
        load_dataset("idx")


def test_idx_missing_files(tmp_path):
    _write_dir(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("idx", data_dir=tmp_path)
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte" in msg and str(tmp_path) in msg
    assert "train-images" not in msg.split("Fix")[0]


# -------------------------------------------------------------------- digits


def test_digits():
    ds = load_dataset("digits")
    n_train = int(0.8 * 1797)
    assert (n_train, 1797 - n_train) == (1437, 360)
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_y.shape == (1437,) and ds.test_y.shape == (360,)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    assert ds.n_classes == 10 and ds.input_shape == (1, 8, 8) and ds.n_features == 64
    assert set(ds.train_y.tolist()) == set(range(10)) == set(ds.test_y.tolist())
    again = load_dataset("digits", data_dir="/nonexistent/ignored")
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)
    small = load_dataset("digits", limit_train=5, limit_test=4)
    assert torch.equal(small.train_y, ds.train_y[:5]) and torch.equal(small.test_x, ds.test_x[:4])


# --------------------------------------------------------- MNIST + download


def test_resolve_data_dir(tmp_path, monkeypatch):
    assert resolve_data_dir(tmp_path / "x", "mnist") == tmp_path / "x"
    assert resolve_data_dir(None, "mnist") == tmp_path / "xdg-cache" / "leastcontrol" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir(None, "mnist") == Path.home() / ".cache" / "leastcontrol" / "mnist"
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("LEASTCONTROL_DATA", str(root))
    assert resolve_data_dir(None, "mnist") == root
    (root / "mnist").mkdir()
    assert resolve_data_dir(None, "mnist") == root / "mnist"
    assert resolve_data_dir(tmp_path / "explicit", "mnist") == tmp_path / "explicit"


def test_mnist_loads_local_dir_without_checksums(tmp_path, monkeypatch):
    _write_dir(tmp_path, gz=True)
    monkeypatch.setattr(mnist_mod, "_fetch", _no_fetch)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.name == "mnist" and ds.n_classes == 10 and ds.train_x.shape == (20, 1, 28, 28)


def test_mnist_via_env_var(tmp_path, monkeypatch):
    _write_dir(tmp_path / "mnist")
    monkeypatch.setenv("LEASTCONTROL_DATA", str(tmp_path))
    monkeypatch.setattr(mnist_mod, "_fetch", _no_fetch)
    assert load_dataset("mnist").test_x.shape == (10, 1, 28, 28)


def _no_fetch(url, dest, timeout):
    raise AssertionError(f"_fetch must not be called (url={url})")


def test_mnist_missing_download_fails(tmp_path, monkeypatch):
    calls = []

    def failing_fetch(url, dest, timeout):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mnist_mod, "_fetch", failing_fetch)
    empty = tmp_path / "empty"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", data_dir=empty)
    msg = str(info.value)
    assert str(empty) in msg and "--data-dir" in msg and "LEASTCONTROL_DATA" in msg
    assert all(name in msg for name in NAMES)
    assert "no network" in msg
    # the first file fails on every mirror; the other files are not attempted
    assert len(calls) == len(mnist_mod.MIRRORS)
    assert calls[0].startswith(mnist_mod.MIRRORS[0]) and calls[0].endswith(".gz")
    assert not empty.exists()  # no partial files, and the folder made for the download is gone again
    assert isinstance(info.value, FileNotFoundError)


def test_mnist_offline_env_skips_download(tmp_path, monkeypatch):
    monkeypatch.setenv("LEASTCONTROL_OFFLINE", "1")
    monkeypatch.setattr(mnist_mod, "_fetch", _no_fetch)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and "--data-dir" in str(info.value)
    assert "LEASTCONTROL_OFFLINE" in str(info.value)


def test_mnist_download_false(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "_fetch", _no_fetch)
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def _serve_from(source: Path, calls: list):
    def fetch(url, dest, timeout):
        calls.append(url)
        shutil.copyfile(source / url.rsplit("/", 1)[1], dest)

    return fetch


def test_mnist_download_checksum_mismatch(tmp_path, monkeypatch):
    served = tmp_path / "server"
    _write_dir(served, gz=True)  # valid IDX files, but not the real MNIST content
    calls = []
    monkeypatch.setattr(mnist_mod, "_fetch", _serve_from(served, calls))
    dest = tmp_path / "dest"
    with pytest.raises(DataFormatError, match="checksum"):
        load_dataset("mnist", data_dir=dest)
    assert calls
    assert not dest.exists()  # bad download deleted, no temp file left, the folder made for it removed


def test_mnist_download_success(tmp_path, monkeypatch):
    served = tmp_path / "server"
    arrays = _write_dir(served, gz=True)
    sums = {}
    for name in NAMES:
        sums[name] = hashlib.sha256(gzip.decompress((served / f"{name}.gz").read_bytes())).hexdigest()
    monkeypatch.setattr(mnist_mod, "SHA256", sums)
    calls = []
    monkeypatch.setattr(mnist_mod, "_fetch", _serve_from(served, calls))
    dest = tmp_path / "dest"
    ds = load_dataset("mnist", data_dir=dest, limit_test=4)
    assert len(calls) == 4  # first mirror succeeded for every file
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["train-labels-idx1-ubyte"])
    # second load uses the cached files
    monkeypatch.setattr(mnist_mod, "_fetch", _no_fetch)
    assert load_dataset("mnist", data_dir=dest).test_x.shape == (10, 1, 28, 28)


def test_mnist_download_only_missing_and_falls_back_to_second_mirror(tmp_path, monkeypatch):
    served = tmp_path / "server"
    _write_dir(served, gz=True)
    sums = {n: hashlib.sha256(gzip.decompress((served / f"{n}.gz").read_bytes())).hexdigest() for n in NAMES}
    monkeypatch.setattr(mnist_mod, "SHA256", sums)
    dest = tmp_path / "dest"
    _write_dir(dest, gz=False)
    (dest / "t10k-labels-idx1-ubyte").unlink()
    calls = []
    serve = _serve_from(served, calls)

    def flaky(url, dest_path, timeout):
        if url.startswith(mnist_mod.MIRRORS[0]):
            calls.append(url)
            raise urllib.error.URLError("mirror down")
        serve(url, dest_path, timeout)

    monkeypatch.setattr(mnist_mod, "_fetch", flaky)
    ds = load_dataset("mnist", data_dir=dest)
    assert [c.rsplit("/", 1)[1] for c in calls] == ["t10k-labels-idx1-ubyte.gz"] * 2
    assert ds.test_y.shape == (10,)


def _real_mnist_dir():
    env = os.environ.get("LEASTCONTROL_TEST_MNIST")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def test_real_mnist_if_present(monkeypatch):
    directory = _real_mnist_dir()
    if not directory.is_dir() or mnist_mod.find_idx_files(directory)[1]:
        pytest.skip(f"real MNIST not found in {directory}")
    monkeypatch.setattr(mnist_mod, "_fetch", _no_fetch)
    ds = load_dataset("mnist", data_dir=directory, limit_test=100)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (100, 1, 28, 28)
    assert ds.n_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train_y[:5].tolist() == [5, 0, 4, 1, 9]
    assert float(ds.train_x.max()) == 1.0 and float(ds.train_x.min()) == 0.0


# ------------------------------------------------------------------ registry


def test_unknown_dataset_lists_valid_names():
    assert DATASETS.names() == ["cifar10", "digits", "idx", "mnist"]
    with pytest.raises(ValueError) as info:
        load_dataset("cifar100")
    msg = str(info.value)
    assert "cifar100" in msg and all(n in msg for n in ("cifar10,", "digits", "idx", "mnist"))


def test_dataset_validates_shapes():
    x = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match="samples"):
        Dataset("t", x, torch.zeros(2, dtype=torch.int64), x, torch.zeros(3, dtype=torch.int64), 2, (1, 2, 2))
    with pytest.raises(ValueError, match="input_shape"):
        Dataset("t", x, torch.zeros(3, dtype=torch.int64), x, torch.zeros(3, dtype=torch.int64), 2, (4,))
