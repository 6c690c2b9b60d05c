"""Training data: ``DataModuleFromConfig`` (``base``), caption-image folders (``folder``; kohya's layout with
aspect-ratio buckets in ``captions`` and ``buckets``, latent caching in ``latent_cache``, DreamBooth prior
preservation in ``prior``), WebDataset tar shards
(``webdataset``), a synthetic coloured-shapes dataset (``shapes``), and local copies of the datasets the CompVis
configs name: ImageNet and its super-resolution pairs (``imagenet``), LSUN (``lsun``), CelebA-HQ and FFHQ
(``faces``).

Every dataset yields dicts in the CompVis layout: an image under ``image_key`` (default ``"jpg"`` for photos,
``"image"`` for shapes and the CompVis datasets) as float32 ``(H, W, 3)`` in [-1, 1], and its caption under
``caption_key`` (``"txt"``) or its labels (``class_label`` ...).
"""
