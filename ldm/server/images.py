"""Images in JSON: base64 PNG out (with the A1111 ``parameters`` text), base64 images in, checked.

The server never opens a file a request names: an image is its bytes, in base64 (a ``data:`` URL prefix is
accepted, as A1111 does). Decoding is bounded: the base64 text by the body size limit, the decoded image by
:data:`MAX_PIXELS` before its pixels are read.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from ldm.outputs import png_info
from ldm.server.errors import FieldError

# 64 megapixels: far above what any model here generates (SDXL is 1 MP), far below what would exhaust memory.
MAX_PIXELS = 1 << 26
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """A PIL image as a base64 PNG string, with ``parameters`` (A1111 infotext) as its text chunk."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(parameters))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_bytes(text: str, field: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise FieldError(field, f"{field}: give the image as a base64 string.")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    elif text.startswith(("http://", "https://", "/", "./", "file:")):
        raise FieldError(field, f"{field}: give the image itself, base64 encoded: the server opens no paths or URLs.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, f"{field} is not valid base64; send the image file's bytes base64 encoded.") from None


@contextmanager
def _opened(text: str, field: str) -> Iterator[Image.Image]:
    """The image of a base64 field, opened (pixels not yet read) and checked for format and size."""
    try:
        with Image.open(io.BytesIO(_image_bytes(text, field))) as image:
            if image.format not in FORMATS:
                raise FieldError(field, f"{field} is a {image.format} image; send PNG, JPEG, WebP, BMP or GIF.")
            if image.width * image.height > MAX_PIXELS:
                megapixels = MAX_PIXELS // 1_000_000
                raise FieldError(field, f"{field} is {image.width}x{image.height}, over the {megapixels} MP accepted.")
            yield image
    except Image.UnidentifiedImageError:
        raise FieldError(field, f"{field} is not an image file; send PNG, JPEG, WebP, BMP or GIF.") from None
    except (OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise FieldError(field, f"{field} does not decode as an image ({err}).") from None


def decode_image(text: str, field: str, mode: str = "RGB") -> Image.Image:
    """A base64 image (PNG, JPEG, WebP, BMP, GIF) of a request field, loaded in ``mode``.

    FieldError naming ``field`` when it is not base64, not an image, or larger than :data:`MAX_PIXELS`.
    """
    with _opened(text, field) as image:
        image.load()
        return image.convert(mode)


def image_texts(text: str, field: str) -> dict[str, str]:
    """The text chunks of a base64 image (a PNG's ``parameters`` among them), checked as :func:`decode_image`."""
    with _opened(text, field) as image:
        image.load()
        return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
