"""The paper's headline: ResNet-50 on ImageNet with kn = 8192 in one hour (Goyal et al., Fig. 1).

k = 256 workers of n = 32 images; linear scaling rule lr = 0.1 x 8192 / 256 = 3.2, reached by
gradual warmup over 5 epochs from 0.1; x0.1 at epochs 30, 60, 80 of 90; 156 steps per epoch.
The paper reports 23.74% +- 0.09 top-1 error (vs 23.60% at kn = 256).

    python -m lbsgd.main --config=configs/bs8192.py --workdir=runs/bs8192
"""

from lbsgd.config import default_config


def get_config():
    config = default_config()
    config.global_batch_size = 8192
    config.eval_batch_size = 1024
    config.warmup = "gradual"
    config.warmup_epochs = 5
    return config
