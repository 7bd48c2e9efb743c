"""Checkpoints through orbax, resume checks, and preemption.

A checkpoint holds the whole TrainState (step, parameters, per-worker BN statistics, optimizer
state including eq. (10)'s buffer and previous rate) and the config that produced it, as JSON.
The input position is the step itself (input_pipeline.train_batches) and the train step uses
no randomness, so restoring the state restores the trajectory exactly. Orbax stores arrays
with TensorStore and metadata as JSON: nothing is unpickled, so a checkpoint from an untrusted
source cannot run code.

Two folders of the workdir hold checkpoints: `checkpoints/` the last `keep_checkpoints` (what a
rerun resumes from), `checkpoints-best/` the one whose evaluation had the best top-1 so far
(`BestCheckpoint`), kept apart so that the latest ones never push it out.
"""

import contextlib
import errno
import functools
import glob
import logging as std_logging
import math
import os
import signal
import sys
import types

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

# The registry object itself: its `add` can override without a warning (see below).
from orbax.checkpoint._src.serialization import type_handler_registry

from lbsgd.config import RUN_ONLY_FIELDS, as_json, with_defaults
from lbsgd.errors import CheckpointError


def changed_fields(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{field: (saved value, new value)} for trajectory fields that differ. A field the saved
    config lacks (added to lbsgd after that checkpoint) counts as its default, which by rule
    is the behaviour from before the field existed."""
    new, saved = as_json(config), with_defaults(saved)
    fields = (saved.keys() | new.keys()) - RUN_ONLY_FIELDS
    return {f: (saved.get(f), new.get(f)) for f in sorted(fields) if saved.get(f) != new.get(f)}


def check_resume_config(saved: dict, config: ml_collections.ConfigDict, step: int) -> None:
    allowed = {f.strip() for f in config.resume_allow_changes.split(",") if f.strip()}
    changes = {f: v for f, v in changed_fields(saved, config).items() if f not in allowed}
    if changes:
        listed = ", ".join(f"{f} {old!r} -> {new!r}" for f, (old, new) in changes.items())
        raise CheckpointError(
            f"the checkpoint at step {step} was trained with a different config: {listed}. "
            "Resuming would change the experiment. Use a new --workdir, or, if the change is "
            f"on purpose (e.g. extending num_epochs), add "
            f"--config.resume_allow_changes={','.join(changes)}")


def _shapes(tree) -> list[str]:
    """The sorted shapes and dtypes of a state or of its stored metadata, to compare them."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return sorted(f"{tuple(x.shape)}:{x.dtype}" for x in leaves)


def _is_disk_full(error: BaseException) -> bool:
    """Whether `error` or one it was raised from is ENOSPC (TensorStore words it its own way)."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@functools.cache
def _save_replicated_arrays_from_one_device():
    """Orbax's default on CPU and TPU splits the writing of each replicated array across its
    replicas ("replica-parallel"), which pays only when several processes share the writing.
    In one process it only slices every array per device: ~100 small XLA compilations (~13 s on
    2 CPU cores for ResNet-8) at the first save of every run. One process therefore writes each
    replicated array from one device; several processes keep orbax's default.

    Registered once per process, through the registry's own `add`: the public
    `register_type_handler` warns "overriding jax.Array" on every call, which a user would
    read as something wrong with their run."""
    type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1),
        override=True, ignore_warnings=True)


def _is_late_write_callback(kind, error, trace) -> bool:
    """Whether an error is a TensorStore write finishing after orbax's event loop has closed
    (the write's done-callback calls `call_soon_threadsafe` on that loop)."""
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return (kind is RuntimeError and str(error) == "Event loop is closed"
            and trace is not None and trace.tb_frame.f_code.co_name == "_check_closed")


@functools.cache
def _quiet_late_write_callbacks():
    """When a save fails (a full disk), orbax's event loop ends with the first failed write
    while TensorStore's other writes are still in flight; as each finishes, its callback
    finds the loop closed, and Python prints that as an unraisable error with its traceback,
    dozens of them, around the one-line message the user should read. Nothing is lost by
    dropping them: the save has already failed and is reported; every other unraisable error
    prints as before."""
    previous = sys.unraisablehook

    def unraisablehook(unraisable):
        if not _is_late_write_callback(unraisable.exc_type, unraisable.exc_value,
                                       unraisable.exc_traceback):
            previous(unraisable)

    sys.unraisablehook = unraisablehook


LATEST_DIRECTORY = "checkpoints"
BEST_DIRECTORY = "checkpoints-best"


class Checkpointer:

    def __init__(self, workdir: str, *, keep: int | None, name: str = LATEST_DIRECTORY,
                 read_only: bool = False):
        """The checkpoints in `workdir`/`name`. `read_only` opens them to read while a run
        may be writing them (evaluation, export): nothing is created, and the temporary
        directory of a save in progress is left alone."""
        self.directory = os.path.join(os.path.abspath(workdir), name)
        self.is_latest = name == LATEST_DIRECTORY  # the log says which folder saved
        _save_replicated_arrays_from_one_device()
        _quiet_late_write_callbacks()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, read_only=read_only,
                enable_async_checkpointing=not read_only,
                # A save cut short leaves only a tmp dir; a run removes them at start-up.
                cleanup_tmp_directories=not read_only),
            item_handlers={
                # OCDBT finds its per-process files with a glob of the directory's path, which
                # fails silently on a path holding [ ] * ? (etils joins it unescaped); such a
                # workdir gets one plain zarr directory per array instead.
                "state": ocp.StandardCheckpointHandler(
                    use_ocdbt=not glob.has_magic(self.directory)),
                "config": ocp.JsonCheckpointHandler(), "run": ocp.JsonCheckpointHandler(),
                "eval": ocp.JsonCheckpointHandler()})

    @contextlib.contextmanager
    def _disk_full_is_one_line(self, step: int):
        try:
            yield
        except Exception as error:
            if not _is_disk_full(error):
                raise
            # The failed save's other writes end as futures nobody reads; asyncio would log
            # each one ("exception was never retrieved") after the message below.
            std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
            raise CheckpointError(
                f"the disk of {self.directory} is full: a checkpoint could not be saved (step "
                f"{step} or the one before). Free space, then rerun the same command: it resumes "
                "from the last complete checkpoint") from None

    def save(self, step: int, state, config: ml_collections.ConfigDict,
             evaluation: dict | None = None) -> None:
        """Start saving, with the step's `evaluation` if given; returns once the arrays are
        copied off the device (the files are written in the background)."""
        items = {"state": ocp.args.StandardSave(state),
                 "config": ocp.args.JsonSave(as_json(config)),
                 "run": ocp.args.JsonSave({"num_devices": jax.device_count(),
                                           "num_processes": jax.process_count()})}
        if evaluation is not None:
            items["eval"] = ocp.args.JsonSave(evaluation)
        with self._disk_full_is_one_line(step):
            self.manager.save(step, args=ocp.args.Composite(**items))
        if self.is_latest:
            logging.info("checkpoint at step %d saved (latest)", step)

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def saved_config(self, step: int) -> dict:
        """The config (as JSON) that trained the checkpoint at `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config

    def saved_evaluation(self, step: int) -> dict:
        """The evaluation saved with the checkpoint at `step` (best checkpoints have one)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            eval=ocp.args.JsonRestore())).eval

    def wait(self) -> None:
        """Until the saves in flight are complete on disk."""
        with self._disk_full_is_one_line(self.manager.latest_step() or 0):
            self.manager.wait_until_finished()

    def restore_latest(self, state, config: ml_collections.ConfigDict):
        """The newest readable checkpoint in `state`'s structure and shardings, else `state`.

        The saved config is checked first: a resume that changes the experiment stops with a
        message, and never touches the checkpoints. A checkpoint that fails to restore is
        only called damaged once an older one restores with the same code: then the failure
        was about its files, and it is moved aside with a warning. If none restores, nothing
        is moved (the cause may be anything: the path, a library, the files) and the run stops
        every time until the user decides; it never silently starts over.
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        failed = []  # (step, error), newest first
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self._restore(step, target, config)
            except CheckpointError:
                raise
            except Exception as error:  # orbax/TensorStore raise many kinds on bad bytes
                failed.append((step, error))
                continue
            for bad_step, error in failed:
                self._set_aside(bad_step, error)
            return restored
        if failed:
            step, error = failed[0]
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored (steps "
                f"{[s for s, _ in failed]}; step {step}: {type(error).__name__}: "
                f"{' '.join(str(error).split())[:300]}). Nothing was changed. If they are "
                f"damaged, move {self.directory} away to start this run from step 0")
        return state

    def _restore(self, step: int, target, config: ml_collections.ConfigDict):
        """Resume from one step, after checking its config, its shapes and its step number."""
        check_resume_config(self.saved_config(step), config, step)
        self._check_shapes(step, target, "(an allowed change of global_batch_size or "
                           "bn_group_size reshapes the per-worker BatchNorm statistics; or "
                           "another lbsgd version): it cannot be resumed, use a new --workdir")
        state = self.restore_step(step, target)
        logging.info("resuming from the checkpoint at step %d", step)
        self._log_device_change(step)
        return state

    def _check_shapes(self, step: int, target, why: str) -> None:
        if _shapes(self.manager.item_metadata(step)["state"]) != _shapes(target):
            raise CheckpointError(f"the checkpoint at step {step} holds arrays of other shapes "
                                  f"than this run's state {why}")

    def restore_step(self, step: int, target,
                     why: str = "(written by another lbsgd version?): read it with that version"):
        """The state saved at `step`, in `target`'s structure and shardings, WITHOUT the resume
        check of its config: for reading a checkpoint with another dataset or data dir
        (evaluation, export), never for resuming a run (restore_latest). `why` ends the
        message if the shapes differ."""
        self._check_shapes(step, target, why)
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
        if int(state.step) != step:
            raise CheckpointError(
                f"{self.directory}/{step} holds the state after step {int(state.step)}, not "
                f"{step} (renamed?): give it back its name ({int(state.step)}) or move it out "
                f"of {os.path.basename(self.directory)}/")
        return state

    def _log_device_change(self, step: int) -> None:
        """Another device count trains the same function (virtual workers) up to float
        rounding in the gradient sum's order: fine, but worth a line in the log."""
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                run=ocp.args.JsonRestore())).run
        except Exception:  # noqa: BLE001 - a checkpoint from before this record existed
            return
        if saved["num_devices"] != jax.device_count():
            logging.info("the checkpoint was saved on %d devices, this run has %d: the same "
                         "function continues, up to float rounding of the gradient sum",
                         saved["num_devices"], jax.device_count())

    def _set_aside(self, step: int, error: Exception) -> None:
        """Move a damaged checkpoint out of orbax's way, so the step can be saved again."""
        aside = f"{self.directory}-damaged"
        logging.warning("checkpoint at step %d is damaged (%s: %s); moved it to %s",
                        step, type(error).__name__, " ".join(str(error).split())[:200], aside)
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            name, copy = str(step), 1
            while os.path.exists(os.path.join(aside, name)):  # the same step damaged before
                name, copy = f"{step}.{copy}", copy + 1
            os.replace(os.path.join(self.directory, str(step)), os.path.join(aside, name))
        multihost_utils.sync_global_devices(f"lbsgd set aside checkpoint {step}")
        self.manager.reload()

    def close(self) -> None:
        """Wait for saves in flight, then release orbax's background threads."""
        self.wait()
        self.manager.close()


class BestCheckpoint:
    """The checkpoint of the best evaluation so far by top-1, in `checkpoints-best/`.

    It is saved only when an evaluation beats the best so far (strictly: a tie keeps the
    earlier step), with that evaluation, which is where a resumed run reads the best so far
    back from. Orbax keeps one: the older is deleted only once the newer is complete. A best
    checkpoint is saved only after the latest checkpoint of its step is complete, so it is
    never from a step the rerun after a crash would train again.
    """

    def __init__(self, workdir: str):
        self.checkpointer = Checkpointer(workdir, keep=1, name=BEST_DIRECTORY)
        self.step, self.top1 = self._read_best()

    def _read_best(self) -> tuple[int | None, float]:
        steps = self.checkpointer.steps()
        if not steps:
            return None, -math.inf
        try:
            return steps[-1], float(self.checkpointer.saved_evaluation(steps[-1])["eval_top1"])
        except Exception as error:  # noqa: BLE001 - damaged: the next best replaces it
            logging.warning("%s/%d: its evaluation cannot be read (%s: %s); the next "
                            "evaluation replaces it", self.checkpointer.directory, steps[-1],
                            type(error).__name__, " ".join(str(error).split())[:200])
            return None, -math.inf

    def offer(self, step: int, state, config: ml_collections.ConfigDict,
              evaluation: dict[str, float], *, latest: Checkpointer) -> None:
        """Save `state` as the best if `evaluation` beats the best so far; `latest` must have
        started the save of the same step."""
        if not evaluation["eval_top1"] > self.top1:
            return
        latest.wait()
        if self.step is not None and self.step > step:
            # A best from steps this run trains again (it resumed from an older checkpoint
            # when the newer was damaged), now beaten: orbax would keep the higher step.
            self.checkpointer.manager.delete(self.step)
        self.checkpointer.save(step, state, config, evaluation=evaluation)
        self.step, self.top1 = step, evaluation["eval_top1"]
        logging.info("new best eval top-1 %.4f at step %d: saved to %s/", self.top1, step,
                     BEST_DIRECTORY)

    def close(self) -> None:
        self.checkpointer.close()


class PreemptionWatch:
    """SIGTERM (a cluster's preemption notice) or Ctrl-C: finish the step, save, stop cleanly.

    A single process catches both here; a second Ctrl-C exits at once without saving (an
    async save cut short leaves only a temporary directory). With several processes, JAX's
    preemption sync point makes them all stop at the same step (it listens for SIGTERM
    itself); Ctrl-C keeps Python's default there, since processes that each stopped at their
    own step would wait for each other forever. Use as a context manager so the previous
    handlers come back afterwards.
    """

    def __init__(self):
        self.signal = None  # the first signal received
        self.multiprocess = jax.process_count() > 1
        self.previous_handlers = {}

    def __enter__(self) -> "PreemptionWatch":
        watched = () if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
        self.previous_handlers = {s: signal.signal(s, self._on_signal) for s in watched}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            os.write(2, b"lbsgd: second interrupt: exiting now, without saving\n")
            os._exit(130)
        logging.warning("received %s: stopping after this step (Ctrl-C again to exit at once)",
                        signal.Signals(signum).name)
        self.signal = signum

    @property
    def interrupted(self) -> bool:
        return self.signal == signal.SIGINT

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; call it at every step on every process."""
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None
