"""Training data: ``DataModuleFromConfig`` (``base``), caption-image folders (``folder``), WebDataset tar shards
(``webdataset``) and a synthetic coloured-shapes dataset (``shapes``).

Every dataset yields dicts in the CompVis layout: an image under ``image_key`` (default ``"jpg"`` for photos,
``"image"`` for shapes) as float32 ``(H, W, 3)`` in [-1, 1], and its caption under ``caption_key`` (``"txt"``).
"""
