"""What every dataset's one-time TFDS preparation shares: offline options, the command, and
the rule that only a one-process run prepares on first use."""

import tensorflow_datasets as tfds

from lbsgd.errors import DataError


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
