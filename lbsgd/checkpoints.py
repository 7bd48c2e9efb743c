"""Checkpoints through orbax: asynchronous saves, restore of the latest into the live shardings.

A checkpoint holds the whole TrainState (step, parameters, per-worker BN statistics, optimizer
state, including eq. (10)'s buffer and previous rate). The input position is the step itself
(input_pipeline.train_batches), so restoring the state restores the data order too.
"""

import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:

    def __init__(self, workdir: str, *, keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True))

    def save(self, step: int, state) -> None:
        """Start saving `state`; returns once the arrays are copied off the device."""
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def restore_latest(self, state):
        """The latest checkpoint restored with `state`'s structure and shardings, else `state`."""
        step = self.manager.latest_step()
        if step is None:
            return state
        logging.info("resuming from the checkpoint at step %d", step)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        self.manager.wait_until_finished()
