"""``scripts/benchmark.py``: this project's txt2img timed against its peers' on the same weights (see the script's
docstring for what is measured and how).

:mod:`.settings` checks the request, :mod:`.weights` makes the seeded random weights, :mod:`.ldm_engine` (both of
this project's engines), :mod:`.comparison` (diffusers, and the checks that the engines agree),
:mod:`.openvino_diffusers` and :mod:`.sdcpp_engine` run the pipelines, :mod:`.run` times them, :mod:`.peak_memory`
measures their peak memory in fresh processes, :mod:`.report` formats the results and :mod:`.plot` draws them.
"""
