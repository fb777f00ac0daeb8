"""nbjax: neural burden of pruning-during-training in Vision Transformers, in JAX/Flax."""

__version__ = "0.1.0"
