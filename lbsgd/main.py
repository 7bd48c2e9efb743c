"""Command line: python -m lbsgd.main --config=configs/NAME.py --workdir=DIR [--config.F=V ...].

Rerunning the same command with the same workdir resumes from the latest checkpoint. A
problem the user can fix (a bad config, data, checkpoint, or a diverged run) ends the command
with one `lbsgd: ...` line and a non-zero exit code, never a traceback (lbsgd/errors.py).
"""

import logging as logging_std
import os
import re
import sys

# TensorFlow's C++ start-up INFO lines are not ours to show; set before anything imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside "
    "TPU pods and SLURM (where jax.distributed finds it by itself).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _config_problem(error: Exception, argv: list[str]) -> str:
    """One line saying why --config could not be loaded or overridden."""
    text = " ".join(str(error).replace("\\n", " ").split())
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    if unknown := re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text):
        return (f"--config.{unknown[2]}: no such config field; did you mean "
                f"--config.{unknown[1]}? (every field: lbsgd/config.py)")
    if isinstance(error, AttributeError | KeyError):
        name = re.search(r"\w+", text)[0]
        return f"--config.{name}: no such config field (every field: lbsgd/config.py)"
    if "No such file or directory" in text:
        return (f"--config={path}: no such file (a path from the current directory, "
                "e.g. --config=configs/demo.py in the repository root)")
    hint = (" (run from the directory that holds the imported package, e.g. the repository "
            "root)" if isinstance(error, ModuleNotFoundError) else "")
    return f"--config={path} cannot be loaded: {type(error).__name__}: {text}{hint}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every problem of the flags or the config in one line."""
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.get("model")  # a config file that failed to load raises on first read
    except flags.Error as error:
        raise SystemExit(f"lbsgd: {error}") from None
    except Exception as error:  # noqa: BLE001 - whatever the config file itself raised
        raise SystemExit(f"lbsgd: {_config_problem(error, argv)}") from None
    return remaining


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


class _OwnInfoOnly(logging_std.Filter):
    """Keep the console to lbsgd's progress lines: libraries' INFO (orbax logs every save,
    JAX its backend search, TFDS its preparation) only at WARNING and above, and without the
    traceback a library logs from its own thread (orbax's failed async save): the same error
    reaches lbsgd's thread too, where it becomes one line or, if it is a bug, a traceback."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if record.pathname.startswith(_PACKAGE_DIR + os.sep):
            return True
        record.exc_info, record.exc_text = None, None
        return record.levelno >= logging_std.WARNING


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    # TensorFlow (TFDS, TensorBoard writers) must never take accelerator memory from JAX.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import jax

    _initialize_distributed(jax)
    from lbsgd import train
    from lbsgd.errors import LbsgdError

    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except LbsgdError as e:
        # Expected failures get their message, not a stack trace.
        print(f"lbsgd: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
