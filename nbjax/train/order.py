"""A run's schedule: how many steps it takes, which examples each step sees, when events fire.

The batch order of epoch e is a permutation seeded by (seed, e), so the examples of any step
are known without replaying the run: a resumed run and a population member take exactly the
batches of the run that never stopped.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from nbjax import errors


def total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
    """``train.num_steps`` if set, else ``train.num_epochs`` full batches of the train set."""
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    steps_per_epoch = num_train // config.train.batch_size
    if steps_per_epoch == 0:
        raise errors.ConfigError(f"train.batch_size={config.train.batch_size} exceeds the "
                                 f"{num_train} training examples",
                                 f"set --config.train.batch_size to at most {num_train}")
    return max(1, int(round(config.train.num_epochs * steps_per_epoch)))


class BatchOrder:
    """The indices of the examples of every step: epoch e is a permutation seeded by (seed, e).

    The remainder of each epoch that does not fill a batch is skipped, as usual.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._cache: tuple[int, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            rows = perm[: self.steps_per_epoch * self.batch_size].astype(np.int32)
            self._cache = (epoch, rows.reshape(self.steps_per_epoch, self.batch_size))
        return self._cache[1]

    def block(self, start_step: int, num_steps: int) -> np.ndarray:
        """The [num_steps, batch] indices of steps start_step .. start_step + num_steps - 1."""
        rows = [self._epoch(s // self.steps_per_epoch)[s % self.steps_per_epoch]
                for s in range(start_step, start_step + num_steps)]
        return np.stack(rows)


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (before, after]: an event due in this call."""
    return every > 0 and after // every > before // every
