"""A population's compiled pieces: the member-stacked state, the vmapped train call and eval.

The state is one :class:`~nbjax.train.state.TrainState` whose leaves carry a leading member
axis, except the step counter: members step in lockstep, and an unbatched step keeps the
pruning schedules' ``lax.cond`` a branch (under ``vmap`` a batched predicate would run both
branches every step). The train step is ``jax.vmap`` of the single run's step
(:func:`nbjax.train.step.make_train_step`), so a member computes what the same run alone
computes; the member and batch axes are laid out on :func:`nbjax.parallel.mesh.population_mesh`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from nbjax import config as config_lib
from nbjax.burden import tracker as burden_tracker
from nbjax.data import pipeline as data_lib
from nbjax.model import build as model_build
from nbjax.parallel import mesh as sharding_lib
from nbjax.parallel.together import CompiledTogether
from nbjax.population import members as members_lib
from nbjax.pruning import make_pruner
from nbjax.train import hparams as hparams_lib
from nbjax.train import loop as loop_lib
from nbjax.train import optimizer as optimizer_lib
from nbjax.train import order as order_lib
from nbjax.train import state as state_lib
from nbjax.train import step as train

# vmap axes of the population state: every leaf on axis 0 but the shared step counter
STATE_AXES = state_lib.TrainState(step=None, params=0, masks=0, opt_state=0, pruning=0,
                                  burden=0, rng=0, hparams=0)


@dataclass
class Population(loop_lib.Run):
    """The compiled pieces of a population of ``len(configs)`` members: a single run's pieces
    (``config`` is member 0's, the shared program), member-stacked, with

    * ``train_call``: ``(state, images, labels, idx[k, N, B]) -> (state, metrics[k, N])``;
    * ``eval_step``: ``(params, masks, images, labels, idx[B], valid[B]) -> sums[N]``.
    """

    configs: list[ml_collections.ConfigDict]

    @property
    def size(self) -> int:
        return len(self.configs)


def build(configs: Sequence[ml_collections.ConfigDict],
          dataset: data_lib.Dataset | None = None, mesh: Any = None) -> Population:
    """Loads data, builds the shared model, pruner and tracker, the stacked state, and jits
    the vmapped steps. ``configs`` must differ only in per-member keys (members.check)."""
    configs = list(configs)
    for config in configs:
        config_lib.validate(config)
    members_lib.check(configs)
    first = configs[0]
    dataset = loop_lib.checked_dataset(first, dataset)
    mesh = sharding_lib.population_mesh(len(configs)) if mesh is None else mesh
    loop_lib.check_batch_sizes(first, mesh.shape[sharding_lib.DATA_AXIS],
                               len(dataset.train_labels))
    steps = order_lib.total_steps(first, len(dataset.train_labels))
    model = model_build.build_model(first, dataset.num_classes)
    pruner = make_pruner(first, steps)  # its update reads each member's hparams
    tracker = burden_tracker.make_tracker(first, model, pruner, dataset.image_shape) \
        if first.burden.enabled else None

    def init() -> state_lib.TrainState:
        return _init_members(configs, model, steps, dataset.image_shape, tracker)

    shardings = _state_shardings(jax.eval_shape(init), mesh)
    state = jax.jit(init, out_shardings=shardings)()
    step = train.make_train_step(first, model, pruner, dataset.num_classes, dataset.mean,
                                 dataset.std, total_steps=steps, tracker=tracker)
    member_step = jax.vmap(step, in_axes=(STATE_AXES, None, None, 0), out_axes=(STATE_AXES, 0))
    repl = sharding_lib.replicated(mesh)
    train_call = CompiledTogether(jax.jit(train.make_train_call(member_step), donate_argnums=0,
                                          out_shardings=(shardings, repl)), "population_train")
    eval_step = CompiledTogether(jax.jit(jax.vmap(
        train.make_eval_step(model, dataset.num_classes, dataset.mean, dataset.std),
        in_axes=(0, 0, None, None, None, None)), out_shardings=repl), "population_eval")
    return Population(config=first, configs=configs, dataset=dataset, mesh=mesh, state=state,
                      state_shardings=shardings, train_call=train_call, eval_step=eval_step,
                      total_steps=steps, pruner=pruner,
                      **loop_lib.device_data(dataset, mesh))


def _init_members(configs: list[ml_collections.ConfigDict], model: Any, steps: int,
                  image_shape: tuple[int, ...],
                  tracker: burden_tracker.BurdenTracker | None) -> state_lib.TrainState:
    """The stacked step-0 state: each member exactly as its run alone would start.

    Members that differ only in the seed are initialised together under ``vmap`` over the
    seed; a member's own pruner builds its initial mask (static and DST draw it at the
    member's sparsity).
    """
    by_rest: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        rest = config_lib.flat_items(config)
        rest.pop("seed")
        by_rest.setdefault(repr(sorted(rest.items())), []).append(i)
    parts, order = [], []
    for indices in by_rest.values():
        config = configs[indices[0]]
        tx = optimizer_lib.make_optimizer(config, steps)
        pruner = make_pruner(config, steps)
        hparams = hparams_lib.from_config(config)

        def one(seed, tx=tx, pruner=pruner, hparams=hparams):
            return state_lib.init_state(model, tx, pruner, image_shape, seed, hparams,
                                        burden_init=tracker.init if tracker else None)

        seeds = jnp.asarray([configs[i].seed for i in indices], jnp.int32)
        parts.append(jax.vmap(one)(seeds))
        order.extend(indices)
    position = jnp.asarray([order.index(i) for i in range(len(configs))], jnp.int32)
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs)[position], *parts)
    return stacked.replace(step=jnp.zeros((), jnp.int32))


def _state_shardings(abstract: state_lib.TrainState, mesh: Any) -> state_lib.TrainState:
    """Every member-stacked leaf split over the ``member`` axis, the step replicated."""
    member = sharding_lib.member_sharding(mesh)
    shardings = jax.tree.map(lambda _: member, abstract)
    return shardings.replace(step=sharding_lib.replicated(mesh))


def member_state(state: state_lib.TrainState, index: int) -> state_lib.TrainState:
    """Member ``index``'s own state, as its run alone would hold it."""
    return jax.tree.map(lambda x: x[index], state.replace(step=None)).replace(step=state.step)
