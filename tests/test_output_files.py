"""ldm.outputs under failure: images too large to decode."""

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ldm import outputs
from ldm.outputs import image_size, load_image


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header says ``width`` x ``height``: only a reader that decodes it finds out."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # after the signature and IHDR's length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_an_image_too_large_to_decode_in_the_memory_there_is_is_refused_unread(tmp_path, monkeypatch, recwarn):
    big = png_claiming(tmp_path / "big.png", 12000, 12000)  # 144M pixels: below PIL's decompression-bomb error
    assert image_size(big) == (12000, 12000)
    monkeypatch.setattr(outputs, "available_memory", lambda device: 100 * 2**20)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the image was decoded"))
    with pytest.raises(ValueError) as err:
        load_image(big, "init image")
    assert str(err.value) == (
        f"init image '{big}' is 12000x12000: decoding it needs about 1.1 GiB of memory but 0.1 GiB is available; "
        "give a smaller image."
    )
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)], "ours replaces PIL's"
