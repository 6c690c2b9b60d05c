"""ldm.outputs under failure: numbered PNGs that a kill or a full disk never leaves partial, and images too large to
decode."""

import errno
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ldm import outputs
from ldm.outputs import SAMPLE_NAME, image_size, load_image, save_numbered

ROOT = Path(__file__).resolve().parents[1]

# A child that starts a numbered write, says so once part of the PNG is on disk, and waits to be killed there.
SLOW_WRITER = """
import sys, time
from PIL import Image
from ldm import outputs

def slow_save(self, fp, *args, **kwargs):
    fp.write(b"\\x89PNG\\r\\n\\x1a\\n")
    fp.flush()
    print("writing", flush=True)
    time.sleep(120)

Image.Image.save = slow_save
outputs.save_numbered(Image.new("RGB", (4, 4)), sys.argv[1])
"""


def final_names(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if SAMPLE_NAME.match(name))


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_kill_during_a_png_write_leaves_no_file_under_a_sample_name(tmp_path, signum):
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout.readline() == "writing\n"
        child.send_signal(signum)
        assert child.wait(timeout=60) == -signum
    finally:
        child.kill()
        child.stdout.close()
    assert final_names(tmp_path) == []
    (leftover,) = os.listdir(tmp_path)
    assert leftover.startswith(".00000.png.") and leftover.endswith(".tmp")
    # The killed run's temporary file does not disturb the numbering of the next one.
    assert save_numbered(Image.new("RGB", (4, 4)), tmp_path).name == "00000.png"
    with Image.open(tmp_path / "00000.png") as image:
        assert image.size == (4, 4)


def test_a_failure_during_a_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_numbered(Image.new("RGB", (4, 4)), tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_name_taken_between_numbering_and_writing_is_not_overwritten(tmp_path, monkeypatch):
    (tmp_path / "00000.png").write_bytes(b"a concurrent run's sample")
    monkeypatch.setattr(outputs, "next_number", lambda folder, pattern: 0)  # as if it was counted before 00000 came
    assert save_numbered(Image.new("RGB", (4, 4)), tmp_path).name == "00001.png"
    assert (tmp_path / "00000.png").read_bytes() == b"a concurrent run's sample"
    assert final_names(tmp_path) == ["00000.png", "00001.png"] and len(os.listdir(tmp_path)) == 2


def test_without_hard_links_the_write_still_never_overwrites(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(outputs, "next_number", lambda folder, pattern: 0)
    (tmp_path / "00000.png").write_bytes(b"taken")
    path = save_numbered(Image.new("RGB", (4, 4), "red"), tmp_path, "a prompt")
    assert path.name == "00001.png" and (tmp_path / "00000.png").read_bytes() == b"taken"
    assert outputs.read_parameters(path) == "a prompt" and len(os.listdir(tmp_path)) == 2


def test_without_hard_links_a_failed_move_leaves_no_empty_file(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    def failing_replace(source, target):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        save_numbered(Image.new("RGB", (4, 4)), tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_sample_gets_the_permissions_of_an_ordinary_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_numbered(Image.new("RGB", (4, 4)), tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_full_disk_during_a_write_raises_and_leaves_nothing(tmp_path, monkeypatch):
    def full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError) as err:
        save_numbered(Image.new("RGB", (4, 4)), tmp_path)
    assert err.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


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
