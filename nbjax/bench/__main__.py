"""``python -m nbjax.bench``: compile time, step time, img/s, FLOPs and memory of nbjax's train
step, in several variants timed side by side.

    python -m nbjax.bench --config configs/mnist_vit4.py [--config.key=value ...] \\
        [--variants plain_jax,dense,gmp,rigl,gmp+burden,rigl+burden,gmp+burden+tome] \\
        [--steps 200] [--warmup 2] [--json out.json] [--torch] [--devices N] \\
        [--population 1,2,4,8 [--population_variant gmp+burden]]

A variant is ``plain_jax`` (a minimal jitted step), ``dense`` (nbjax's step without masks)
or a pruning method, each with optional ``+burden`` (the burden metrics), ``+tome`` (token
merging) and ``+bf16`` (bfloat16 compute). ``--population`` also times, for each size N, N
members of one variant trained as one vmapped program beside its single run.
docs/performance.md explains every figure.
"""

from nbjax.bench.cli import run

run()
