"""An HTTP server that speaks A1111's API (``/sdapi/v1/*``), with a web page: ``python scripts/serve.py``.

:mod:`.cli` starts it; :mod:`.app` builds the ASGI app and its guards; :mod:`.routes` has the endpoints;
:mod:`.schemas` the A1111 request bodies; :mod:`.translate` turns them into checked
:class:`~ldm.request.GenerationRequest` s; :mod:`.jobs` is the queue and its worker thread; :mod:`.service` the
loaded model; :mod:`.catalog` the checkpoints it may switch to; :mod:`.images` base64 images in and out;
:mod:`.preview` the live preview; :mod:`.errors` the JSON errors. The page is ``static/``.
"""
