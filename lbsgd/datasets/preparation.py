"""What every dataset's one-time TFDS preparation shares: offline options, the command, the
rule that only a one-process run prepares on first use, and the lock that lets one of several
processes prepare while the others wait."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from lbsgd.errors import DataError

# TFDS writes a preparation into DIR/incomplete.XXXXXX_VERSION and renames it when it is done
# (tfds.core.constants.INCOMPLETE_PREFIX); a killed preparation leaves it behind.
INCOMPLETE = "incomplete.*"


def prepare_config(**kwargs) -> tfds.download.DownloadConfig:
    """Offline preparation, without TFDS's statistics pass (it reads every example again and
    nothing here uses it)."""
    return tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP,
                                        try_download_gcs=False, **kwargs)


def prepare(builder: tfds.core.DatasetBuilder, **download_config) -> None:
    """`builder.download_and_prepare`, offline, saying what happens in our words. TFDS prints
    "Downloading and preparing dataset Unknown size ..." and "... downloaded and prepared"
    (nothing is downloaded: every lbsgd dataset is built from local files, and TFDS knows no
    size before it has written them); those go to stdout, which is kept from the console
    during the preparation. Its progress bars (stderr) stay: ImageNet's takes hours."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(download_config=prepare_config(**download_config))
    logging.info("prepared %s in %s (%.0f s, from local files); later runs read it from there",
                 builder.name, builder.data_dir, time.perf_counter() - started)


def prepare_command(dataset: str, data_dir: str) -> str:
    """The command that prepares `dataset` once (lbsgd/datasets/__main__.py)."""
    return f"python -m lbsgd.datasets {dataset} --data_dir={data_dir}"


def check_one_process(dataset: str, data_dir: str, multi_process: bool) -> None:
    """Only a one-process run prepares a dataset on first use: in a multi-process run every
    process would convert the same data into the same directory."""
    if multi_process:
        raise DataError(f"{dataset} is not prepared in {data_dir}: prepare it once before a "
                        f"multi-process run with\n    {prepare_command(dataset, data_dir)}")


@contextlib.contextmanager
def preparation_lock(data_dir: str, name: str) -> Iterator[None]:
    """Held while preparing builder `name`: DATA_DIR/NAME.lock, next to DATA_DIR/NAME/.

    Two runs that prepare the same dataset at once would both write it, and the second to
    finish crashes renaming its copy onto the first one's: here the second waits, then finds
    the dataset prepared. The lock belongs to the open file, so the kernel releases it when
    its process dies, even by kill -9; the file stays, harmlessly (removing it would let a
    third process lock a new file while the second still holds the old one).
    """
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"{name}.lock")
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "holder unknown"
            logging.info("Waiting for another process to finish preparing %s (%s, lock %s)",
                         name, holder, path)
            fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        file.truncate()
        file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        yield  # closing the file releases the lock


def remove_incomplete(builder_dir: Path) -> None:
    """Remove the temporary directories of killed preparations under DATA_DIR/NAME (at the
    builder's and at its configs' level). Only under `preparation_lock`: there, no other
    process is preparing, so every such directory is stale."""
    stale = [*builder_dir.glob(INCOMPLETE), *builder_dir.glob(f"*/{INCOMPLETE}")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        logging.info("Removed %d unfinished preparation(s) left by killed processes: %s",
                     len(stale), ", ".join(map(str, stale)))
