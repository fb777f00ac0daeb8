"""A tiny run on synthetic data: seconds on a laptop CPU, for tests and CI."""

from nbjax.config import base_config


def get_config():
    config = base_config()
    config.data.source = "synthetic"
    config.data.synthetic_num_train = 512
    config.data.synthetic_num_test = 200
    config.data.synthetic_image_size = 8
    config.data.synthetic_channels = 1
    config.data.synthetic_num_classes = 4
    config.model.image_size = 8
    config.model.patch_size = 2
    config.model.hidden_dim = 16
    config.model.depth = 2
    config.model.num_heads = 2
    config.model.mlp_dim = 32
    config.train.batch_size = 32
    config.train.num_steps = 40
    config.train.warmup_steps = 5
    config.train.steps_per_call = 4
    config.train.log_every = 8
    config.train.eval_batch_size = 64
    config.train.checkpoint_every = 16
    config.pruning.update_every = 4
    config.pruning.persistent_update_every = 4
    config.burden.every = 4
    return config
