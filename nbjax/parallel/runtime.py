"""Process-wide JAX settings nbjax applies before the first compile.

The persistent compilation cache is on by default: a study is hundreds of runs of the same
few programs, and a second run of a config then loads its compiled step from disk instead of
compiling it again (seconds on a CPU). ``NBJAX_COMPILATION_CACHE=''`` turns it off; a cache
directory the user already gave JAX (``JAX_COMPILATION_CACHE_DIR``) is left alone.
"""

from __future__ import annotations

import os

import jax

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "nbjax", "jax_compilation")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``directory``; returns it (or None)."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if directory is None:
        directory = os.environ.get("NBJAX_COMPILATION_CACHE", DEFAULT_CACHE)
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every program, small ones included: on a CPU even the smoke step takes seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
