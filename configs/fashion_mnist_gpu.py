"""The Fashion-MNIST study sized for one GPU: ResNet-20, 30 epochs, kn = 64 ... 16384.

The recipe of configs/fashion_mnist.py (the paper's, unchanged), with a 2.9x more expensive
model and 2.5x the epochs: x0.1 at epochs 15, 22 and 27, gradual warmup over 5 epochs (the
paper's) wherever kn > 256. Run on one H200 on 2026-11-26, seed 0 (docs/results.md: flat to
kn = 1024, 0.51 points worse at 4096, broken at 8192 and 16384); one run per kn:

    for kn in 64 256 1024 4096 8192 16384; do
      JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache python -m lbsgd.main \\
        --config=configs/fashion_mnist_gpu.py --workdir=runs/fmnist-gpu/kn$kn \\
        --config.global_batch_size=$kn
    done
"""

from lbsgd.config import default_config


def get_config():
    # Self-contained (not importing configs/fashion_mnist.py): a config loads from any directory.
    config = default_config()
    config.update(model="cifar_resnet20", dtype="bfloat16", dataset="fashion_mnist",
                  num_classes=10, image_size=28, global_batch_size=256, eval_batch_size=1000,
                  warmup="gradual", warmup_epochs=5, num_epochs=30, lr_decay_epochs=(15, 22, 27),
                  log_every_steps=10)
    return config
