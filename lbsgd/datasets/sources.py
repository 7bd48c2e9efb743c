"""Random access to a split's images: `len(source)` and `source.read(indices, seed, epoch)`.

Remark 4's global permutation reads any image at any step, so a source is indexed, never
streamed. `read` returns a host-local batch dict, `image` uint8 [rows, H, W, C] and `label`
int32 [rows]; images stay uint8 until they are on the device (4x less host-to-device traffic).

- `ArraySource`: decoded arrays held in memory (small datasets: a record read costs more
  than the image), optionally augmented per image (`pad_crop`).
- `RecordSource`: a prepared TFDS split read by index, each record turned into pixels by a
  transform (datasets/augment.py) on a thread pool; Pillow releases the GIL, and forking
  workers after JAX has started is unsafe.
- `SyntheticSource`: random pixels, to measure compute without input cost.
"""

import concurrent.futures
import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image

from lbsgd.datasets.augment import PixelTransform, Transform
from lbsgd.errors import DataError


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """An in-memory split: `read(indices)` -> a batch dict, each image through `transform`
    (with a generator seeded by (seed, epoch, index)) when there is one."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]
    transform: PixelTransform | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray, *, seed: int = 0,
             epoch: int = 0) -> dict[str, np.ndarray]:
        images = self.images[indices]
        if self.transform is not None:
            images = np.stack([self.transform(image, np.random.default_rng([seed, epoch, int(i)]))
                               for image, i in zip(images, indices, strict=True)])
        return {"image": images, "label": self.labels[indices]}


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


@functools.cache
def _thread_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="lbsgd-decode")


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
                    "replace it (a folder: dataset is prepared again once its files change; "
                    "another dataset: delete its prepared directory to prepare it again)"
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
    """A dataset as training sees it: two sources and what the model needs to know."""

    name: str
    train: Source
    eval: Source
    num_classes: int
    # Per-channel statistics of the training images in pixel units, for normalization.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]  # of the batches fed to the model
