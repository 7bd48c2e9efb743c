"""Crashes, preemption, divergence, config changes, damaged checkpoints and several processes.

Every case starts the real command in real processes and delivers real signals.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import REPO, lbsgd_command, lbsgd_env, made_once, metrics_rows, run_lbsgd

pytestmark = pytest.mark.slow

# 62 steps per epoch; the gradual warmup changes the rate at every one of the 24 steps.
RUN = ("--config.global_batch_size=64", "--config.bn_group_size=8", "--config.max_steps=24",
       "--config.log_every_steps=1", "--config.checkpoint_every_steps=5",
       "--config.warmup_epochs=0.4")


def _trajectory(rows):
    """Everything on a row but wall-clock readings."""
    clock = ("images_per_sec", "data_wait", "time")
    return [{k: v for k, v in row.items() if k not in clock} for row in rows]


def _readable_rows(workdir):
    """Rows of a run killed mid-write: a torn last line is skipped."""
    path = Path(workdir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _start(workdir, *overrides, env=None, process_args=()):
    log = open(Path(workdir).parent / f"{Path(workdir).name}-{time.monotonic_ns()}.log", "w")
    command = lbsgd_command(workdir, *RUN, *overrides, *process_args)
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=lbsgd_env(env), text=True)


def _wait_for_rows(workdir, count, processes, timeout=300):
    deadline = time.monotonic() + timeout
    while len(_readable_rows(workdir)) < count:
        assert all(p.poll() is None for p in processes), "the run ended before it was stopped"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


def _checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The rows of an uninterrupted run."""
    def make(workdir):
        result = run_lbsgd(workdir, *RUN)
        assert result.returncode == 0, result.stderr[-3000:]
        return _trajectory(metrics_rows(workdir))

    return made_once(tmp_path_factory, "reliability-reference", make)[1]


def test_sigkill_at_any_moment_then_rerun_gives_the_uninterrupted_rows(tmp_path, reference):
    workdir = tmp_path / "run"
    for kill_after_rows in (7, 16):  # between checkpoints, twice in the same run
        process = _start(workdir)
        _wait_for_rows(workdir, kill_after_rows, [process])
        process.kill()
        process.wait()
        assert len(_readable_rows(workdir)) < len(reference)
    assert (workdir / "lbsgd.lock").exists()  # left by the killed run: it must not block
    result = run_lbsgd(workdir, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from the checkpoint at step" in result.stderr
    assert _trajectory(metrics_rows(workdir)) == reference  # bit-identical, no duplicated rows


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, reference):
    workdir = tmp_path / "run"
    process = _start(workdir)
    _wait_for_rows(workdir, 8, [process])
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    log = next(tmp_path.glob("run-*.log")).read_text()
    saved = int(re.search(r"preempted: saved the checkpoint at step (\d+)", log).group(1))
    assert saved < 24 and _checkpoint_steps(workdir)[-1] == saved
    assert metrics_rows(workdir)[-1]["step"] == saved
    result = run_lbsgd(workdir, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _trajectory(metrics_rows(workdir)) == reference


def test_divergence_stops_with_the_step_and_rate_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_lbsgd(tmp_path, *RUN, "--config.base_lr=1e30", "--config.warmup=none",
                       "--config.checkpoint_every_steps=1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    match = re.search(r"lbsgd: training diverged at step (\d+) \(lr ([^)]+)\)", result.stderr)
    assert match, result.stderr[-2000:]
    step, lr = int(match.group(1)), float(match.group(2))
    assert lr == pytest.approx(1e30 * 64 / 256, rel=1e-6)
    assert "the last good checkpoint is intact" in result.stderr
    saved = _checkpoint_steps(tmp_path)
    assert saved and saved[-1] < step
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(saved[-1]) / "state")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_resume_that_changes_the_trajectory_is_refused_unless_allowed(tmp_path):
    assert run_lbsgd(tmp_path, *RUN, "--config.max_steps=6").returncode == 0
    before = _checkpoint_steps(tmp_path)
    result = run_lbsgd(tmp_path, *RUN, "--config.seed=1", "--config.momentum=0.8")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("lbsgd: the checkpoint at step 6 was trained with a different config: momentum 0.9 "
            "-> 0.8, seed 0 -> 1. Resuming would change the experiment. Use a new --workdir, "
            "or, if the change is on purpose (e.g. extending num_epochs), add "
            "--config.resume_allow_changes=momentum,seed") in result.stderr
    assert _checkpoint_steps(tmp_path) == before  # a refused resume touches nothing
    # Run-only fields (max_steps, logging) may change freely; num_epochs with the switch.
    result = run_lbsgd(tmp_path, *RUN, "--config.max_steps=8", "--config.num_epochs=40",
                       "--config.resume_allow_changes=num_epochs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics_rows(tmp_path)[-1]["step"] == 8


@pytest.mark.parametrize("damage", ["everything", "array_data"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, damage):
    assert run_lbsgd(tmp_path, *RUN, "--config.max_steps=12").returncode == 0
    assert _checkpoint_steps(tmp_path) == [5, 10, 12]
    for path in (tmp_path / "checkpoints" / "12").rglob("*"):
        if path.is_file() and (damage == "everything" or "/d/" in str(path)):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "checkpoints-damaged" / "12").mkdir(parents=True)  # step 12 damaged before
    result = run_lbsgd(tmp_path, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint at step 12 is damaged" in result.stderr
    assert "resuming from the checkpoint at step 10" in result.stderr
    assert (tmp_path / "checkpoints-damaged" / "12.1").is_dir()
    assert _trajectory(metrics_rows(tmp_path)) == reference


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(workdir):
    """2 processes x 4 CPU devices on localhost, real collectives through gloo."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    address = f"localhost:{_free_port()}"
    return [_start(workdir, env=env, process_args=(
        f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"))
        for i in range(2)]


def test_two_processes_train_like_one_and_resume_exactly_after_both_are_killed(
        tmp_path, reference):
    straight = tmp_path / "straight"
    processes = _two_processes(straight)
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    rows = _trajectory(metrics_rows(straight))
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, expected in zip(rows, reference, strict=True):
        for key, value in expected.items():  # the same function, summed in another order
            np.testing.assert_allclose(row[key], value, rtol=1e-5, atol=1e-7)

    killed = tmp_path / "killed"
    processes = _two_processes(killed)
    _wait_for_rows(killed, 13, processes)
    for p in processes:
        p.kill()
        p.wait()
    processes = _two_processes(killed)
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    assert _trajectory(metrics_rows(killed)) == rows  # bit-identical to the uninterrupted run


def test_a_second_run_on_a_busy_workdir_is_refused_and_the_first_is_untouched(tmp_path,
                                                                                reference):
    workdir = tmp_path / "run"
    first = _start(workdir)
    _wait_for_rows(workdir, 3, [first])
    # The first run is held (SIGSTOP keeps its lock) while the second starts: otherwise a
    # fast machine (or the suite's compilation cache) can finish it before the second's
    # imports are done, and nothing would be tested.
    first.send_signal(signal.SIGSTOP)
    try:
        second = run_lbsgd(workdir, *RUN, "--config.seed=1")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert re.search(rf"lbsgd: {re.escape(str(workdir))} is in use by another lbsgd run "
                     rf"\(host {re.escape(socket.gethostname())}, pid {first.pid}, since ",
                     second.stderr), second.stderr[-2000:]
    assert first.wait(timeout=300) == 0
    assert _trajectory(metrics_rows(workdir)) == reference  # one run's rows, once each


def test_ctrl_c_saves_and_exits_130_and_a_glob_path_resumes(tmp_path, reference):
    workdir = tmp_path / "lr[0.1]"  # glob characters: orbax must still find its files
    process = _start(workdir)
    _wait_for_rows(workdir, 8, [process])
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    log = next(tmp_path.glob("lr*.log")).read_text()
    assert "Traceback" not in log
    saved = int(re.search(r"lbsgd: interrupted: saved the checkpoint at step (\d+); rerun the "
                          r"same command to resume", log).group(1))
    assert _checkpoint_steps(workdir)[-1] == saved and metrics_rows(workdir)[-1]["step"] == saved
    # What this sitting did, before the one-line exit.
    assert re.search(rf"stopped \(rerun the same command to resume\): no evaluation \| "
                     rf"trained steps 1 to {saved} \({saved} steps\)", log), log[-2000:]

    result = run_lbsgd(workdir, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from the checkpoint at step {saved}" in result.stderr
    assert "damaged" not in result.stderr
    assert _trajectory(metrics_rows(workdir)) == reference


def test_a_second_ctrl_c_exits_at_once():
    """The watch of the train loop, in a process that interrupts itself twice: Python runs
    one handler call per delivered signal only when the first was handled, so the signals
    are sent one after the other, as a user's two key presses are."""
    script = ("import os, signal, sys, time\n"
              "from lbsgd.checkpoints import PreemptionWatch\n"
              "with PreemptionWatch() as watch:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(0.5)\n"
              "    print('first:', watch.reached(1), watch.interrupted, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(5)\n"
              "print('not reached')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 130
    assert result.stdout == "first: True True\n"
    assert "lbsgd: second interrupt: exiting now, without saving" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="session")
def six_steps(tmp_path_factory):
    """A finished 6-step run (checkpoints 5 and 6), to copy and break."""
    def make(directory):
        result = run_lbsgd(directory / "run", *RUN, "--config.max_steps=6")
        assert result.returncode == 0, result.stderr[-3000:]
        assert _checkpoint_steps(directory / "run") == [5, 6]

    return made_once(tmp_path_factory, "six-steps", make)[0] / "run"


def test_when_no_checkpoint_restores_every_rerun_stops_and_nothing_moves(tmp_path, six_steps):
    workdir = tmp_path / "run"
    shutil.copytree(six_steps, workdir)
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file() and "/state/" in str(path):
            path.write_bytes(b"")
    for _ in range(2):  # the second rerun must stop too, not start over from step 0
        result = run_lbsgd(workdir, *RUN, "--config.max_steps=8")
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert re.search(r"lbsgd: no checkpoint in \S+ can be restored \(steps \[6, 5\]; .*"
                         r"Nothing was changed. If they are damaged, move \S+ away",
                         result.stderr), result.stderr[-2000:]
        assert _checkpoint_steps(workdir) == [5, 6]
        assert not (tmp_path / "run" / "checkpoints-damaged").exists()
        assert metrics_rows(workdir)[-1]["step"] == 6


def test_a_checkpoint_renamed_to_another_step_is_refused(tmp_path, six_steps):
    workdir = tmp_path / "run"
    shutil.copytree(six_steps, workdir)
    (workdir / "checkpoints" / "6").rename(workdir / "checkpoints" / "100")
    result = run_lbsgd(workdir, *RUN, "--config.max_steps=8")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "checkpoints/100 holds the state after step 6, not 100 (renamed?)" in result.stderr
    assert _checkpoint_steps(workdir) == [5, 100]


def _mount_tmpfs(path, size):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")


def test_disk_full_stops_in_one_line_and_the_rerun_after_freeing_space_is_exact(tmp_path,
                                                                                reference):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2m")
    try:
        workdir = disk / "run"
        result = run_lbsgd(workdir, *RUN)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        # The message is the last line: neither the failed save's in-flight writes (tracebacks
        # of their callbacks) nor asyncio's unread futures print around or after it.
        assert re.match(r"lbsgd: the disk of \S+ is full: a checkpoint could not be saved",
                        result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        result = run_lbsgd(workdir, *RUN)
        assert result.returncode == 0, result.stderr[-3000:]
        assert _trajectory(metrics_rows(workdir)) == reference
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
