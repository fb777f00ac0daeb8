"""``python -m nbjax.study``."""

from nbjax.study.runner import main

main()
