"""Data for the experiments: digits, Fashion-MNIST, MNIST and CIFAR-10 as NumPy arrays.

Sources, in order: ``data_dir`` if given; for Fashion-MNIST the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``); the cache
(``$BGN_JAX_CACHE``, else ``~/.cache/bgn_jax``); and last a download into the cache.
A download goes to a temporary file in the cache directory, is checked (SHA-256
and IDX structure) and only then renamed, so the cache never holds a half-written
file; a file with no known checksum is never downloaded. CIFAR-10 is read from its python-pickle
batches in a local folder; it is never downloaded.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import shutil
import struct
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
  "DATASETS",
  "Dataset",
  "DataError",
  "cache_dir",
  "download",
  "epoch_permutation",
  "load_cifar10",
  "load_dataset",
  "load_digits",
  "load_idx_dataset",
  "read_idx",
]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")

IDX_FILES = {
  "train_images": "train-images-idx3-ubyte.gz",
  "train_labels": "train-labels-idx1-ubyte.gz",
  "test_images": "t10k-images-idx3-ubyte.gz",
  "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Official download locations. The base URL can be overridden with the
# environment variable BGN_JAX_<NAME>_URL (e.g. BGN_JAX_FASHION_MNIST_URL), for a
# mirror or a file:// folder.
BASE_URLS = {
  "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
  # yann.lecun.com refuses scripted downloads; this is the mirror torchvision uses.
  "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}

# SHA-256 of the *decompressed* IDX bytes. Hashing the content rather than the
# .gz makes the check independent of how a mirror compressed the file. The
# Fashion-MNIST values were computed here from the files of the Debian package
# dataset-fashion-mnist 0.0~git20200523.55506a9-1 (the upstream repository's
# data).
CONTENT_SHA256: dict[str, dict[str, str]] = {
  "fashion-mnist": {
    "train-images-idx3-ubyte.gz": (
      "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
      "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": (
      "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": (
      "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
  },
  "mnist": {},
}

# SHA-256 of the .gz files themselves, where the published files are the ones
# served. MNIST: the checksums published for the original files (the same values
# in TensorFlow Datasets' url_checksums and in several independent loaders; the
# mirror serves those files); not verifiable offline here.
FILE_SHA256: dict[str, dict[str, str]] = {
  "fashion-mnist": {},
  "mnist": {
    "train-images-idx3-ubyte.gz": (
      "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
      "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
      "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
      "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
  },
}

SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

Fetcher = Callable[[str, Path], None]


class DataError(ValueError):
  """A data file is missing, truncated, corrupt or fails its checksum."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification data set, features flattened and standardized.

  Attributes:
    name: one of DATASETS.
    x_train, y_train, x_test, y_test: float32 features (N, D) and int32 labels (N,).
    num_classes: the number of classes.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the training examples in an epoch: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def _standardize(name: str, x_train: np.ndarray, x_test: np.ndarray, y_train, y_test, k):
  # One scalar mean and std from the training set: per-pixel statistics would
  # divide by ~0 on the constant border pixels of the image sets.
  x_train = x_train.reshape(len(x_train), -1).astype(np.float32)
  x_test = x_test.reshape(len(x_test), -1).astype(np.float32)
  mean, std = float(x_train.mean()), float(x_train.std())
  return Dataset(
    name=name,
    x_train=(x_train - mean) / std,
    y_train=np.asarray(y_train, np.int32),
    x_test=(x_test - mean) / std,
    y_test=np.asarray(y_test, np.int32),
    num_classes=k,
  )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits, kept as ``digits.npz`` in :func:`cache_dir` after the first
  load: importing scikit-learn takes longer than a short run's training."""
  cached = cache_dir() / "digits.npz"
  try:
    with np.load(cached) as arrays:
      images, labels = arrays["images"], arrays["labels"]
    if images.shape == (1797, 64) and labels.shape == (1797,):
      return images, labels
  except (OSError, KeyError, ValueError):
    pass  # absent or unreadable: load it again
  from sklearn.datasets import load_digits as sk_load_digits

  images, labels = sk_load_digits(return_X_y=True)
  try:
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"digits.{os.getpid()}.npz")
    np.savez(partial, images=images, labels=labels)
    os.replace(partial, cached)  # atomic: a concurrent run reads the old file or the new
  except OSError:
    pass  # a read-only cache: load it every time
  return images, labels


def load_digits(test_fraction: float = 0.2) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1797 images), a fixed random train/test split."""
  images, labels = _digits_arrays()
  order = np.random.default_rng(0).permutation(len(labels))
  x, y = images[order], labels[order]
  n_test = int(round(test_fraction * len(y)))
  return _standardize("digits", x[n_test:], x[:n_test], y[n_test:], y[:n_test], 10)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}).")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes).")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise DataError(
      f"{path}: truncated or corrupt IDX file: {len(raw)} bytes, the header of shape "
      f"{shape} needs {expected}."
    )
  return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _read_gzip(path: Path) -> bytes:
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(f"{path}: truncated or corrupt gzip file ({e}).") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads a gzipped IDX file (the MNIST format) into a NumPy array.

  Args:
    path: the ``.gz`` file.

  Returns:
    The array, with the shape and dtype of the IDX header.

  Raises:
    DataError: naming the file, if it is missing, truncated or corrupt.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such file.")
  return _parse_idx(_read_gzip(path), path)


def cache_dir() -> Path:
  """Where downloads go: ``$BGN_JAX_CACHE``, else ``~/.cache/bgn_jax``."""
  return Path(os.environ.get("BGN_JAX_CACHE") or Path.home() / ".cache" / "bgn_jax")


def _urllib_fetch(url: str, dest: Path) -> None:
  with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
    shutil.copyfileobj(response, out)


def download(
  url: str,
  dest: str | os.PathLike,
  *,
  content_sha256: str | None = None,
  file_sha256: str | None = None,
  fetch: Fetcher | None = None,
) -> Path:
  """Downloads a gzipped IDX file to ``dest``, atomically and verified.

  The bytes go to a temporary file next to ``dest``; it is renamed to ``dest``
  only after its SHA-256 matches and it decompresses to a well-formed IDX array.

  Args:
    url: where to fetch from (any scheme urllib opens, file:// included).
    dest: the final path.
    content_sha256: the expected SHA-256 of the decompressed bytes, or None.
    file_sha256: the expected SHA-256 of the .gz file, or None. At least one of
      the two is required: nothing is downloaded unverified.
    fetch: ``fetch(url, path)`` writes the resource to ``path``; urllib by default.

  Returns:
    ``dest``.

  Raises:
    DataError: naming the URL and file, if no checksum is known, or the
      download fails or is not valid.
  """
  dest = Path(dest)
  if content_sha256 is None and file_sha256 is None:
    raise DataError(
      f"{dest.name}: no checksum is known for {url}, so it is not downloaded; put the "
      "file in a folder and pass it with --data-dir."
    )
  dest.parent.mkdir(parents=True, exist_ok=True)
  print(f"bgn-jax: downloading {url} -> {dest}", file=sys.stderr)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
  os.close(fd)
  tmp = Path(tmp_name)
  try:
    try:
      (fetch or _urllib_fetch)(url, tmp)
    except OSError as e:
      raise DataError(f"{dest.name}: download from {url} failed ({e}).") from e
    if file_sha256 is not None:
      digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
      if digest != file_sha256:
        raise DataError(
          f"{dest.name}: downloaded from {url}, SHA-256 of the file is {digest}, "
          f"expected {file_sha256}."
        )
    raw = _read_gzip(tmp)
    if content_sha256 is not None:
      digest = hashlib.sha256(raw).hexdigest()
      if digest != content_sha256:
        raise DataError(
          f"{dest.name}: downloaded from {url}, SHA-256 of the content is {digest}, "
          f"expected {content_sha256}."
        )
    _parse_idx(raw, Path(f"{dest.name} (from {url})"))
    os.replace(tmp, dest)
  finally:
    tmp.unlink(missing_ok=True)
  return dest


def _find_idx_dir(name: str, data_dir: Path | None, fetch: Fetcher | None) -> Path:
  if data_dir is not None:
    missing = [f for f in IDX_FILES.values() if not (data_dir / f).is_file()]
    if missing:
      raise DataError(f"{data_dir / missing[0]}: no such file (--data-dir {data_dir}).")
    return data_dir
  system = SYSTEM_DIRS.get(name)
  if system is not None and all((system / f).is_file() for f in IDX_FILES.values()):
    return system
  target = cache_dir() / name
  base = os.environ.get(f"BGN_JAX_{name.upper().replace('-', '_')}_URL") or BASE_URLS[name]
  for file in IDX_FILES.values():
    if not (target / file).is_file():
      download(
        base.rstrip("/") + "/" + file,
        target / file,
        content_sha256=CONTENT_SHA256[name].get(file),
        file_sha256=FILE_SHA256[name].get(file),
        fetch=fetch,
      )
  return target


def load_idx_dataset(
  name: str, data_dir: str | os.PathLike | None = None, fetch: Fetcher | None = None
) -> Dataset:
  """Fashion-MNIST or MNIST from the four IDX ``.gz`` files.

  Args:
    name: "fashion-mnist" or "mnist".
    data_dir: a folder holding the four files; else the system folder, the cache
      or a download (see the module docstring).
    fetch: the downloader, for tests; urllib by default.

  Returns:
    The data set, images flattened to 784 features.

  Raises:
    DataError: naming the file that is missing, truncated or corrupt.
  """
  folder = _find_idx_dir(name, None if data_dir is None else Path(data_dir), fetch)
  arrays = {key: read_idx(folder / file) for key, file in IDX_FILES.items()}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if len(images) != len(labels):
      raise DataError(
        f"{folder / IDX_FILES[split + '_labels']}: {len(labels)} labels for {len(images)} images."
      )
  return _standardize(
    name,
    arrays["train_images"],
    arrays["test_images"],
    arrays["train_labels"],
    arrays["test_labels"],
    10,
  )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  if not path.is_file():
    raise DataError(f"{path}: no such file (CIFAR-10 python batches are needed).")
  try:
    with open(path, "rb") as f:
      # The official batches are pickles: only read folders you trust.
      batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], np.uint8)
    labels = np.asarray(batch[b"labels"], np.int64)
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, OSError) as e:
    raise DataError(f"{path}: truncated or corrupt CIFAR-10 batch ({e!r}).") from e
  if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
    raise DataError(f"{path}: CIFAR-10 batch of unexpected shape {data.shape}.")
  return data, labels


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Dataset:
  """CIFAR-10 from the python-pickle batches (``data_batch_1..5``, ``test_batch``).

  Args:
    data_dir: the folder holding the batches, or its parent holding
      ``cifar-10-batches-py``; default ``<cache>/cifar-10-batches-py``.

  Returns:
    The data set, images flattened to 3072 features.

  Raises:
    DataError: naming the batch file that is missing or corrupt.
  """
  folder = Path(data_dir) if data_dir is not None else cache_dir() / "cifar-10-batches-py"
  if (folder / "cifar-10-batches-py").is_dir():
    folder = folder / "cifar-10-batches-py"
  train = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
  x_test, y_test = _read_cifar_batch(folder / "test_batch")
  x_train = np.concatenate([x for x, _ in train])
  y_train = np.concatenate([y for _, y in train])
  return _standardize("cifar10", x_train, x_test, y_train, y_test, 10)


def load_dataset(
  name: str, data_dir: str | os.PathLike | None = None, fetch: Fetcher | None = None
) -> Dataset:
  """Loads one of DATASETS by name (see the module docstring for the sources).

  Raises:
    ValueError: ``name`` is not one of DATASETS.
    DataError: naming a file that is missing, truncated or corrupt.
  """
  if name == "digits":
    return load_digits()
  if name in ("fashion-mnist", "mnist"):
    return load_idx_dataset(name, data_dir, fetch)
  if name == "cifar10":
    return load_cifar10(data_dir)
  raise ValueError(f"dataset: unknown {name!r}; choose one of {', '.join(DATASETS)}.")
