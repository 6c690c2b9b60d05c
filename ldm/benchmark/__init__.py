"""``scripts/benchmark.py``: this project's txt2img timed against diffusers' on the same weights (see the script's
docstring for what is measured and how).

:mod:`.settings` checks the request, :mod:`.weights` makes the seeded random weights, :mod:`.ldm_engine` and
:mod:`.comparison` run the two pipelines (and check that they agree), :mod:`.run` times them, :mod:`.peak_memory`
measures their peak memory in fresh processes, :mod:`.report` formats the results.
"""
