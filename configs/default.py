"""Every config field with its one default, the paper's ImageNet recipe (lbsgd/config.py).

    python -m lbsgd.main --config=configs/default.py --workdir=runs/default
"""

from lbsgd.config import default_config


def get_config():
    return default_config()
