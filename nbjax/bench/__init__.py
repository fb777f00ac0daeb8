"""The benchmark: nbjax step variants against a plain JAX and a PyTorch step."""
