"""The run directory's start-up checks and lock, on real files (lbsgd/workdir.py).

The command-line path of the same checks is in test_reliability.py and test_cli.py."""

import os
import subprocess
import sys

import pytest

from lbsgd import workdir as workdir_lib
from lbsgd.errors import WorkdirError


def _check(workdir, data_dir=""):
    with pytest.raises(WorkdirError) as raised:
        workdir_lib.check_paths(str(workdir), str(data_dir))
    return str(raised.value)


def test_paths_that_are_files_are_refused_with_the_path(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert _check(a_file) == (f"--workdir {a_file} is a file, not a directory: give a "
                              "directory path (or move the file away)")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    assert _check(tmp_path / "run").startswith(
        f"the checkpoint directory {tmp_path}/run/checkpoints is a file")
    assert _check(tmp_path / "other", data_dir=a_file).startswith(
        f"--config.data_dir {a_file} is a file")
    workdir_lib.check_paths(str(tmp_path / "new" / "run"), "")  # created, no complaint
    assert (tmp_path / "new" / "run").is_dir()


def test_a_symlinked_checkpoint_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "5").symlink_to(tmp_path / "elsewhere")
    assert "checkpoints/5 is a symbolic link" in _check(tmp_path / "run")


def test_a_read_only_workdir_is_refused(tmp_path):
    disk = tmp_path / "ro"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {mounted.stderr}")
    try:
        assert _check(disk) == (f"--workdir {disk} is not writable (Read-only file system): "
                                "choose a directory this user can write to")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lbsgd import workdir; "
         f"lock = workdir.WorkdirLock({str(tmp_path)!r}).__enter__(); print('held', flush=True);"
         " sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(WorkdirError, match=rf"is in use by another lbsgd run \(host .*, pid "
                                           rf"{holder.pid}, since "):
        workdir_lib.WorkdirLock(str(tmp_path)).__enter__()
    holder.kill()  # kill -9: the kernel releases the lock, the file stays
    holder.wait()
    assert (tmp_path / workdir_lib.LOCK_NAME).exists()
    with workdir_lib.WorkdirLock(str(tmp_path)):
        assert f"pid {os.getpid()}," in (tmp_path / workdir_lib.LOCK_NAME).read_text()
