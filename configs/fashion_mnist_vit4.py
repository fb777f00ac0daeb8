"""A depth-4 ViT on Fashion-MNIST, read from MNIST-format IDX files.

Default path: Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``) puts the original files in /usr/share/datasets/fashion-mnist.
Elsewhere: ``--config.data.path=DIR`` with the four ``*-ubyte.gz`` files from
https://github.com/zalandoresearch/fashion-mnist.
"""

from nbjax.config import base_config


def get_config():
    config = base_config()
    config.data.source = "idx"
    config.data.path = "/usr/share/datasets/fashion-mnist"
    config.data.augment = "crop_flip"
    config.data.augment_pad = 2
    config.train.num_epochs = 15.0
    return config
