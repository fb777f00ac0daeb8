"""Equal-compute training for token-merging cells: the factor by which a merging run trains
longer so that its training FLOPs equal those of the same run without merging.

The factor is forward FLOPs per image unmerged / merged, both from the analytic (matmul)
count of :func:`nbjax.tome.cost.cost_report`: it is the same on every machine, so an
equal-compute cell has one config wherever it runs (XLA's compiled count varies by backend).
Training FLOPs are steps × (forward + backward), and the backward scales with the forward.
"""

from __future__ import annotations

import json

import ml_collections


class FlopsScaler:
    """Scales a merging config's training length; caches the dataset shape per data config."""

    def __init__(self) -> None:
        self._shapes: dict[str, tuple[int, tuple[int, ...]]] = {}

    def _data_shape(self, config: ml_collections.ConfigDict) -> tuple[int, tuple[int, ...]]:
        """(num_classes, image_shape) of the config's dataset (synthetic: from the config)."""
        d = config.data
        if d.source == "synthetic":
            size = int(d.synthetic_image_size)
            return int(d.synthetic_num_classes), (size, size, int(d.synthetic_channels))
        key = json.dumps(d.to_dict(), sort_keys=True)
        if key not in self._shapes:
            from nbjax.data import pipeline as data_lib

            dataset = data_lib.load_dataset(d)
            self._shapes[key] = (dataset.num_classes, tuple(dataset.image_shape))
        return self._shapes[key]

    def factor(self, config: ml_collections.ConfigDict) -> float:
        """Analytic forward FLOPs without merging / with the config's merging."""
        from nbjax.tome import cost

        num_classes, image_shape = self._data_shape(config)
        report = cost.cost_report(config, num_classes, image_shape, compiled=False)
        return report.analytic_unmerged / report.analytic_merged

    def scale_training(self, config: ml_collections.ConfigDict) -> float:
        """Multiplies ``train.num_steps`` (if set, rounded) or ``train.num_epochs`` by the
        factor, in place; returns the factor."""
        factor = self.factor(config)
        if config.train.num_steps > 0:
            config.train.num_steps = int(round(config.train.num_steps * factor))
        else:
            config.train.num_epochs = float(config.train.num_epochs) * factor
        return factor
