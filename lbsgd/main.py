"""Command line: python -m lbsgd.main --config=configs/NAME.py --workdir=DIR [--config.F=V ...].

Rerunning the same command with the same workdir resumes from the latest checkpoint.
"""

import logging as logging_std
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside "
    "TPU pods and SLURM (where jax.distributed finds it by itself).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def _launched_on_cluster() -> bool:
    """True under a multi-process launcher that jax.distributed can read by itself."""
    for variable in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(variable, "1")) > 1:
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def _initialize_distributed(jax) -> None:
    # Real collectives between CPU processes (tests, CPU clusters); GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _launched_on_cluster():
        jax.distributed.initialize()


class _HideLibraryInfo(logging_std.Filter):
    """Keep the console to our progress lines: orbax logs every save step at INFO."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_HideLibraryInfo())
    # TensorFlow (TFDS, TensorBoard writers) must never take accelerator memory from JAX.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import jax

    _initialize_distributed(jax)
    from lbsgd import checkpoints, train
    from lbsgd import config as config_lib

    logging.info("JAX %s: process %d of %d, %d devices (%d local)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.device_count(),
                 jax.local_device_count())
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (config_lib.ConfigError, checkpoints.ResumeError, train.DivergenceError) as e:
        # Expected failures get their message, not a stack trace.
        raise SystemExit(f"lbsgd: {e}") from None


if __name__ == "__main__":
    app.run(main)
