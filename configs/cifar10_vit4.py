"""A depth-4 ViT on CIFAR-10 (the paper's second dataset).

Reads the official python archive directory by default (``cifar-10-batches-py``, from
https://www.cs.toronto.edu/~kriz/cifar.html). Other ways to give it the data:

  --config.data.path=/path/to/cifar-10-batches-py
  --config.data.source=tfds --config.data.tfds_name=cifar10 --config.data.tfds_data_dir=DIR
  --config.data.source=image_folder --config.data.path=../shared/data/cifar10-jpeg
      (a JPEG copy, not bit-exact: results on it must say so)
"""

from nbjax.config import base_config


def get_config():
    config = base_config()
    config.data.source = "cifar10_python"
    config.data.path = "data/cifar-10-batches-py"
    config.data.augment = "crop_flip"
    config.model.image_size = 32
    config.model.patch_size = 4
    config.model.hidden_dim = 128
    config.model.num_heads = 4
    config.model.mlp_dim = 256
    config.train.batch_size = 128
    config.train.num_epochs = 30.0
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 0.05
    config.train.label_smoothing = 0.1
    config.train.eval_every = 3900
    return config
