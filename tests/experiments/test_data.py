"""The data loaders on fixture files: IDX, CIFAR-10 pickles, downloads, digits."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from bgn_jax.experiments import data
from bgn_jax.experiments.data import DataError


def idx_bytes(array: np.ndarray) -> bytes:
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
    f">{array.ndim}I", *array.shape
  )
  return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  arrays = {
    "train_images": rng.integers(0, 256, (n_train, 28, 28)),
    "train_labels": rng.integers(0, 10, n_train),
    "test_images": rng.integers(0, 256, (n_test, 28, 28)),
    "test_labels": rng.integers(0, 10, n_test),
  }
  folder.mkdir(parents=True, exist_ok=True)
  for key, file in data.IDX_FILES.items():
    (folder / file).write_bytes(gzip.compress(idx_bytes(arrays[key])))
  return arrays


def test_read_idx_round_trip(tmp_path):
  arrays = write_idx_set(tmp_path)
  images = data.read_idx(tmp_path / data.IDX_FILES["train_images"])
  np.testing.assert_array_equal(images, arrays["train_images"])
  assert images.dtype == np.uint8


def test_load_idx_dataset_from_data_dir(tmp_path):
  arrays = write_idx_set(tmp_path)
  dataset = data.load_dataset("fashion-mnist", data_dir=tmp_path)
  assert dataset.x_train.shape == (12, 784) and dataset.x_test.shape == (5, 784)
  np.testing.assert_array_equal(dataset.y_train, arrays["train_labels"])
  assert abs(float(dataset.x_train.mean())) < 1e-5
  assert dataset.num_classes == 10


@pytest.mark.parametrize(
  "damage",
  [
    lambda raw: gzip.compress(raw)[:-20],  # truncated gzip stream
    lambda raw: gzip.compress(raw[:-7]),  # truncated IDX payload
    lambda raw: gzip.compress(b"\x01\x02" + raw[2:]),  # bad magic
    lambda raw: b"not gzip at all",
  ],
  ids=["truncated-gzip", "truncated-idx", "bad-magic", "not-gzip"],
)
def test_corrupt_idx_file_error_names_the_file(tmp_path, damage):
  write_idx_set(tmp_path)
  bad = tmp_path / data.IDX_FILES["test_labels"]
  bad.write_bytes(damage(gzip.decompress(bad.read_bytes())))
  with pytest.raises(DataError, match=bad.name):
    data.load_dataset("mnist", data_dir=tmp_path)


def test_missing_file_in_data_dir_names_it(tmp_path):
  write_idx_set(tmp_path)
  (tmp_path / data.IDX_FILES["train_labels"]).unlink()
  with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
    data.load_dataset("mnist", data_dir=tmp_path)


def test_download_from_file_url_verifies_and_caches(tmp_path, monkeypatch):
  source = tmp_path / "mirror"
  arrays = write_idx_set(source)
  monkeypatch.setenv("BGN_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("BGN_JAX_MNIST_URL", source.as_uri())
  checksums = {
    file: hashlib.sha256(gzip.decompress((source / file).read_bytes())).hexdigest()
    for file in data.IDX_FILES.values()
  }
  monkeypatch.setitem(data.CONTENT_SHA256, "mnist", checksums)
  monkeypatch.setitem(data.FILE_SHA256, "mnist", {})
  dataset = data.load_dataset("mnist")
  np.testing.assert_array_equal(dataset.y_test, arrays["test_labels"])
  cached = sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir())
  assert cached == sorted(data.IDX_FILES.values())


def test_download_with_wrong_checksum_leaves_no_file(tmp_path, monkeypatch):
  source = tmp_path / "mirror"
  write_idx_set(source)
  monkeypatch.setenv("BGN_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("BGN_JAX_MNIST_URL", source.as_uri())
  monkeypatch.setitem(data.CONTENT_SHA256, "mnist", {data.IDX_FILES["train_images"]: "0" * 64})
  monkeypatch.setitem(data.FILE_SHA256, "mnist", {})
  with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*SHA-256"):
    data.load_dataset("mnist")
  assert list((tmp_path / "cache" / "mnist").iterdir()) == []


def test_download_with_wrong_file_checksum_leaves_no_file(tmp_path, monkeypatch):
  # The fixture files are not the published MNIST files, so the real .gz checksums fail.
  source = tmp_path / "mirror"
  write_idx_set(source)
  monkeypatch.setenv("BGN_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("BGN_JAX_MNIST_URL", source.as_uri())
  with pytest.raises(DataError, match="idx.-ubyte.gz.*SHA-256 of the file"):
    data.load_dataset("mnist")
  assert list((tmp_path / "cache" / "mnist").iterdir()) == []


def test_no_checksum_no_download(tmp_path):
  fetched = []
  dest = tmp_path / "cache" / "data.gz"
  with pytest.raises(DataError, match="no checksum is known"):
    data.download("https://example.invalid/z.gz", dest, fetch=lambda u, p: fetched.append(u))
  assert fetched == [] and not dest.exists()


def test_truncated_download_leaves_no_file(tmp_path):
  source = tmp_path / "source.gz"
  source.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 4, 4))))[:-10])

  def fetch(url: str, path: Path) -> None:
    path.write_bytes(source.read_bytes())

  dest = tmp_path / "cache" / "t10k-images-idx3-ubyte.gz"
  with pytest.raises(DataError, match=dest.name):
    data.download("https://example.invalid/x.gz", dest, content_sha256="0" * 64, fetch=fetch)
  assert list(dest.parent.iterdir()) == []


def test_failed_fetch_names_the_file_and_leaves_no_file(tmp_path):
  def fetch(url: str, path: Path) -> None:
    path.write_bytes(b"partial")
    raise OSError("connection reset")

  dest = tmp_path / "cache" / "train-labels-idx1-ubyte.gz"
  with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*connection reset"):
    data.download("https://example.invalid/y.gz", dest, file_sha256="0" * 64, fetch=fetch)
  assert list(dest.parent.iterdir()) == []


def test_fashion_mnist_checksums_are_the_official_content():
  # The checksums are of the decompressed bytes of the Debian package's files.
  folder = data.SYSTEM_DIRS["fashion-mnist"]
  if not all((folder / f).is_file() for f in data.IDX_FILES.values()):
    pytest.skip("dataset-fashion-mnist is not installed")
  for file, expected in data.CONTENT_SHA256["fashion-mnist"].items():
    with gzip.open(folder / file) as f:
      assert hashlib.sha256(f.read()).hexdigest() == expected


def write_cifar(folder: Path, n: int = 4) -> None:
  rng = np.random.default_rng(1)
  folder.mkdir(parents=True, exist_ok=True)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batch = {
      b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
      b"labels": [int(v) for v in rng.integers(0, 10, n)],
    }
    (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_from_pickles(tmp_path):
  write_cifar(tmp_path / "cifar-10-batches-py")
  dataset = data.load_dataset("cifar10", data_dir=tmp_path)
  assert dataset.x_train.shape == (20, 3072) and dataset.x_test.shape == (4, 3072)
  assert dataset.y_train.dtype == np.int32


@pytest.mark.parametrize("cut", [0, 100])
def test_corrupt_cifar_batch_names_the_file(tmp_path, cut):
  write_cifar(tmp_path)
  bad = tmp_path / "data_batch_3"
  bad.write_bytes(bad.read_bytes()[:cut])
  with pytest.raises(DataError, match="data_batch_3"):
    data.load_dataset("cifar10", data_dir=tmp_path)


def test_digits_split_is_fixed_and_the_cached_copy_is_scikit_learns(tmp_path, monkeypatch):
  from sklearn.datasets import load_digits

  monkeypatch.setenv("BGN_JAX_CACHE", str(tmp_path))
  a = data.load_digits()  # from scikit-learn, then cached
  assert (tmp_path / "digits.npz").is_file()
  b = data.load_digits()  # from the cache
  assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  images, labels = load_digits(return_X_y=True)
  with np.load(tmp_path / "digits.npz") as cached:
    np.testing.assert_array_equal(cached["images"], images)
    np.testing.assert_array_equal(cached["labels"], labels)
  (tmp_path / "digits.npz").write_bytes(b"not an npz")  # a corrupt copy is loaded again
  np.testing.assert_array_equal(data.load_digits().x_train, a.x_train)


def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
  a = data.epoch_permutation(3, 7, 100)
  np.testing.assert_array_equal(a, data.epoch_permutation(3, 7, 100))
  assert not np.array_equal(a, data.epoch_permutation(3, 8, 100))
  assert sorted(a) == list(range(100))


def test_unknown_dataset_is_a_value_error():
  with pytest.raises(ValueError, match="imagenet"):
    data.load_dataset("imagenet")
