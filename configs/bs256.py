"""The paper's baseline: ResNet-50 on ImageNet, kn = 256 (Goyal et al., Table 1 / Fig. 2).

k = 8 workers of n = 32 images, lr = 0.1 (the reference rate, no warmup needed), momentum 0.9,
weight decay 1e-4, x0.1 at epochs 30, 60 and 80 of 90. The paper reports 23.60% +- 0.12 top-1
error. Run it on 8 GPUs (or anything: the virtual workers keep n = 32):

    python -m lbsgd.main --config=configs/bs256.py --workdir=runs/bs256
"""

from lbsgd.config import default_config


def get_config():
    config = default_config()
    config.global_batch_size = 256
    config.warmup = "none"  # kn = 256 is the reference: the rate starts at 0.1 already
    return config
