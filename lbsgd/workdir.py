"""The run directory: one run at a time, and what can be checked before training starts.

A workdir holds one run (config.json, metrics.jsonl, TensorBoard events, checkpoints/). Two
processes writing it would interleave their rows and overwrite each other's checkpoints, so
process 0 holds an exclusive lock on `WORKDIR/lbsgd.lock` for the whole run. The lock belongs to
an open file: the kernel releases it when the process dies, even by kill -9, so a stale lock
file never blocks a rerun. (Like every flock, it is only as good as the file system's locking:
local disks and most network file systems honour it.)
"""

import fcntl
import os
import shutil
import socket
import tempfile
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lbsgd.checkpoints import BEST_DIRECTORY
from lbsgd.errors import WorkdirError

LOCK_NAME = "lbsgd.lock"
CHECKPOINT_DIRECTORIES = ("checkpoints", BEST_DIRECTORY)


def _not_a_directory(path: str, what: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"{what} {path} is a file, not a directory: give a directory path "
                           "(or move the file away)")


def check_paths(workdir: str, data_dir: str) -> None:
    """Stop at start-up, not at the first save, on paths a run cannot write to."""
    _not_a_directory(workdir, "--workdir")
    for name in CHECKPOINT_DIRECTORIES:
        _not_a_directory(os.path.join(workdir, name), "the checkpoint directory")
    if data_dir:
        _not_a_directory(data_dir, "--config.data_dir")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir} is not writable ({e.strerror}): choose a "
                           "directory this user can write to") from None
    for name in CHECKPOINT_DIRECTORIES:
        _no_symlinks(os.path.join(workdir, name))


def _no_symlinks(checkpoint_dir: str) -> None:
    """Old checkpoints are deleted as new ones are saved, which a symbolic link breaks."""
    for name in os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else ():
        if os.path.islink(os.path.join(checkpoint_dir, name)):
            raise WorkdirError(
                f"{checkpoint_dir}/{name} is a symbolic link: old checkpoints are deleted as "
                "new ones are saved, which a link breaks; replace it with the directory itself "
                f"or move it out of {os.path.basename(checkpoint_dir)}/")


def warn_if_short_of_space(workdir: str, state) -> None:
    """A checkpoint is about the size of the train state; warn when two do not fit."""
    needed = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
    free = shutil.disk_usage(workdir).free
    if free < 2 * needed:
        logging.warning("only %.1f MB free in %s, and a checkpoint takes about %.1f MB: saves "
                        "may fail (a failed save stops the run; free space, then rerun)",
                        free / 1e6, workdir, needed / 1e6)


class WorkdirLock:
    """Held by process 0 for the whole run; every process learns whether it was granted."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.file = None

    def __enter__(self) -> "WorkdirLock":
        holder = self._acquire() if jax.process_index() == 0 else ""
        refused = multihost_utils.broadcast_one_to_all(np.int32(bool(holder)))
        if refused:
            raise WorkdirError(
                f"{os.path.dirname(self.path)} is in use by another lbsgd run "
                f"({holder or 'see process 0'}): wait for it to finish or stop it, or give "
                "this run its own --workdir")
        return self

    def _acquire(self) -> str:
        """Take the lock and record who holds it; if it is taken, return who holds it."""
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "holder unknown"
            self.file.close()
            self.file = None
            return holder
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        return ""

    def __exit__(self, *exc_info) -> None:
        if self.file is not None:
            self.file.close()  # releases the lock; the file stays, harmlessly
