"""Fashion-MNIST (Xiao et al. 2017) as a TFDS dataset of our own, from its four IDX files.

60,000 train / 10,000 test 28x28 grayscale images of 10 kinds of clothing, 6,000 / 1,000 per
class, MIT license. Nothing is downloaded: the files come from Debian's package
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist) or from any directory holding the
four files as Zalando publishes them (gzipped or not), named by `config.manual_dir`. They are
read once, checked (IDX headers, sizes, label range, every class equally represented) and
written as ArrayRecord under the TFDS data dir, with the training pixels' mean and std.
"""

import gzip
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from lbsgd.datasets.preparation import check_one_process, prepare, prepare_command
from lbsgd.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# split -> (images file, labels file), without the ".gz" that the published files carry.
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
_IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def missing_files_message(directories: list[Path], data_dir: str) -> str:
    listed = ", ".join(str(d) for d in directories)
    names = ", ".join(f"{f}.gz" for pair in FILES.values() for f in pair)
    return (f"fashion_mnist is not prepared in {data_dir} and its four files ({names}) are not "
            f"in {listed}: install them with `apt-get install dataset-fashion-mnist` (into "
            f"{DEBIAN_DIR}), or put the files published by Zalando "
            "(github.com/zalandoresearch/fashion-mnist) in a directory and pass "
            "--config.manual_dir=DIR")


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `dims` dimensions, checked against its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} cannot be read ({e}): replace it with the published file") \
            from None
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    if magic != (_IDX_UBYTE << 8 | dims):
        raise DataError(f"{path} is not an IDX file of {dims}-D unsigned bytes (header "
                        f"{data[:4].hex() or 'empty'}): replace it with the published file")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    body = data[4 + 4 * dims:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path} declares {shape} = {int(np.prod(shape))} bytes but holds "
                        f"{len(body)}: the file is truncated or damaged")
    return np.frombuffer(body, np.uint8).reshape(shape)


def read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels int64 [N]) of `split`, with its content checked."""
    images_name, labels_name = FILES[split]
    images = read_idx(_find(directory, images_name), 3)
    labels = read_idx(_find(directory, labels_name), 1).astype(np.int64)
    where = f"fashion_mnist {split} ({directory})"
    if images.shape[1:] != (28, 28):
        raise DataError(f"{where}: images are {images.shape[1:]}, not 28x28")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{where}: labels span [{labels.min()}, {labels.max()}], outside the "
                        f"{len(CLASS_NAMES)} classes")
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    if len(set(counts.tolist())) != 1:  # the published splits hold 6,000 / 1,000 per class
        raise DataError(f"{where}: images per class {counts.tolist()} are not all equal, "
                        "unlike the published files: replace them")
    return images[..., None], labels


class LbsgdFashionMnist(tfds.core.GeneratorBasedBuilder):
    """train / test splits in the files' order; raw 28x28x1 pixels (a record read would cost
    more than decoding a PNG of this size)."""

    name = "lbsgd_fashion_mnist"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The four IDX files, checked, in their order."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = missing_files_message([DEBIAN_DIR], "the data dir")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        directory = Path(dl_manager.manual_dir)
        splits = {split: read_split(directory, split) for split in FILES}
        train_pixels = splits["train"][0].astype(np.float64)
        self.info.metadata["mean"] = [float(train_pixels.mean())]
        self.info.metadata["std"] = [float(train_pixels.std())]
        self.info.metadata["source"] = str(directory)
        return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


def load(data_dir: str, *, manual_dir: str, multi_process: bool) -> LbsgdFashionMnist:
    """The prepared dataset; prepared here on first use in a one-process run, from
    `manual_dir`, or else the Debian package's directory, or else DATA_DIR/downloads/manual."""
    builder = LbsgdFashionMnist(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    candidates = ([Path(manual_dir).expanduser()] if manual_dir else
                  [DEBIAN_DIR, Path(data_dir) / "downloads" / "manual"])
    found = [d for d in candidates
             if all(_find(d, name) for pair in FILES.values() for name in pair)]
    if not found:
        raise DataError(missing_files_message(candidates, data_dir))
    check_one_process("fashion_mnist", data_dir, multi_process)
    logging.info("Preparing fashion_mnist in %s from %s (once; %s does the same)", data_dir,
                 found[0], prepare_command("fashion_mnist", data_dir))
    prepare(builder, manual_dir=str(found[0]))
    return builder
