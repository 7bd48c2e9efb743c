"""Command line: python -m lbsgd.main --config=configs/NAME.py --workdir=DIR [--config.F=V ...].

`--print_config` prints the resolved config, every field with its comment, and exits.

Rerunning the same command with the same workdir resumes from the latest checkpoint. A
problem the user can fix (a bad config, data, checkpoint, or a diverged run) ends the command
with one `lbsgd: ...` line and a non-zero exit code, never a traceback (lbsgd/errors.py).
"""

import os

# TensorFlow's C++ start-up INFO lines are not ours to show; set before anything imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lbsgd import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside "
    "TPU pods and SLURM (where jax.distributed finds it by itself).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (every field, with its comment and "
    "--config.F=V overrides applied) and exit; no --workdir needed.")
flags.mark_flags_as_required(["config"])


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every problem of the flags or the config in one line."""
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.get("model")  # a config file that failed to load raises on first read
    except flags.Error as error:
        raise SystemExit(f"lbsgd: {error}") from None
    except Exception as error:  # noqa: BLE001 - whatever the config file itself raised
        raise SystemExit(f"lbsgd: {cli.config_problem(error, argv)}") from None
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _PRINT_CONFIG.value:
        from lbsgd.config import describe

        print(describe(_CONFIG.value))
        return
    if not _WORKDIR.value:
        raise SystemExit("lbsgd: --workdir is required: the run's directory (checkpoints, "
                         "metrics.jsonl, config.json); rerunning with the same one resumes")

    def train_and_evaluate():
        import jax

        _initialize_distributed(jax)
        from lbsgd import train

        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)

    cli.run(train_and_evaluate)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
