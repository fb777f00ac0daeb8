"""Test set-up: several CPU devices, so sharding code is exercised for real, and a persistent
compilation cache, so the many tests that compile the same small programs compile them once.

XLA reads its flags once, before JAX initialises its backends, so they are set here, at
import time of the test session, before any test module imports jax. Besides the device
count, the tests compile at XLA:CPU's optimisation level 1: most of a test's time is code
generation for the tiny test models, and level 1 cuts it by about a quarter
(docs/performance.md). Child processes get the same flags (helpers.xla_flags) and, through
``NBJAX_COMPILATION_CACHE``, the same cache: a CLI run, a notebook kernel or one of several
processes loads what the in-process tests compiled, and nothing is written to ~/.cache.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from nbjax.parallel import runtime  # noqa: E402

CACHE = os.environ.get("NBJAX_TEST_CACHE",
                       str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"))
os.environ["NBJAX_COMPILATION_CACHE"] = CACHE
runtime.enable_compilation_cache(CACHE)
del jax
