"""An image-folder dataset, PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg, through TFDS.

The folder is converted once into ArrayRecord files under the TFDS data dir (one TFDS dataset
per folder), because Remark 4's global permutation reads any image at any step. The files'
bytes are stored as they are; each image is also decoded once while converting, so that
corrupt files, empty or stray classes, the smallest image and the per-channel statistics are
known before a run depends on them. Labels are the train class folders in sorted order.

The conversion is keyed by the folder's absolute path: after changing the folder, delete the
prepared directory (it is logged when written) to convert it again.
"""

import concurrent.futures
import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from lbsgd.datasets.preparation import check_one_process, prepare_config
from lbsgd.errors import DataError

SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Statistics come from a 1/4-scale decode: libjpeg produces it several times faster, and the
# mean of a block is what the DCT's first coefficient stores, so the mean is unchanged.
STATS_SCALE = 4
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
LISTED = 10  # files named in one message


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What decoding one file told: its size and per-channel pixel sums, or why it failed."""

    height: int = 0
    width: int = 0
    sums: np.ndarray | None = None  # [3 channels, (count, sum, sum of squares)]
    error: str = ""


def inspect_image(path: Path) -> Inspection:
    try:
        with Image.open(path) as image:
            height, width = image.height, image.width
            image.draft("RGB", (max(1, width // STATS_SCALE), max(1, height // STATS_SCALE)))
            pixels = np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3)
    except DECODE_ERRORS as e:
        return Inspection(error=f"{type(e).__name__}: {e}")
    sums = np.stack([np.full(3, float(len(pixels))), pixels.sum(0), (pixels**2).sum(0)], axis=1)
    return Inspection(height, width, sums)


@dataclasses.dataclass(frozen=True)
class Scan:
    """A checked folder: the readable images of each split with labels, and its metadata."""

    files: dict[str, list[tuple[Path, int]]]  # split -> [(path, label)]
    corrupt: list[tuple[str, str]]  # (path relative to the folder, why it cannot be decoded)
    metadata: dict  # class_names, mean, std, smallest image per split, corrupt files skipped


def _class_folders(root: Path, split: str) -> dict[str, list[Path]]:
    """Class name -> its image files; a missing split or an empty class stops here."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"folder dataset {root} has no {split}/ directory: expected "
                        f"{root}/train/CLASS/*.jpg and {root}/val/CLASS/*.jpg")
    classes = {}
    for class_dir in sorted(p for p in split_dir.iterdir()
                            if p.is_dir() and not p.name.startswith(".")):  # .ipynb_checkpoints
        files = sorted(p for p in class_dir.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES)})"
                            ": add its images or delete the folder")
        classes[class_dir.name] = files
    if not classes:
        raise DataError(f"{split_dir} has no class folders: expected {split_dir}/CLASS/*.jpg")
    return classes


def _smallest(root: Path, files: list[tuple[Path, int]], inspections: dict) -> dict:
    path = min((p for p, _ in files),
               key=lambda p: min(inspections[p].height, inspections[p].width))
    return {"file": path.relative_to(root).as_posix(), "height": inspections[path].height,
            "width": inspections[path].width}


def scan_folder(root: Path, *, threads: int) -> Scan:
    """List and decode every image once (on `threads` threads) and check the folder's layout."""
    listed = {split: _class_folders(root, split) for split in SPLITS}
    class_names = sorted(listed["train"])
    stray = sorted(set(listed["val"]) - set(class_names))
    if stray:
        raise DataError(
            f"{root}/val has class folders that {root}/train lacks: {stray}; their labels would "
            f"fall outside the {len(class_names)} training classes: add them to train/ or "
            "remove them from val/")
    label = {name: i for i, name in enumerate(class_names)}
    labeled = {split: [(path, label[name]) for name, paths in classes.items() for path in paths]
               for split, classes in listed.items()}
    paths = [path for split in SPLITS for path, _ in labeled[split]]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        inspections = dict(zip(paths, pool.map(inspect_image, paths), strict=True))
    corrupt = [(p.relative_to(root).as_posix(), inspections[p].error) for p in paths
               if inspections[p].error]
    files = {split: [(p, lab) for p, lab in labeled[split] if not inspections[p].error]
             for split in SPLITS}
    for split in SPLITS:
        if not files[split]:
            raise DataError(f"{root}/{split}: none of its {len(labeled[split])} images can be "
                            f"decoded ({corrupt[0][0]}: {corrupt[0][1]}): replace them")
    count, total, squares = sum(inspections[p].sums for p, _ in files["train"]).T
    mean = total / count
    metadata = {
        "folder": str(root),
        "class_names": class_names,
        "mean": mean.tolist(),
        "std": np.sqrt(np.maximum(squares / count - mean**2, 0.0)).tolist(),
        "smallest": {split: _smallest(root, files[split], inspections) for split in SPLITS},
        "corrupt_skipped": [rel for rel, _ in corrupt],
    }
    return Scan(files, corrupt, metadata)


def corrupt_images_error(root: Path, corrupt: list[tuple[str, str]],
                         prepared_dir: str | None = None) -> DataError:
    lines = [f"{rel}: {why}" if why else rel for rel, why in corrupt[:LISTED]]
    if len(corrupt) > LISTED:
        lines.append(f"... and {len(corrupt) - LISTED} more")
    again = f", delete {prepared_dir} to convert the folder again" if prepared_dir else ""
    return DataError(
        f"folder dataset {root}: {len(corrupt)} image(s) cannot be decoded:\n    "
        + "\n    ".join(lines)
        + f"\n  replace or delete them{again}, or set --config.skip_corrupt_images=True to "
        "train without them")


def config_name(root: Path) -> str:
    """One TFDS config per folder: its name, made safe, and a hash of its absolute path."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    stem = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_") or "folder"
    return f"{stem}_{digest}"


class LbsgdImageFolder(tfds.core.GeneratorBasedBuilder):
    """PATH/{train,val}/CLASS/image files -> ArrayRecord splits `train` and `val`.

    Each example holds the file's original bytes (no re-encoding), its label and its path
    relative to the folder (so a bad image can be named). `scan` (from `scan_folder`) is
    needed only to prepare; a prepared dataset restores everything from its files.
    """

    name = "lbsgd_image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original file bytes, label from the sorted class folders."}

    def __init__(self, *, folder: Path, scan: Scan | None = None, **kwargs):
        self._folder = Path(folder)
        self._scan = scan
        config = tfds.core.BuilderConfig(name=config_name(self._folder),
                                         description=str(self._folder))
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        names = self._scan.metadata["class_names"] if self._scan else None
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "label": tfds.features.ClassLabel(names=names),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # index i is the i-th file in sorted order
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        if self._scan is None:
            raise ValueError("LbsgdImageFolder needs scan=scan_folder(...) to prepare")
        self.info.metadata.update(self._scan.metadata)
        return {split: self._generate_examples(self._scan.files[split]) for split in SPLITS}

    def _generate_examples(self, files):
        for path, label in files:
            relative = path.relative_to(self._folder).as_posix()
            yield relative, {"image": path.read_bytes(), "label": label, "file_name": relative}


def load(folder: str, *, data_dir: str, skip_corrupt: bool, threads: int,
         multi_process: bool) -> LbsgdImageFolder:
    """The prepared TFDS dataset of `folder`, converted on first use by a one-process run."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"dataset folder:{folder}: {root} is not a directory; expected "
                        "folder:PATH with PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg")
    builder = LbsgdImageFolder(folder=root, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        check_one_process(f"folder:{folder}", data_dir, multi_process)
        scan = scan_folder(root, threads=threads)
        if scan.corrupt and not skip_corrupt:
            raise corrupt_images_error(root, scan.corrupt)
        builder = LbsgdImageFolder(folder=root, scan=scan, data_dir=data_dir,
                                   file_format="array_record")
        logging.info("Converting %s to ArrayRecord files in %s (once)", root, builder.data_dir)
        builder.download_and_prepare(download_config=prepare_config())
    skipped = list(builder.info.metadata["corrupt_skipped"])
    if skipped and not skip_corrupt:
        raise corrupt_images_error(root, [(rel, "") for rel in skipped], builder.data_dir)
    if skipped:
        logging.warning("folder dataset %s: %d corrupt image(s) skipped (not in the dataset): %s",
                        root, len(skipped), ", ".join(skipped[:LISTED]))
    return builder
