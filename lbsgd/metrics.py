"""Where a run's numbers go: metrics.jsonl, TensorBoard (via clu), and a console progress line.

Only process 0 writes files. Rows follow the public contract in docs/design.md: `step` is the
number of updates done, `epoch` the fraction of epochs done, `lr` the rate that step's
update used, `time` the Unix time the row was written (for wall-clock reports).

A resumed run first drops what was written after its checkpoint, from metrics.jsonl and from
the TensorBoard event files alike, so neither ever holds a step twice and both agree. Each is
written whole to a temporary file that then replaces the old one (os.replace): a kill at any
moment leaves the old contents or the new, never a half-written file. What the resume drops
is only what the rerun writes again, or a tail cut off by a crash; anything else it cannot
read stops the run, before anything is rewritten, naming the file and the fix.
"""

import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from importlib import metadata

import jax
import ml_collections
from absl import logging

from lbsgd import hide_gpus_from_tensorflow
from lbsgd.errors import DataError

# Every process that trains or benchmarks imports TensorFlow through this module (and clu):
# no GPU for it, before it runs anything. Where TensorFlow is not installed (the lent GPU
# machines: its wheel is larger than what a call carries), lbsgd trains all the same and
# writes no TensorBoard events, saying so once: metrics.jsonl and the console have every row.
tf = hide_gpus_from_tensorflow()
if tf is not None:
    from clu import metric_writers


class _NoEvents:
    """The writer where TensorFlow is missing, and on processes other than 0."""

    def write_hparams(self, hparams): pass
    def write_scalars(self, step, scalars): pass
    def flush(self): pass
    def close(self): pass


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# TensorBoard groups curves by the prefix before "/": a run's losses, accuracies, rate and
# throughput each in their section. `epoch` (on every row, to read metrics.jsonl by epoch) is
# the x-axis TensorBoard does not have, not a curve of its own.
_TENSORBOARD_GROUPS = {"images_per_sec": "perf", "data_wait": "perf"}


def tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of a metrics.jsonl column, or None for columns kept off it:
    eval_top1 -> eval/top1, train_top1 -> train/top1, loss -> train/loss,
    noise_scale_trace -> noise_scale/trace, ..."""
    if key in ("step", "epoch", "time"):
        return None
    if key == "noise_scale":  # B_simple, beside its two parts noise_scale/grad_sq and /trace
        return "noise_scale/b_simple"
    for prefix in ("eval", "train", "noise_scale"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"{_TENSORBOARD_GROUPS.get(key, 'train')}/{key}"


def _hparams(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """The config as TensorBoard's hparams plugin takes it: scalars and strings only."""
    return {key: value if isinstance(value, bool | int | float | str) else str(value)
            for key, value in config.to_dict().items()}


def replace_file(path: str, data: bytes) -> None:
    """Write `path` anew through a temporary file in its directory and os.replace: a kill at
    any moment leaves the old file or the new one, never a truncated or half-written one."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the new contents are on disk before they replace the old
    shutil.copymode(path, temporary)
    os.replace(temporary, path)


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8 text
        return False
    return True


def _parse_row(line: bytes) -> tuple[int | None, str]:
    """(step, "") for a metrics row, a JSON object with an integer "step"; else (None, why)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not JSON: {e.msg} at column {e.colno}"
    except ValueError:
        return None, "not UTF-8 text"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    if "step" not in row:
        return None, 'no "step"'
    if type(row["step"]) is not int:  # a bool is an int to Python, but no step
        return None, f'"step" is {json.dumps(row["step"])[:40]}, not an integer'
    return row["step"], ""


def rows_to_keep(path: str, step: int) -> bytes | None:
    """metrics.jsonl as a run resumed at `step` keeps it, or None if that is the file as it is.

    Dropped: the rows after `step` (the rerun writes them again) and a last line cut off by a
    crash (no newline, not JSON). Any other line that is not a row was edited by hand or
    damaged: dropping it would lose it silently, keeping it would break every reader, so the
    run stops, before anything is rewritten, and names it.
    """
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    *lines, tail = data.split(b"\n")  # `tail`: what follows the last newline
    if tail.strip() and not _is_json(tail):
        logging.warning("%s: dropping its last line, cut off by a crash: %r", path, tail[:80])
    elif tail.strip():
        lines.append(tail)  # a complete row that only lacks its newline
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # an empty line holds nothing to lose
        row_step, why = _parse_row(line)
        if why:
            raise DataError(f"{path} line {number} is not a metrics row ({why}): fix or delete "
                            "that line, then rerun")
        if row_step <= step:
            kept.append(line + b"\n")
    new = b"".join(kept)
    return None if new == data else new


def _event_files(workdir: str) -> list[str]:
    """The workdir's TensorBoard event files, in the order TensorBoard reads them (by name)."""
    paths = (os.path.join(workdir, name) for name in sorted(os.listdir(workdir))
             if "tfevents" in name)
    return [path for path in paths if os.path.isfile(path)]


def _event_records(path: str) -> list[bytes]:
    """The serialized events of one event file. A record cut off at the end (a kill while the
    writer flushed) ends the file; damage anywhere else stops the run, since dropping what
    follows it would lose events."""
    records = []
    try:
        for record in tf.data.TFRecordDataset(path):
            records.append(record.numpy())
    except tf.errors.DataLossError:
        # TFRecord framing: an 8-byte length and its 4-byte CRC, the data, the data's CRC.
        offset = sum(16 + len(record) for record in records)
        with open(path, "rb") as f:
            f.seek(offset)
            header = f.read(8)
        length = struct.unpack("<Q", header)[0] if len(header) == 8 else 0
        if offset + 16 + length <= os.path.getsize(path):
            raise DataError(f"{path} is damaged at byte {offset}, not cut off at its end by a "
                            "crash: move it out of the workdir, then rerun") from None
        logging.warning("%s: its last event was cut off by a crash; dropped", path)
    return records


def events_to_keep(workdir: str, step: int) -> tuple[list[str], list[bytes]] | None:
    """(the workdir's event files, the events a run resumed at `step` keeps), or None if the
    files hold nothing else.

    Kept: one file-version header, then each event up to `step`, once. Dropped: the events
    after `step` (the rerun writes them again, and TensorBoard would show those steps twice)
    and second copies of an event, left by a kill in the middle of replace_event_files.
    """
    paths = _event_files(workdir)
    header, kept, seen, dropped = [], [], set(), False
    for path in paths:
        for record in _event_records(path):
            event = tf.compat.v1.Event.FromString(record)
            if event.WhichOneof("what") == "file_version":
                header = header or [record]  # every file opens with one; one file needs one
            elif event.step > step or record in seen:
                dropped = True
            else:
                seen.add(record)
                kept.append(record)
    return (paths, header + kept) if dropped else None


def replace_event_files(paths: list[str], records: list[bytes]) -> None:
    """Write `records` as one event file that takes the place of the first of `paths`, then
    remove the others.

    The new file is complete on disk before os.replace puts it in place, and its temporary
    name holds no "tfevents" (TensorBoard never reads it half-written), so a kill leaves the
    old events or the new, never fewer. A kill before the others are removed leaves second
    copies of kept events, which the next start drops (events_to_keep). Named like the first
    file, it sorts before the file the new writer opens: TensorBoard reads the steps in order.
    """
    temporary = os.path.join(os.path.dirname(paths[0]), "events.tmp")
    with tf.io.TFRecordWriter(temporary) as writer:
        for record in records:
            writer.write(record)
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, paths[0])
    for path in paths[1:]:
        os.remove(path)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of the git checkout holding the lbsgd package ("+dirty" if it has local
    changes), or None if it is not in one (an installed wheel) or git is missing."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package_dir,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=package_dir, capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """What produced a run (written to run.json, apart from config.json, whose comparison on
    resume it must not affect)."""
    devices = jax.devices()
    return {
        "lbsgd_version": _version("lbsgd"),
        "git_commit": _git_commit(),
        "versions": {name: _version(name) for name in
                     ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")},
        "python": platform.python_version(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "argv": list(sys.argv),
        "started": round(time.time(), 3),
    }


class MetricsLogger:

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, total_steps: int,
                 steps_per_epoch: int, start_step: int):
        self.is_chief = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.global_batch_size = config.global_batch_size
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.last_step, self.last_time = start_step, time.perf_counter()
        # Train steps only (compilation, evaluation, saving excluded): the ETA and the mean
        # throughput.
        self.train_seconds, self.train_steps = 0.0, 0
        if self.is_chief:
            os.makedirs(workdir, exist_ok=True)
            # Both are read and checked before either is rewritten: a refusal touches nothing.
            rows = rows_to_keep(self.path, start_step)
            events = events_to_keep(workdir, start_step) if tf else None
            if rows is not None:
                replace_file(self.path, rows)
            if events is not None:
                replace_event_files(*events)
            with open(os.path.join(workdir, "config.json"), "w") as f:
                json.dump(config.to_dict(), f, indent=2, sort_keys=True)
            with open(os.path.join(workdir, "run.json"), "w") as f:
                json.dump(provenance(), f, indent=2, sort_keys=True)
        # TensorBoard events from process 0 only; the console line below is our own. Created
        # after the clean-up above: the writer opens a new event file, which must not be
        # taken for an old one. Synchronous: _write flushes every row anyway.
        self.writer = (metric_writers.SummaryWriter(workdir) if self.is_chief and tf
                       else _NoEvents())
        if self.is_chief and not tf:
            logging.warning("TensorFlow is not installed: no TensorBoard events; "
                            "metrics.jsonl and the console have every row")
        if start_step == 0:  # once per run: a resume must not add a second session
            self.writer.write_hparams(_hparams(config))

    def _write(self, row: dict) -> None:
        if self.is_chief:
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
        self.writer.write_scalars(row["step"], {tensorboard_tag(k): v for k, v in row.items()
                                                if tensorboard_tag(k)})
        # Like its metrics.jsonl line, a row's events reach the file before the step's
        # checkpoint is saved: a kill after the save must not lose events the resume keeps.
        self.writer.flush()

    def restart_clock(self, step: int) -> None:
        """Time spent since the last row is not training time (compilation, evaluation, saving)."""
        self.last_step, self.last_time = step, time.perf_counter()

    @property
    def mean_images_per_sec(self) -> float | None:
        """Over the train steps timed so far (compilation, evaluation and saving excluded)."""
        if not self.train_seconds:
            return None
        return self.global_batch_size * self.train_steps / self.train_seconds

    def write_train(self, step: int, values: dict[str, float], *,
                    data_wait_seconds: float = 0.0) -> None:
        """Log one row of train metrics, with the throughput since the previous row, the
        fraction of that time the loop waited for input batches (`data_wait`: near 0 when the
        devices bound the run, large when the input pipeline does), and an ETA from the mean
        time of the train steps timed so far."""
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        window_seconds = max(now - self.last_time, 1e-9)
        self.train_seconds += window_seconds
        self.train_steps += steps
        self.last_step, self.last_time = step, now
        row = {"step": step, "epoch": step / self.steps_per_epoch, **values,
               "images_per_sec": self.global_batch_size * steps / window_seconds,
               "data_wait": min(data_wait_seconds / window_seconds, 1.0)}
        self._write(row)
        eta = format_seconds((self.total_steps - step) * self.train_seconds / self.train_steps)
        logging.info("step %d/%d | epoch %.2f | loss %.4f | top1 %.3f | lr %.5f | %.0f img/s | "
                     "data wait %.0f%% | ETA %s", step, self.total_steps, row["epoch"],
                     values["loss"], values["train_top1"], values["lr"],
                     row["images_per_sec"], 100 * row["data_wait"], eta)

    def write_eval(self, step: int, values: dict[str, float]) -> None:
        self._write({"step": step, "epoch": step / self.steps_per_epoch, **values})
        logging.info("eval at step %d | top1 %.4f | top5 %.4f | loss %.4f", step,
                     values["eval_top1"], values["eval_top5"], values["eval_loss"])

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
