"""An image-folder dataset, PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg, through TFDS.

The folder is converted once into ArrayRecord files under the TFDS data dir (one TFDS dataset
per folder and contents), because Remark 4's global permutation reads any image at any step.
The files' bytes are stored as they are (but 16-bit grayscale PNGs, stored as 8-bit PNGs: the
training decoder would clip them white); each image is also decoded once while converting, so
that corrupt files, empty or stray classes, the smallest image and the per-channel statistics
are known before a run depends on them. Labels are the train class folders in sorted order.

The conversion is keyed by the folder's absolute path and its fingerprint: its listing with
each file's size and modification time, one stat per file at every load. A folder changed
since its conversion is converted again, into a new directory (a run still reading the old
one is not disturbed; the log names it, to be deleted). Conversions run one at a time under a
lock in the data dir: a second run waits for the first, then reads its result.
"""

import concurrent.futures
import dataclasses
import errno
import hashlib
import io
import os
import re
import stat
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from lbsgd.datasets.preparation import (
    check_one_process,
    preparation_lock,
    prepare,
    prepare_command,
    remove_incomplete,
)
from lbsgd.errors import DataError

SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Statistics come from a 1/4-scale decode: libjpeg produces it several times faster, and the
# mean of a block is what the DCT's first coefficient stores, so the mean is unchanged.
STATS_SCALE = 4
# Statistics are summed over strips of this many pixels: float copies of a whole 36-megapixel
# image take 2 GB, a strip's a few MB, so an image costs about its decoded pixels. Images above
# PIL.Image.MAX_IMAGE_PIXELS (89.5 megapixels unless changed) are refused from their header.
STRIP_PIXELS = 1 << 18
# 16-bit grayscale (a 16-bit gray PNG opens as "I;16", in older Pillows "I"): Pillow's
# convert("RGB") clips it at 255, so nearly every pixel turns white; to_8_bit keeps its high byte.
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
UNREADABLE = {errno.ELOOP: "a symbolic link loop", errno.ENOENT: "a broken symbolic link"}
NOT_AN_IMAGE = "not a .jpg, .jpeg or .png file"
LISTED = 10  # files named in one message


@dataclasses.dataclass(frozen=True)
class Listing:
    """The folder as listed: each split's class folders and their image files, the entries
    that are not read (and why), and the fingerprint of it all."""

    classes: dict[str, dict[str, list[str]]]  # split -> class name -> image file names, sorted
    skipped: list[tuple[str, str]]  # (path relative to the folder, why it is not read)
    fingerprint: str  # sha256 of every entry's path, size and modification time

    def paths(self, root: Path, split: str) -> dict[str, list[Path]]:
        return {name: [root / split / name / file for file in files]
                for name, files in self.classes[split].items()}


def _status(path: str) -> os.stat_result | str:
    """The entry's stat, following symbolic links, or why it cannot be followed."""
    try:
        return os.stat(path)
    except OSError as e:
        return UNREADABLE.get(e.errno, f"unreadable ({e.strerror})")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _entries(root: Path, relative: str, digest) -> list[tuple[str, os.stat_result | str]]:
    """(name, stat or why not) of the entries of root/relative, sorted, each added to
    `digest`. Hidden entries that are not images (.DS_Store, .ipynb_checkpoints) are left out,
    so that browsing the folder does not change it. Strings, not Paths: this runs for every
    file at every load (ImageNet: 1.3 million)."""
    directory = os.path.join(root, relative)
    entries = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") and not _is_image_name(name):
            continue
        status = _status(os.path.join(directory, name))
        if isinstance(status, str):
            signature = status
        elif stat.S_ISDIR(status.st_mode):
            signature = "folder"  # its entries are listed, or it is skipped
        else:
            signature = f"{status.st_size} {status.st_mtime_ns}"
        digest.update(f"{relative}/{name}\t{signature}\n".encode())
        entries.append((name, status))
    return entries


def _why_not_read(name: str, status: os.stat_result | str) -> str:
    """Why an entry of a class folder is not one of its images ("" when it is)."""
    if isinstance(status, str):
        return status
    if stat.S_ISDIR(status.st_mode):
        return "a folder inside a class folder (only the class folder's own files are read)"
    if not _is_image_name(name):
        return NOT_AN_IMAGE
    return "" if stat.S_ISREG(status.st_mode) else "not a regular file"


def list_folder(root: Path) -> Listing:
    """List both splits with one stat per entry; a missing split or an empty class stops here."""
    digest = hashlib.sha256()
    classes, skipped = {}, []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"folder dataset {root} has no {split}/ directory: expected "
                            f"{root}/train/CLASS/*.jpg and {root}/val/CLASS/*.jpg")
        classes[split] = {}
        for class_name, status in _entries(root, split, digest):
            if isinstance(status, str) or not stat.S_ISDIR(status.st_mode):
                why = status if isinstance(status, str) else "not in a class folder"
                skipped.append((f"{split}/{class_name}", why))
                continue
            files = []
            for name, file_status in _entries(root, f"{split}/{class_name}", digest):
                why = _why_not_read(name, file_status)
                if why:
                    skipped.append((f"{split}/{class_name}/{name}", why))
                else:
                    files.append(name)
            if not files:
                raise DataError(f"class folder {split_dir / class_name} has no images "
                                f"({', '.join(IMAGE_SUFFIXES)}): add its images or delete the "
                                "folder")
            classes[split][class_name] = files
        if not classes[split]:
            raise DataError(f"{split_dir} has no class folders: expected "
                            f"{split_dir}/CLASS/*.jpg")
    return Listing(classes, skipped, digest.hexdigest())


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit "L", keeping each value's high byte (v >> 8 undoes
    the 8- to 16-bit scaling v * 257); any other image as it is."""
    if image.mode not in SIXTEEN_BIT:
        return image
    pixels = np.asarray(image)
    if image.mode == "I":  # 32-bit signed, holding 16-bit values
        pixels = np.clip(pixels, 0, 65535)
    return Image.fromarray((pixels >> 8).astype(np.uint8))


def _pixel_sums(image: Image.Image) -> np.ndarray:
    """[3 channels, (count, sum, sum of squares)] of the image as RGB, a strip at a time."""
    image.load()
    rows = max(1, STRIP_PIXELS // image.width)
    sums = np.zeros((3, 3))
    for top in range(0, image.height, rows):
        strip = image.crop((0, top, image.width, min(top + rows, image.height)))
        pixels = np.asarray(to_8_bit(strip).convert("RGB"), np.int64).reshape(-1, 3)
        sums += np.stack([np.full(3, len(pixels)), pixels.sum(0), (pixels**2).sum(0)], axis=1)
    return sums


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What decoding one file told: its size and per-channel pixel sums, or why it failed."""

    height: int = 0
    width: int = 0
    sums: np.ndarray | None = None  # [3 channels, (count, sum, sum of squares)]
    error: str = ""
    sixteen_bit: bool = False  # stored as 8 bits (to_8_bit)


def _too_large(width: int, height: int, decoded: int) -> str:
    """Why an image is refused before decoding `decoded` pixels of it ("" when it is not)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or decoded <= limit:
        return ""
    return (f"{width}x{height} = {width * height:,} pixels, above the limit of {limit:,} "
            "(PIL.Image.MAX_IMAGE_PIXELS): downscale it")


def inspect_image(path: Path) -> Inspection:
    try:
        with Image.open(path) as image:  # reads the header only
            height, width = image.height, image.width
            image.draft("RGB", (max(1, width // STATS_SCALE), max(1, height // STATS_SCALE)))
            # A JPEG decodes at 1/4 scale (draft), as in training; any other image whole.
            too_large = _too_large(width, height, image.width * image.height)
            if too_large:
                return Inspection(error=too_large)
            sums = _pixel_sums(image)
            sixteen_bit = image.mode in SIXTEEN_BIT
    except DECODE_ERRORS as e:
        return Inspection(error=f"{type(e).__name__}: {e}")
    return Inspection(height, width, sums, sixteen_bit=sixteen_bit)


@dataclasses.dataclass(frozen=True)
class Scan:
    """A checked folder: the readable images of each split with labels, and its metadata."""

    files: dict[str, list[tuple[Path, int]]]  # split -> [(path, label)]
    corrupt: list[tuple[str, str]]  # (path relative to the folder, why it cannot be decoded)
    # class_names, mean, std, smallest image per split, corrupt files skipped, other files
    # skipped with why, 16-bit files stored as 8 bits, the folder's fingerprint
    metadata: dict
    sixteen_bit: frozenset[Path] = frozenset()  # stored as 8-bit PNGs


def _smallest(root: Path, files: list[tuple[Path, int]], inspections: dict) -> dict:
    path = min((p for p, _ in files),
               key=lambda p: min(inspections[p].height, inspections[p].width))
    return {"file": path.relative_to(root).as_posix(), "height": inspections[path].height,
            "width": inspections[path].width}


def scan_folder(root: Path, listing: Listing, *, threads: int) -> Scan:
    """Decode every listed image once (on `threads` threads) and check the folder's layout."""
    listed = {split: listing.paths(root, split) for split in SPLITS}
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
        "skipped_files": [[rel, why] for rel, why in listing.skipped],
        "stored_as_8_bit": [p.relative_to(root).as_posix() for p in paths
                            if inspections[p].sixteen_bit],
        "fingerprint": listing.fingerprint,
    }
    sixteen_bit = frozenset(p for p in paths if inspections[p].sixteen_bit)
    return Scan(files, corrupt, metadata, sixteen_bit)


def corrupt_images_error(root: Path, corrupt: list[tuple[str, str]],
                         prepared_dir: str | None = None) -> DataError:
    lines = [f"{rel}: {why}" if why else rel for rel, why in corrupt[:LISTED]]
    if len(corrupt) > LISTED:
        lines.append(f"... and {len(corrupt) - LISTED} more")
    again = (f" ({prepared_dir} was prepared without them; the folder is prepared again once "
             "it changes)" if prepared_dir else "")
    return DataError(
        f"folder dataset {root}: {len(corrupt)} image(s) cannot be decoded:\n    "
        + "\n    ".join(lines)
        + f"\n  replace or delete them{again}, or set --config.skip_corrupt_images=True to "
        "train without them")


def folder_key(root: Path) -> str:
    """The start of every TFDS config of one folder: its name, made safe, and a hash of its
    absolute path."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    stem = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_") or "folder"
    return f"{stem}_{digest}"


def config_name(root: Path, fingerprint: str) -> str:
    """One TFDS config per folder and contents: a changed folder is a new dataset."""
    return f"{folder_key(root)}_{fingerprint[:12]}"


class LbsgdImageFolder(tfds.core.GeneratorBasedBuilder):
    """PATH/{train,val}/CLASS/image files -> ArrayRecord splits `train` and `val`.

    Each example holds the file's original bytes (16-bit grayscale PNGs: 8-bit ones), its
    label and its path relative to the folder (so a bad image can be named). `fingerprint`
    (from `list_folder`) names the contents; `scan` (from `scan_folder`) is needed only to
    prepare; a prepared dataset restores everything from its files.
    """

    name = "lbsgd_image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original file bytes, label from the sorted class folders."}

    def __init__(self, *, folder: Path, fingerprint: str, scan: Scan | None = None, **kwargs):
        self._folder = Path(folder)
        self._scan = scan
        config = tfds.core.BuilderConfig(name=config_name(self._folder, fingerprint),
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
            image = _png_8_bit(path) if path in self._scan.sixteen_bit else path.read_bytes()
            yield relative, {"image": image, "label": label, "file_name": relative}


def _png_8_bit(path: Path) -> bytes:
    """A 16-bit grayscale image as 8-bit PNG bytes. Converted here, once, rather than at
    every read: the training decoder (augment.py) then only ever sees 8-bit images, and
    training feeds uint8 pixels, so the low byte was never going to reach the model."""
    with Image.open(path) as image:
        buffer = io.BytesIO()
        to_8_bit(image).save(buffer, "PNG")
    return buffer.getvalue()


def _builder(root: Path, fingerprint: str, data_dir: str, **kwargs) -> LbsgdImageFolder:
    return LbsgdImageFolder(folder=root, fingerprint=fingerprint, data_dir=data_dir,
                            file_format="array_record", **kwargs)


def _earlier_preparations(root: Path, data_dir: str, builder: LbsgdImageFolder) -> list[Path]:
    """The folder's prepared datasets of other (earlier) contents, oldest first (a name
    without a fingerprint is a preparation from before fingerprints)."""
    key = folder_key(root)
    found = [d for d in (Path(data_dir) / LbsgdImageFolder.name).glob(f"{key}*")
             if re.fullmatch(re.escape(key) + r"(_[0-9a-f]{12})?", d.name)
             and d.name != builder.builder_config.name and any(d.glob("*/dataset_info.json"))]
    return sorted(found, key=lambda d: d.stat().st_mtime)


def _prepare(root: Path, *, data_dir: str, skip_corrupt: bool,
             threads: int) -> LbsgdImageFolder:
    """Scan and convert the folder as it is now (listed again: waiting for the lock may have
    taken hours); only under `preparation_lock`."""
    listing = list_folder(root)
    builder = _builder(root, listing.fingerprint, data_dir)
    if builder.is_prepared():  # by another process, while this one waited for the lock
        return builder
    remove_incomplete(Path(data_dir) / LbsgdImageFolder.name)
    scan = scan_folder(root, listing, threads=threads)
    if scan.corrupt and not skip_corrupt:
        raise corrupt_images_error(root, scan.corrupt)
    builder = _builder(root, listing.fingerprint, data_dir, scan=scan)
    earlier = _earlier_preparations(root, data_dir, builder)
    if earlier:
        logging.info("folder dataset %s changed since it was prepared in %s: it is prepared "
                     "again, in %s (delete the old directory to free its space)", root,
                     earlier[-1], builder.data_dir)
    else:
        logging.info("Converting %s to ArrayRecord files in %s (once)", root, builder.data_dir)
    prepare(builder)
    return builder


def _log_skipped(root: Path, what: str, files: list[str]) -> None:
    if files:
        more = f" and {len(files) - LISTED} more" if len(files) > LISTED else ""
        logging.warning("folder dataset %s: %d %s skipped (not in the dataset): %s%s", root,
                        len(files), what, ", ".join(files[:LISTED]), more)


def load(folder: str, *, data_dir: str, skip_corrupt: bool, threads: int,
         multi_process: bool) -> LbsgdImageFolder:
    """The prepared TFDS dataset of `folder` as it is now, converted on first use (and again
    after a change) by a one-process run."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"dataset folder:{folder}: {root} is not a directory; expected "
                        "folder:PATH with PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg")
    listing = list_folder(root)
    builder = _builder(root, listing.fingerprint, data_dir)
    if not builder.is_prepared():
        earlier = _earlier_preparations(root, data_dir, builder)
        if multi_process and earlier:
            raise DataError(f"folder:{folder} changed since it was prepared in {earlier[-1]}: "
                            "prepare it again before a multi-process run with\n    "
                            f"{prepare_command(f'folder:{folder}', data_dir)}")
        check_one_process(f"folder:{folder}", data_dir, multi_process)
        with preparation_lock(data_dir, LbsgdImageFolder.name):
            builder = _prepare(root, data_dir=data_dir, skip_corrupt=skip_corrupt,
                               threads=threads)
    metadata = builder.info.metadata
    skipped = list(metadata["corrupt_skipped"])
    if skipped and not skip_corrupt:
        raise corrupt_images_error(root, [(rel, "") for rel in skipped], builder.data_dir)
    _log_skipped(root, "corrupt image(s)", skipped)
    _log_skipped(root, "file(s)", [f"{rel} ({why})" for rel, why in metadata["skipped_files"]])
    return builder
