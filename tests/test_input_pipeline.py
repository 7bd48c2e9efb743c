"""The data contract of Remark 4 and the augmentation of Sec. 5.1.

One global permutation per epoch, each image once per epoch, each process reading its own rows
by random access; crops and flips a pure function of (seed, epoch, index), so neither resuming
nor the number of processes changes a single pixel.
"""

import io
import math

import jax
import numpy as np
import pytest
from PIL import Image

from lbsgd import input_pipeline, parallel
from lbsgd.datasets import augment, load_dataset
from lbsgd.datasets.sources import ArraySource, Dataset
from lbsgd.errors import DataError
from tests.helpers import folder_config, write_image_folder

IMAGENET_TRAIN = 1_281_167


def test_steps_per_epoch_is_floor():
    assert input_pipeline.steps_per_epoch(IMAGENET_TRAIN, 8192) == 156
    assert input_pipeline.steps_per_epoch(IMAGENET_TRAIN, 256) == 5004
    assert input_pipeline.steps_per_epoch(512, 256) == 2
    assert input_pipeline.steps_per_epoch(511, 256) == 1


def test_steps_per_epoch_rejects_batch_larger_than_dataset():
    with pytest.raises(DataError, match=r"global_batch_size 256 is larger than the 100 training "
                       "images"):
        input_pipeline.steps_per_epoch(100, 256)


def _indices(step, n=1000, kn=96, seed=0):
    return input_pipeline.train_indices(step, num_examples=n, global_batch_size=kn, seed=seed)


def test_each_epoch_is_one_permutation_divided_into_batches():
    n, kn = 1000, 96
    steps = n // kn  # 10: the last 40 images of each permutation are dropped
    for epoch in range(3):
        seen = np.concatenate([_indices(epoch * steps + t) for t in range(steps)])
        assert len(seen) == steps * kn == len(np.unique(seen))
        expected = np.random.default_rng([0, epoch]).permutation(n)[:steps * kn]
        np.testing.assert_array_equal(seen, expected)
    assert not np.array_equal(_indices(0), _indices(steps))  # a new permutation every epoch
    assert not np.array_equal(_indices(0, seed=0), _indices(0, seed=1))


def test_process_slices_reassemble_the_global_batch():
    """Whatever the number of processes, their contiguous slices are the same global batch."""
    batch = _indices(7)
    for processes in (1, 2, 4, 8):
        per = len(batch) // processes
        parts = [batch[slice(p * per, (p + 1) * per)] for p in range(processes)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)


def _in_memory(images, labels):
    split = ArraySource(images, labels)
    return Dataset("test", train=split, eval=split, num_classes=1000,
                                  mean=(0.0,), std=(1.0,), image_shape=images.shape[1:])


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """A prepared folder dataset of real JPEGs: 3 classes x 8 train images (80x60), 9 val."""
    root = write_image_folder(tmp_path_factory.mktemp("photos"))
    data_dir = tmp_path_factory.mktemp("tfds")

    def load(**overrides):
        return load_dataset(folder_config(root, data_dir, **overrides))

    load.root = root
    return load


def _take(batches, count):
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize("kind", ["in_memory", "tfds_folder"])
def test_resuming_at_a_step_gives_the_same_batches(kind, photos):
    if kind == "in_memory":
        n = 1000
        dataset = _in_memory(np.zeros((n, 1, 1, 1), np.uint8), np.arange(n, dtype=np.int32))
        kn = 96
    else:
        dataset, n, kn = photos(), 24, 8  # 3 steps per epoch: 15 steps are 5 epochs
    kwargs = dict(global_batch_size=kn, seed=3)
    mesh = parallel.make_mesh()
    batches = jax.device_get(_take(input_pipeline.train_batches(dataset, mesh, **kwargs), 15))
    resumed = input_pipeline.train_batches(dataset, mesh, start_step=12, **kwargs)
    for expected, got in zip(batches[12:], jax.device_get(_take(resumed, 3)), strict=True):
        np.testing.assert_array_equal(got["label"], expected["label"])
        np.testing.assert_array_equal(got["image"], expected["image"])
    key = "label" if kind == "in_memory" else "image"
    assert not np.array_equal(batches[0][key], batches[3][key])  # not a comparison of constants


def test_eval_covers_every_image_exactly_once():
    n, batch_size = 1000, 96  # 10 full batches and a last one padded from 40 to 96
    dataset = _in_memory(np.zeros((n, 2, 2, 1), np.uint8), np.arange(n, dtype=np.int32))
    labels, masks = [], []
    for half in (slice(0, 48), slice(48, 96)):  # two processes' rows
        batches = [input_pipeline.read_eval_rows(dataset, start, batch_size=batch_size, rows=half)
                   for start in range(0, n, batch_size)]
        assert all(len(b["label"]) == 48 for b in batches)
        labels.append(np.concatenate([b["label"] for b in batches]))
        masks.append(np.concatenate([b["mask"] for b in batches]))
    real = np.concatenate([lab[m] for lab, m in zip(labels, masks, strict=True)])
    np.testing.assert_array_equal(np.sort(real), np.arange(n))


def _per_device_batches(dataset, *, processes, devices_per_process, steps, kn=16, seed=5):
    """For each step, the images each device holds when `processes` processes each read their
    own rows (process_rows_for) and split them over their devices."""
    per_step = []
    for step in range(steps):
        local = [input_pipeline.read_train_rows(
            dataset, step, global_batch_size=kn, seed=seed,
            rows=parallel.process_rows_for(kn, processes, p)) for p in range(processes)]
        per_step.append([(images, labels) for batch in local for images, labels in zip(
            np.split(batch["image"], devices_per_process),
            np.split(batch["label"], devices_per_process), strict=True)])
    return per_step


def test_one_process_of_8_devices_and_two_of_4_see_the_same_images_per_step(photos):
    """Remark 4 on any layout: the same images in the same order on each of the 8 devices
    (so the same BN groups), augmented identically, whether 1 or 2 processes read them."""
    dataset = photos()
    kn, steps = 16, 4  # 24 train images: one step per epoch, so 4 permutations
    one = _per_device_batches(dataset, processes=1, devices_per_process=8, steps=steps)
    two = _per_device_batches(dataset, processes=2, devices_per_process=4, steps=steps)
    for step in range(steps):
        assert len(one[step]) == len(two[step]) == 8
        for (images_1, labels_1), (images_2, labels_2) in zip(one[step], two[step], strict=True):
            np.testing.assert_array_equal(images_1, images_2)
            np.testing.assert_array_equal(labels_1, labels_2)
        # The step's images are perm_e[t * kn : (t + 1) * kn]; image i is of class i // 8.
        expected = np.random.default_rng([5, step]).permutation(24)[:kn] // 8
        np.testing.assert_array_equal(np.concatenate([lab for _, lab in one[step]]), expected)
    assert parallel.process_rows_for(kn, 2, 1) == slice(8, 16)
    assert parallel.process_rows(kn, parallel.make_mesh()) == parallel.process_rows_for(
        kn, 1, jax.process_index())


def test_random_size_crop_draws_area_and_aspect_as_in_sec_5_1():
    height, width = 375, 500
    boxes = np.array([augment.random_size_crop(height, width, np.random.default_rng(i))
                      for i in range(2000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area, aspect = h * w / (height * width), w / h
    assert area.min() > 0.08 - 0.01 and area.max() <= 1.0
    assert area.min() < 0.1 and np.median(area) > 0.3  # the whole range is drawn
    assert (aspect > 3 / 4 - 0.02).all() and (aspect < 4 / 3 + 0.02).all()
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    assert 0.4 < np.mean(left + w / 2 < width / 2) < 0.6  # positions uniform, not centered


def test_random_size_crop_falls_back_to_a_center_crop_of_bounded_aspect():
    # A 10 x 1000 strip: no crop of 8%+ of its area fits with aspect ratio <= 4/3.
    box = augment.random_size_crop(10, 1000, np.random.default_rng(0))
    w = round(10 * 4 / 3)
    assert box == (0, (1000 - w) // 2, 10, w)
    assert augment.random_size_crop(10, 12, np.random.default_rng(0))[2:] in [
        (h, w) for h in range(1, 11) for w in range(1, 13)]


def test_train_image_is_the_drawn_crop_resized_and_flipped_by_the_next_draw(tmp_path):
    """Against an independent decode: full image, crop the drawn box, resize, flip if drawn."""
    photo = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    photo[:, :40] //= 4  # a dark left half, so a flip is visible
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")  # lossless: decoding is exact
    record = {"image": buffer.getvalue()}
    flips = 0
    for seed in range(40):
        got = augment.train_image(record, np.random.default_rng(seed), size=24)
        rng = np.random.default_rng(seed)
        top, left, h, w = augment.random_size_crop(60, 80, rng)
        expected = np.asarray(Image.fromarray(photo).resize(
            (24, 24), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))
        if rng.random() < 0.5:
            expected, flips = expected[:, ::-1], flips + 1
        np.testing.assert_array_equal(got, expected)
    assert 10 < flips < 30


def test_augmentation_depends_only_on_seed_epoch_and_index(photos):
    source = photos().train
    first = source.read(np.array([3, 17, 5]), seed=1, epoch=2)["image"]
    again = source.read(np.array([5, 3, 17]), seed=1, epoch=2)["image"]  # other batch, order
    np.testing.assert_array_equal(again, first[[2, 0, 1]])
    for other in ({"seed": 1, "epoch": 3}, {"seed": 2, "epoch": 2}):
        assert not np.array_equal(source.read(np.array([3, 17, 5]), **other)["image"], first)


def test_eval_resize_keeps_the_paper_ratio():
    assert round(224 * augment.EVAL_RESIZE) == 256
    assert math.isclose(augment.EVAL_RESIZE, 256 / 224)


def _shifts(out, pixels):
    """Every (top, left, flip) for which `out` is `pixels` zero-padded by 4, cropped at
    (top, left) and maybe mirrored: the CIFAR recipe, written out independently."""
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((4, 4), (4, 4), (0, 0)))
    return [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
            if np.array_equal(out[:, ::-1] if flip else out,
                              padded[top:top + height, left:left + width])]


def test_pad_crop_is_a_shift_of_at_most_4_pixels_with_zeros_and_a_flip():
    pixels = np.random.default_rng(0).integers(1, 256, (12, 10, 1), dtype=np.uint8)
    seen = set()
    for seed in range(1000):
        matches = _shifts(augment.pad_crop(pixels, np.random.default_rng(seed)), pixels)
        assert matches, seed
        seen.update(matches)
    assert len(seen) >= 160  # (nearly) all 9 x 9 offsets, both ways, are drawn: 162


@pytest.mark.parametrize("name", ["none", "pad_crop"])
def test_small_image_augmentations_keep_the_whole_image(photos, name):
    """`none` and `pad_crop` see the whole photo resized to image_size (no Sec. 5.1 crop);
    only pad_crop's training images move, by at most 4 pixels, maybe mirrored."""
    dataset = photos(augment=name)
    train, evaluation = dataset.train.read(np.arange(24)), dataset.eval.read(np.arange(9))
    for split, batch in (("train", train), ("val", evaluation)):
        files = sorted(photos.root.glob(f"{split}/*/*.jpg"))
        for image, path in zip(batch["image"], files, strict=True):
            whole = np.asarray(Image.open(path).convert("RGB").resize(
                (32, 32), Image.Resampling.BILINEAR))
            if name == "pad_crop" and split == "train":
                assert _shifts(image, whole), path
            else:
                np.testing.assert_array_equal(image, whole)
    if name == "pad_crop":
        again = dataset.train.read(np.arange(24), epoch=1)["image"]
        assert not np.array_equal(train["image"], again)  # drawn anew each epoch
