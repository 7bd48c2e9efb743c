"""ImageNet (ILSVRC2012) through TFDS's own `imagenet2012` builder, stored as ArrayRecord.

ImageNet cannot be downloaded by a program: the two official archives go in TFDS's manual dir,
DATA_DIR/downloads/manual, and are converted once (hours) into ArrayRecord files, which give
the random access that Remark 4's global permutation needs.
"""

from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from lbsgd.datasets.preparation import check_one_process, prepare, prepare_command
from lbsgd.errors import DataError

# The official archives and their sizes in bytes: a smaller file is an unfinished download.
ARCHIVES = {"ILSVRC2012_img_train.tar": 147_897_477_120, "ILSVRC2012_img_val.tar": 6_744_924_160}
SPLITS = ("train", "validation")
# Per-channel mean and std of the ImageNet training images (RGB, pixel units): those of
# fb.resnet.torch, whose normalization the paper follows (Sec. 5.1, "as in [12]").
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def manual_dir_problems(manual_dir: Path) -> list[str]:
    problems = []
    for name, size in ARCHIVES.items():
        path = manual_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} is {path.stat().st_size:,} bytes, the official archive "
                            f"{size:,}: the download is incomplete")
    return problems


def load(data_dir: str, *, multi_process: bool, manual_dir: str = "") -> tfds.core.DatasetBuilder:
    """The prepared `imagenet2012` builder; prepared here on first use in a one-process run,
    from the archives in `manual_dir` (default: DATA_DIR/downloads/manual)."""
    builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    manual_dir = Path(manual_dir) if manual_dir else Path(data_dir) / "downloads" / "manual"
    command = prepare_command("imagenet2012", data_dir)
    if not builder.is_prepared():
        problems = manual_dir_problems(manual_dir)
        if problems:
            raise DataError(
                f"imagenet2012 is not prepared in {data_dir} and its manual dir is not ready: "
                + "; ".join(problems) + ".\n"
                f"  Put {' and '.join(ARCHIVES)} (from image-net.org, ILSVRC2012) in "
                f"{manual_dir}, then prepare them once (hours; about 150 GB more disk) with\n"
                f"    {command}")
        check_one_process("imagenet2012", data_dir, multi_process)
        logging.warning("Preparing imagenet2012 in %s from %s: hours, once", data_dir, manual_dir)
        prepare(builder, manual_dir=manual_dir)
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DataError(
            f"imagenet2012 in {builder.data_dir} is stored as {builder.info.file_format.value}, "
            f"which has no random access: move it away and run\n    {command}")
    return builder
