"""Test set-up: several CPU devices, so sharding code is exercised for real.

XLA reads the flag once, before JAX initialises its backends, so it is set here, at import
time of the test session, before any test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
