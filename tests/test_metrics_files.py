"""metrics.jsonl and the TensorBoard event files across crashes and resumes.

After a kill -9 and a rerun, TensorBoard must hold each (tag, step) as often as metrics.jsonl
does (once, but "epoch" of a step with a train and an eval row), with the same values;
the resume's rewrites must leave the old file or the new one at every moment (never a
truncated one); a line of metrics.jsonl the resume cannot read must stop the run with the
file, the line and the fix, and touch nothing. End-to-end cases run the real command.
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, lbsgd_command, lbsgd_env, made_once, metrics_rows, run_lbsgd
from tests.test_reliability import _checkpoint_steps, _readable_rows

pytestmark = pytest.mark.slow

# 62 steps per epoch: 24 logged steps, checkpoints at 5, 10, ...; evaluation at step 24 only.
RUN = ("--config.global_batch_size=64", "--config.bn_group_size=8", "--config.max_steps=24",
       "--config.log_every_steps=1", "--config.checkpoint_every_steps=5",
       "--config.warmup_epochs=0.4")


def _event_files(workdir) -> list[Path]:
    """The files TensorBoard reads in `workdir` (a name holding "tfevents"), in its order."""
    return sorted(p for p in Path(workdir).iterdir() if "tfevents" in p.name)


def _scalars(workdir) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar event of `workdir`, read by TensorBoard's own loader
    file after file, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    return [(value.tag, event.step, float(tensor_util.make_ndarray(value.tensor)))
            for path in _event_files(workdir) for event in EventFileLoader(str(path)).Load()
            for value in event.summary.value
            if value.metadata.plugin_data.plugin_name == "scalars"]


# metrics.jsonl's columns and their TensorBoard tags, grouped by section ("epoch" and "time"
# are not curves).
TAGS = {"loss": "train/loss", "train_top1": "train/top1", "lr": "train/lr",
        "grad_norm": "train/grad_norm", "images_per_sec": "perf/images_per_sec",
        "data_wait": "perf/data_wait", "eval_top1": "eval/top1", "eval_top5": "eval/top5",
        "eval_loss": "eval/loss"}


def _files(workdir) -> dict[str, bytes]:
    """metrics.jsonl and the event files of `workdir`, by name."""
    paths = [Path(workdir) / "metrics.jsonl", *_event_files(workdir)]
    return {p.name: p.read_bytes() for p in paths}


def _wait_for_a_checkpoint_and_rows(workdir, process, rows, timeout=300):
    """Wait for a saved checkpoint and `rows` rows: a kill then leaves steps past the
    checkpoint, which the resume must drop from both files."""
    deadline = time.monotonic() + timeout
    while not ((Path(workdir) / "checkpoints").is_dir() and _checkpoint_steps(workdir)
               and len(_readable_rows(workdir)) >= rows):
        assert process.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def resumed(tmp_path_factory):
    """A run killed (-9) past its first checkpoint, its files then torn as a crash mid-write
    tears them, and rerun to the end. Returns (workdir, rerun's stderr, the bytes of the
    files before the rerun, hard links to those files' inodes)."""
    return made_once(tmp_path_factory, "metrics-files-resumed", _kill_tear_and_rerun)[1]


def _kill_tear_and_rerun(root):
    workdir = root / "run"
    with open(root / "killed.log", "w") as log:
        process = subprocess.Popen(lbsgd_command(workdir, *RUN), cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT, env=lbsgd_env(), text=True)
        try:
            _wait_for_a_checkpoint_and_rows(workdir, process, 7)
        finally:
            process.kill()
            process.wait()
    assert len(_readable_rows(workdir)) < 24
    with open(workdir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 99, "epoch": 0.1')  # a row cut off mid-write
    last = _event_files(workdir)[-1]
    last.write_bytes(last.read_bytes()[:-5])  # an event cut off mid-write
    before = _files(workdir)
    links = root / "before"
    links.mkdir()
    for name in before:  # the old inodes: an atomic rewrite never writes into them
        os.link(workdir / name, links / name)
    result = run_lbsgd(workdir, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stderr, before, links


def test_after_a_kill_tensorboard_shows_each_step_once_with_the_metrics_jsonl_values(resumed):
    workdir, stderr, _, _ = resumed
    assert "resuming from the checkpoint at step" in stderr
    rows = metrics_rows(workdir)  # every line parses: the torn one was dropped
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 25))
    expected = sorted((TAGS[key], row["step"], value) for row in rows
                      for key, value in row.items() if key not in ("step", "epoch", "time"))
    scalars = _scalars(workdir)
    found = sorted(scalars)
    # The same (tag, step) pairs, as many times each.
    assert [(tag, step) for tag, step, _ in found] == [(tag, step) for tag, step, _ in expected]
    np.testing.assert_allclose([v for *_, v in found], [v for *_, v in expected], rtol=1e-6)
    # TensorBoard reads the files in name order: each tag's steps must come in order too.
    for tag in {tag for tag, _, _ in scalars}:
        steps = [step for t, step, _ in scalars if t == tag]
        assert steps == sorted(steps), tag


def test_the_resume_replaces_the_files_and_never_writes_into_the_old_ones(resumed):
    workdir, _, before, links = resumed
    for name, data in before.items():
        # A hard link keeps the old inode: written in place (truncated, then rewritten), it
        # would hold the new contents; replaced, it still holds every old byte.
        assert (links / name).read_bytes() == data, name
    assert (workdir / "metrics.jsonl").stat().st_ino != (links / "metrics.jsonl").stat().st_ino
    assert not list(workdir.glob("*.tmp"))  # no temporary file left behind


BAD_LINES = {
    "hand-edited": (5, lambda line: line.replace('"loss":', '"loss"')),
    "string step": (3, lambda line: line.replace('"step": 3,', '"step": "3",')),
}


@pytest.fixture(scope="session")
def refused(resumed, tmp_path_factory):
    """Each BAD_LINES damage done to a copy of the finished run, then rerun; both reruns at
    once, to halve the wait. Returns {name: (workdir, files before, completed process)}."""
    return made_once(tmp_path_factory, "metrics-files-refused",
                     lambda root: _damage_and_rerun(resumed, root))[1]


def _damage_and_rerun(resumed, root):
    started = {}
    for name, (number, edit) in BAD_LINES.items():
        workdir = root / name / "run"
        shutil.copytree(resumed[0], workdir)
        path = workdir / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        edited = edit(lines[number - 1])
        assert edited != lines[number - 1]
        lines[number - 1] = edited
        path.write_text("".join(lines))
        process = subprocess.Popen(lbsgd_command(workdir, *RUN), cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=lbsgd_env())
        started[name] = (workdir, _files(workdir), process)
    return {name: (workdir, files, process.communicate(timeout=600), process.returncode)
            for name, (workdir, files, process) in started.items()}


@pytest.mark.parametrize("damage", BAD_LINES)
def test_a_line_that_is_not_a_row_stops_the_rerun_with_its_line_and_touches_nothing(
        refused, damage):
    workdir, files, (_, stderr), returncode = refused[damage]
    number = BAD_LINES[damage][0]
    assert returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("lbsgd: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"lbsgd: {workdir}/metrics.jsonl line {number} is not a metrics "
                               "row (")
    assert lines[0].endswith("): fix or delete that line, then rerun")
    assert _files(workdir) == files


# Unit level: the rules of what a resume keeps, and a kill at the worst moment of a rewrite.

def _jsonl(*rows) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def test_the_resume_keeps_the_rows_up_to_its_step_and_drops_only_a_torn_last_line(tmp_path):
    from lbsgd.errors import DataError
    from lbsgd.metrics import rows_to_keep

    path = tmp_path / "metrics.jsonl"
    rows = _jsonl(*({"step": s, "loss": 1.0} for s in (1, 2, 3)))
    path.write_bytes(rows + b"\n" + _jsonl({"step": 4}))
    assert rows_to_keep(str(path), 3) == rows  # a blank line holds nothing; step 4 goes
    path.write_bytes(rows)
    assert rows_to_keep(str(path), 3) is None  # nothing to drop: the file is not rewritten
    path.write_bytes(rows + b'{"step": 4, "lo')
    assert rows_to_keep(str(path), 3) == rows  # cut off by a crash
    path.write_bytes(rows + b'{"step": 3}')
    assert rows_to_keep(str(path), 3) == rows + b'{"step": 3}\n'  # whole, only the newline lost
    damaged = [(b'{"step": 2, "lo\n', "not JSON"), (b'{"step": "2"}\n', '"step" is "2"'),
               (b'{"step": true}\n', '"step" is true'), (b"[2]\n", "not a JSON object"),
               (b'{"loss": 1.0}\n', 'no "step"'), (b'{"step": 2.5}\n', '"step" is 2.5'),
               (b"\x80\x81\n", "not UTF-8 text")]
    for bad, why in damaged:  # line 3, after a row and a blank line; and a last line whole
        for data, number in [(_jsonl({"step": 1}) + b"\n" + bad + rows, 3),
                             (rows + bad.rstrip(b"\n"), 4)]:
            if number == 4 and why.startswith(("not JSON", "not UTF-8")):
                continue  # a last line that does not parse is a torn one (above)
            path.write_bytes(data)
            with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line {number} is "
                               rf"not a metrics row \(.*{re.escape(why)}.*\): fix or delete "
                               "that line, then rerun$"):
                rows_to_keep(str(path), 3)
            assert path.read_bytes() == data


class _Killed(Exception):
    """Stands for a kill -9 at the moment it is raised."""


def _kill_at(monkeypatch, name):
    from lbsgd import metrics

    def killed(*args, **kwargs):
        raise _Killed(name)

    monkeypatch.setattr(metrics.os, name, killed)


def test_a_kill_at_any_moment_of_a_rewrite_loses_nothing(tmp_path, monkeypatch):
    import tensorflow as tf
    from clu import metric_writers

    from lbsgd.metrics import events_to_keep, replace_event_files, replace_file

    path = tmp_path / "metrics.jsonl"
    old = _jsonl(*({"step": s} for s in range(1, 9)))
    path.write_bytes(old)
    _kill_at(monkeypatch, "replace")  # everything written but not yet in place
    with pytest.raises(_Killed):
        replace_file(str(path), old[:30])
    assert path.read_bytes() == old
    monkeypatch.undo()
    replace_file(str(path), old[:30])
    assert path.read_bytes() == old[:30] and not list(tmp_path.glob("*.tmp"))

    # Two event files, as a run (steps 1..3) and its resume (4..6) leave them.
    for steps in ((1, 2, 3), (4, 5, 6)):
        writer = metric_writers.SummaryWriter(str(tmp_path))
        for step in steps:
            writer.write_scalars(step, {"loss": 1.0 / step})
        writer.close()
    before = _files(tmp_path)
    _kill_at(monkeypatch, "replace")
    with pytest.raises(_Killed):
        replace_event_files(*events_to_keep(str(tmp_path), 4))
    assert _files(tmp_path) == before  # the new file is written but not in place
    monkeypatch.undo()
    _kill_at(monkeypatch, "remove")  # the new file in place, the second old one not removed
    with pytest.raises(_Killed):
        replace_event_files(*events_to_keep(str(tmp_path), 4))
    monkeypatch.undo()
    assert sorted(s for _, s, _ in _scalars(tmp_path)) == [1, 2, 3, 4, 4, 5, 6]
    replace_event_files(*events_to_keep(str(tmp_path), 4))  # the rerun's clean-up
    assert sorted(s for _, s, _ in _scalars(tmp_path)) == [1, 2, 3, 4]
    assert len(_event_files(tmp_path)) == 1 and events_to_keep(str(tmp_path), 4) is None
    first = next(iter(tf.data.TFRecordDataset(str(_event_files(tmp_path)[0])))).numpy()
    assert tf.compat.v1.Event.FromString(first).file_version  # still a well-formed event file
