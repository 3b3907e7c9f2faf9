import math
import numpy as np
import pytest
from PIL import Image

from training.data import (
    DatasetNotFound, adaptive_partition, disjoint_stratified_subsets, load_dataset, load_digits, load_fashion_mnist,
    load_image_folder, load_mnist, make_splits, read_idx,
)
from tests.helpers import write_idx, write_mnist_like


def test_idx_reader_roundtrips_gzip_and_plain(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (True, False):
        path = write_idx(tmp_path / f"a{compress}", array, compress)
        np.testing.assert_array_equal(read_idx(path), array)


def test_idx_reader_refuses_truncated_file(tmp_path):
    path = write_idx(tmp_path / "a", np.zeros((4, 5, 5)), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_fashion_mnist_loader_reads_idx_folder(tmp_path):
    write_mnist_like(tmp_path, n_train=30, n_test=10)
    train, test = load_fashion_mnist(tmp_path)
    assert train.images.shape == (30, 1, 28, 28) and test.images.shape == (10, 1, 28, 28)
    assert train.classes[0] == "t-shirt/top" and len(train.classes) == 10
    assert train.labels.dtype == np.int64


def test_mnist_loader_reads_uncompressed_idx(tmp_path):
    write_mnist_like(tmp_path, compress=False)
    train, test = load_mnist(tmp_path)
    assert len(train) == 60 and len(test) == 20 and train.classes == [str(d) for d in range(10)]


def test_missing_data_set_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(DatasetNotFound, match="make data-mnist"):
        load_mnist(tmp_path)
    with pytest.raises(DatasetNotFound, match="--download"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        load_dataset("svhn")


def test_digits_split_is_stratified_and_disjoint():
    train, test = load_digits()
    assert len(train) + len(test) == 1797
    assert train.images.max() == 255 and train.images.shape[1:] == (1, 8, 8)
    assert np.bincount(test.labels).min() >= 40


def test_image_folder_loads_resized_pngs(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    train, test = load_image_folder(tmp_path, image_size=16)
    assert train.images.shape == (8, 3, 16, 16) and test.images.shape == (4, 3, 16, 16)
    assert train.classes == ["cat", "dog"] and sorted(np.bincount(train.labels)) == [4, 4]
    grey, _ = load_image_folder(tmp_path, image_size=12, colour_mode="L")
    assert grey.images.shape == (8, 1, 12, 12)


def test_image_folder_without_test_split_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFound, match="test does not exist"):
        load_image_folder(tmp_path)


def test_splits_are_stratified_seeded_and_keep_test_whole():
    train, test = load_digits()
    a = make_splits("digits", train, test, val_fraction=0.2, seed=3, train_limit=500)
    b = make_splits("digits", train, test, val_fraction=0.2, seed=3, train_limit=500)
    np.testing.assert_array_equal(a.val.labels, b.val.labels)
    assert len(a.train) == 500 and a.test is test
    val_share = np.bincount(a.val.labels) / len(a.val)
    all_share = np.bincount(train.labels) / len(train)
    assert np.abs(val_share - all_share).max() < 0.02
    assert len(a.val) == math.ceil(0.2 * len(train))


def test_disjoint_subsets_cover_everything_once_with_class_mix():
    labels = np.repeat(np.arange(5), 40)
    parts = disjoint_stratified_subsets(labels, 4, seed=1)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(set(joined.tolist())) == len(labels)
    for part in parts:
        assert np.bincount(labels[part]).tolist() == [10] * 5
    with pytest.raises(ValueError, match="parts must be >= 2"):
        disjoint_stratified_subsets(labels, 1)


def test_image_folder_with_empty_class_is_a_clear_error(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFound, match="Found no valid file for the classes a"):
        load_image_folder(tmp_path)


def test_adaptive_partition_keeps_the_heads_images_from_every_learner():
    labels = np.repeat(np.arange(5), 40)
    subsets, head = adaptive_partition(labels, 2, 0.2, seed=3)
    assert len(head) == 40 and np.bincount(labels[head]).tolist() == [8] * 5
    learners = np.concatenate(subsets)
    assert len(set(learners.tolist())) == 160 and not set(learners.tolist()) & set(head.tolist())
    assert all(np.bincount(labels[s]).tolist() == [16] * 5 for s in subsets)


def test_adaptive_partition_without_a_fraction_trains_the_head_on_everything():
    labels = np.repeat(np.arange(4), 10)
    subsets, head = adaptive_partition(labels, 2, None)
    assert head.tolist() == list(range(40))
    assert sorted(np.concatenate(subsets).tolist()) == list(range(40))
