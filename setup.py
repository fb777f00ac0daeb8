"""nbjax: neural burden of pruning-during-training in Vision Transformers (JAX/Flax)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="nbjax",
    version="0.1.0",
    description="Study and mitigate the neural burden of pruning-during-training in ViTs.",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["nbjax", "nbjax.*"]),
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.11.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.6",
        "importlib_resources>=6.0",  # tensorflow-datasets needs it on Python 3.11, undeclared
        "array_record>=0.5.0",  # TFDS data sources without TensorFlow
        "ml-collections>=1.0.0",
        "absl-py>=2.0.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6.1",  # TensorBoard event files without TensorFlow (docs/tensorboard.md)
        "safetensors>=0.4",  # nbjax.export
    ],
    extras_require={
        "test": ["pytest>=8.0", "ruff>=0.6", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",
                 "tensorboard>=2.16"],
        # the TensorBoard viewer (`tensorboard --logdir RUN`; nbjax itself only writes)
        "tensorboard": ["tensorboard>=2.16"],
        # gcsfs: gs:// workdirs (etils.epath reads and writes them through fsspec/gcsfs)
        "gcs": ["gcsfs>=2024.2.0"],
        "tpu": ["jax[tpu]>=0.7.0", "gcsfs>=2024.2.0"],
        "cuda": ["jax[cuda12]>=0.7.0", "gcsfs>=2024.2.0"],
        # bench: the PyTorch eager reference of `python -m nbjax.bench --torch` (CPU wheel)
        "bench": ["torch>=2.2"],
    },
    entry_points={"console_scripts": ["nbjax-train=nbjax.main:run",
                                      "nbjax-bench=nbjax.bench.cli:run"]},
)
