"""The paper's CIFAR-10 grid on one GPU, trained as populations (``scripts/device_study.sh``).

Dense, plus gmp / rigl / set / static / pdwp × sparsity 0.5 / 0.9 / 0.98 × mitigation none /
both (static and pdwp have no "both": it would repeat their tome cell, which this grid does
not have), seeds 0-2, 100 epochs: 75 cells in 9 compiled programs, so 9 populations of at most
9 members. Data: the JPEG copy of CIFAR-10 in ``../shared/data/cifar10-jpeg`` (not bit-exact
CIFAR-10: results on it must say so). ``timing`` holds the step times ``--dry-run`` estimates
from: the H200 figures of docs/performance.md, and assumptions where nothing was measured.

    python -m nbjax.study --config configs/study_cifar10_gpu.py --workdir DIR \\
        --records OUT/cifar10_gpu/cells --population_size 16
"""

from pathlib import Path

import ml_collections

from nbjax.config import load_config_file
from nbjax.study.grid import grid_config, study_config


def timing() -> ml_collections.ConfigDict:
    """Step times on one NVIDIA H200 (docs/performance.md, "GPU: NVIDIA H200", CIFAR-10
    config, steps_per_call 10): the full step (gmp + burden) 2.49 ms, with token merging
    2.15 ms, used for every method. Not measured, assumed: 30 s to compile each population's
    programs (2.5 × the 11.9 s first compile of the MNIST full step there), 60 s to start
    and load the data once; a population's per-member step time is unknown (0), so
    ``--dry-run`` counts each member at the single run's step time, an upper bound."""
    return ml_collections.ConfigDict(dict(
        source="one NVIDIA H200, docs/performance.md (2.49 ms/step, 2.15 with token merging; "
               "compile 30 s per population and set-up 60 s assumed)",
        step_s=2.49e-3, tome_step_s=2.15e-3, member_step_s=0.0, member_tome_step_s=0.0,
        compile_s=30.0, setup_s=60.0, train_examples=50_000))


def get_config():
    base = load_config_file(Path(__file__).with_name("cifar10_vit4.py"))
    base.data.source = "image_folder"
    base.data.path = "../shared/data/cifar10-jpeg"
    base.train.num_epochs = 100.0
    base.train.eval_every = 0
    base.train.progress = False
    grid = grid_config(methods=("gmp", "rigl", "set", "static", "pdwp"),
                       sparsities=(0.5, 0.9, 0.98), mitigations=("none", "both"),
                       seeds=(0, 1, 2))
    study = study_config(name="cifar10_gpu", base=base, grid=grid)
    study.timing = timing()
    return study
