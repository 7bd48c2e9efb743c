"""The paper's recipe on Fashion-MNIST (60,000 real 28x28 images), small enough for 2 CPU cores.

Everything of Goyal et al. 2017 is unchanged (lr = 0.1 x kn / 256, n = 32 images per BN
worker, momentum 0.9 as eq. (9), weight decay 1e-4 not on BN's gamma/beta, loss / kn,
zero-gamma, He init); only the model and the budget are small: a CIFAR-style ResNet-8, no
augmentation, 12 epochs with the rate x0.1 at epochs 6, 9 and 11 (the 30/60/80-of-90 shape,
shortened), gradual warmup over 2 epochs (a no-op at kn <= 256). At kn = 256: 234 steps per
epoch. docs/results.md has the pre-registered study built on it.

    apt-get install dataset-fashion-mnist      # or --config.manual_dir=DIR with the IDX files
    python -m lbsgd.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
"""

from lbsgd.config import default_config


def get_config():
    config = default_config()
    config.model = "cifar_resnet8"
    config.dataset = "fashion_mnist"
    config.num_classes = 10
    config.image_size = 28
    config.global_batch_size = 256
    config.eval_batch_size = 1000  # 10,000 test images: 10 batches, divisible by 1 or 8 devices
    config.warmup = "gradual"
    config.warmup_epochs = 2
    config.num_epochs = 12
    config.lr_decay_epochs = (6, 9, 11)
    config.log_every_steps = 50
    return config
