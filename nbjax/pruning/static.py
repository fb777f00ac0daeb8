"""Methods whose mask never changes: ``static`` (random mask at step 0) and ``none`` (dense).

``static`` draws a uniformly random mask at ``pruning.sparsity`` at step 0 (per-leaf targets
from the distribution, exact counts; or one global draw of exactly num_to_keep(N, s)) and
keeps it: the floor every method must beat. It has no magnitude criterion and no mask update,
so it has no persistent variant (``mitigation.persistent=True`` is refused).

``none`` is the dense reference: all-ones masks. ``mitigation.persistent`` is a no-op for it
(nothing is pruned, so nothing needs to persist).

Both log the same metrics as every other method (``pruning/mask_updated`` is always 0).
"""

from __future__ import annotations

import ml_collections

from nbjax.pruning import common
from nbjax.pruning import masks as masks_lib
from nbjax.pruning.base import Pruner, prunable, register


@register("static", persistent_variant=False, random_fixed_mask=True)
def static(config: ml_collections.ConfigDict, total_steps: int) -> Pruner:
    """A random mask fixed at step 0."""
    del total_steps

    def init(params, rng):
        paths = prunable(params, config)
        masks, targets = common.random_initial_masks(params, paths, config, rng)
        return masks, common.init_state(masks, targets, float(config.pruning.sparsity))

    return Pruner("static", persistent=False, init=init, update=common.fixed_update)


@register("none", prunes=False)
def dense(config: ml_collections.ConfigDict, total_steps: int) -> Pruner:
    """The dense reference: all-ones masks that never change."""
    del total_steps

    def init(params, rng):
        del rng
        paths = prunable(params, config)
        masks = masks_lib.ones_masks(params, paths)
        return masks, common.init_state(masks, {p: 0.0 for p in paths}, 0.0)

    return Pruner("none", persistent=False, init=init, update=common.fixed_update,
                  starts_dense=True)
