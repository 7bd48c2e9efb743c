"""Fashion-MNIST through TFDS from its IDX files: IDX files the tests write themselves (the real
ones come from Debian's dataset-fashion-mnist, which the tests do not need)."""

import numpy as np
import pytest

from lbsgd.datasets import load_dataset
from lbsgd.errors import DataError
from tests.helpers import tiny_config, write_fashion


def _config(tmp_path, manual_dir, **overrides):
    return tiny_config(dataset="fashion_mnist", data_dir=str(tmp_path / "tfds"),
                       manual_dir=str(manual_dir), global_batch_size=16, bn_group_size=2,
                       **overrides)


@pytest.mark.parametrize("compress", [True, False])
def test_prepared_from_the_idx_files_in_order_and_held_in_memory(tmp_path, compress):
    arrays = write_fashion(tmp_path / "raw", compress=compress)
    dataset = load_dataset(_config(tmp_path, tmp_path / "raw"))
    assert (dataset.num_classes, len(dataset.train), len(dataset.eval)) == (10, 30, 10)
    assert dataset.image_shape == (28, 28, 1)
    for source, (images, labels) in ((dataset.train, arrays["train"]),
                                     (dataset.eval, arrays["test"])):
        np.testing.assert_array_equal(source.images[..., 0], images)  # no copy per read
        np.testing.assert_array_equal(source.labels, labels)
        batch = source.read(np.array([4, 0, 7]))  # the default augmentation is none
        np.testing.assert_array_equal(batch["image"][..., 0], images[[4, 0, 7]])
    pixels = arrays["train"][0].astype(np.float64)
    np.testing.assert_allclose(dataset.mean, [pixels.mean()], rtol=1e-12)
    np.testing.assert_allclose(dataset.std, [pixels.std()], rtol=1e-12)
    # Prepared once: the files may go away afterwards.
    for path in (tmp_path / "raw").iterdir():
        path.unlink()
    assert len(load_dataset(_config(tmp_path, tmp_path / "raw")).train) == 30


def test_missing_files_name_both_ways_to_get_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as error:
        load_dataset(_config(tmp_path, tmp_path / "empty"))
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--config.manual_dir=DIR" in message and str(tmp_path / "empty") in message


@pytest.mark.parametrize("damage, expected", [
    ("unbalanced", r"images per class \[4, 3, 3, 3, 3, 3, 3, 3, 3, 2\] are not all equal"),
    ("label", r"labels span \[0, 12\], outside the 10 classes"),
    ("truncated", r"declares \(30, 28, 28\) = 23520 bytes but holds 23519"),
    ("not_idx", r"is not an IDX file of 3-D unsigned bytes"),
])
def test_damaged_files_stop_preparation_naming_the_problem(tmp_path, damage, expected):
    raw = tmp_path / "raw"
    labels = {"train": np.tile(np.arange(10), 3), "test": np.arange(10)}
    if damage == "unbalanced":
        labels["train"][-1] = 0
    if damage == "label":
        labels["train"][5] = 12
    write_fashion(raw, labels=labels, compress=False)
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:-1])
    if damage == "not_idx":
        images.write_bytes(b"GIF89a" + images.read_bytes()[6:])
    with pytest.raises(DataError, match=expected):
        load_dataset(_config(tmp_path, raw))


def test_pad_crop_augments_training_images_only(tmp_path):
    arrays = write_fashion(tmp_path / "raw")
    dataset = load_dataset(_config(tmp_path, tmp_path / "raw", augment="pad_crop"))
    indices = np.arange(30)
    first = dataset.train.read(indices, seed=0, epoch=0)["image"]
    assert not np.array_equal(first[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(dataset.train.read(indices, seed=0, epoch=0)["image"], first)
    np.testing.assert_array_equal(dataset.eval.read(np.arange(10))["image"][..., 0],
                                  arrays["test"][0])
