"""Checkpoints through orbax, resume checks, and preemption.

A checkpoint holds the whole TrainState (step, parameters, per-worker BN statistics, optimizer
state including eq. (10)'s buffer and previous rate) and the config that produced it, as JSON.
The input position is the step itself (input_pipeline.train_batches) and the train step uses
no randomness, so restoring the state restores the trajectory exactly. Orbax stores arrays
with TensorStore and metadata as JSON: nothing is unpickled, so a checkpoint from an untrusted
source cannot run code.
"""

import json
import os
import signal
import types

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from lbsgd.config import RUN_ONLY_FIELDS
from lbsgd.errors import CheckpointError


def _as_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(json.dumps(config.to_dict()))  # tuples become lists, as when loaded


def changed_fields(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{field: (saved value, new value)} for trajectory fields that differ."""
    new = _as_json(config)
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


class Checkpointer:

    def __init__(self, workdir: str, *, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=True,
                cleanup_tmp_directories=True),  # a save cut short leaves only a tmp dir
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state, config: ml_collections.ConfigDict) -> None:
        """Start saving; returns once the arrays are copied off the device."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(_as_json(config))))

    def restore_latest(self, state, config: ml_collections.ConfigDict):
        """The newest readable checkpoint in `state`'s structure and shardings, else `state`.

        The saved config is checked first: a resume that changes the experiment stops with a
        message, and never touches the checkpoints. A damaged checkpoint (truncated,
        half-written) is moved aside with a warning and the previous one is tried; if every
        checkpoint is damaged the run stops rather than silently starting over.
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                saved_config = self.manager.restore(step, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore())).config
                saved_shapes = _shapes(self.manager.item_metadata(step)["state"])
            except Exception as error:  # orbax/TensorStore raise many kinds on bad bytes
                self._set_aside(step, error)
                continue
            check_resume_config(saved_config, config, step)
            if saved_shapes != _shapes(target):
                raise CheckpointError(
                    f"the checkpoint at step {step} holds arrays of other shapes than this "
                    "run's state (an allowed change of global_batch_size or bn_group_size "
                    "reshapes the per-worker BatchNorm statistics; or another lbsgd version): "
                    "it cannot be resumed, use a new --workdir")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))
            except Exception as error:
                self._set_aside(step, error)
                continue
            logging.info("resuming from the checkpoint at step %d", step)
            return restored.state
        if steps:
            raise CheckpointError(f"every checkpoint in {self.directory} is damaged (steps "
                              f"{steps}, now in {self.directory}-damaged); nothing to resume")
        return state

    def _set_aside(self, step: int, error: Exception) -> None:
        """Move a damaged checkpoint out of orbax's way, so the step can be saved again."""
        logging.warning("checkpoint at step %d is damaged (%s: %s); moving it to %s-damaged "
                        "and trying the previous one", step, type(error).__name__,
                        str(error)[:200], self.directory)
        if jax.process_index() == 0:
            aside = f"{self.directory}-damaged"
            os.makedirs(aside, exist_ok=True)
            os.replace(os.path.join(self.directory, str(step)), os.path.join(aside, str(step)))
        multihost_utils.sync_global_devices(f"lbsgd set aside checkpoint {step}")
        self.manager.reload()

    def close(self) -> None:
        """Wait for saves in flight, then release orbax's background threads."""
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionWatch:
    """SIGTERM (or a cluster's preemption notice): finish the step, save, exit cleanly.

    With several processes, JAX's preemption sync point makes them all stop at the same step
    (it listens for the signal itself); a single process catches SIGTERM here. Use as a
    context manager so the previous handler comes back afterwards.
    """

    def __init__(self):
        self.received = False
        self.multiprocess = jax.process_count() > 1
        self.previous_handler = None

    def __enter__(self) -> "PreemptionWatch":
        if not self.multiprocess:
            self.previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        logging.warning("received signal %d: stopping after this step", signum)
        self.received = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; call it at every step on every process."""
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received
