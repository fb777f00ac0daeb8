"""``python -m nbjax.bench``."""

from nbjax.bench.runner import run

run()
