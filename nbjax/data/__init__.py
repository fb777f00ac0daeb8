"""Data: the config, the loaders and the JAX transforms."""
