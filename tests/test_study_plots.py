"""The study report's figures name every arm and method they draw."""

from nbjax.study import findings as fd
from nbjax.study import plots, study_plots


def _cell(method, sparsity, arm, seed, accuracy):
    return fd.Cell(name=f"{method}_s{sparsity}_{arm}_seed{seed}", dataset="mnist",
                   method=method, sparsity=sparsity, arm=arm, seed=seed, accuracy=accuracy,
                   burden_index=None, selection=None, compensation=None, wall_time_s=None)


def test_legend_names_labels_the_last_panel_lacks():
    fig, axes = plots.panels(1, 2)
    plots.curves(axes[0, 0], {"none": ([0.5], [98.0], None), "tome": ([0.5], [97.0], None)})
    plots.curves(axes[0, 1], {"none": ([0.5], [96.0], None)})
    legend = plots.legend(axes)
    assert [t.get_text() for t in legend.get_texts()] == ["none", "tome"]
    assert axes[0, 1].get_legend() is legend and axes[0, 0].get_legend() is None
    plots.discard(fig)


def test_legend_of_unlabelled_panels_is_none():
    fig, axes = plots.panels(1, 2)
    assert plots.legend(axes) is None
    plots.discard(fig)


def test_accuracy_figure_is_written_when_the_last_method_has_one_arm(tmp_path):
    cells = [_cell("gmp", s, arm, seed, 98.0 - 10 * s - seed)
             for s in (0.5, 0.9) for arm in ("none", "tome") for seed in (0, 1)]
    cells.append(_cell("rigl", 0.5, "none", 0, 97.0))
    path = study_plots.accuracy_vs_sparsity(cells, str(tmp_path / "acc.png"))
    assert path == str(tmp_path / "acc.png") and (tmp_path / "acc.png").stat().st_size > 0
