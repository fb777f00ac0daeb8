"""Test set-up: several CPU devices, so sharding code is exercised for real, and a persistent
compilation cache, so the many tests that compile the same small programs compile them once.

XLA reads the device flag once, before JAX initialises its backends, so it is set here, at
import time of the test session, before any test module imports jax.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from nbjax.parallel import runtime  # noqa: E402

runtime.enable_compilation_cache(
    os.environ.get("NBJAX_TEST_CACHE",
                   str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache")))
del jax
