"""The default MNIST ViT (configs/mnist_vit4.py) with single-pass token merging at half the tokens.

Patch 7 gives 16 patches + the class token = 17 tokens. ``keep_ratio=0.5`` keeps
ceil(0.5 * 17) = 9 tokens, so block 0 merges r = 8 tokens (the most bipartite matching can
merge from 17 with the class token protected) between its attention and its MLP; blocks 1-3
run on 9 tokens. Forward FLOPs/image drop from about 7.4 M to 4.2 M (-43 %, see
docs/token_merging.md and the table printed at start-up / flops.json).
"""

from pathlib import Path

from nbjax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("mnist_vit4.py"))
    config.mitigation.token_merging.mode = "single_pass"
    config.mitigation.token_merging.keep_ratio = 0.5
    config.mitigation.token_merging.r = 0  # 0: use keep_ratio
    return config
