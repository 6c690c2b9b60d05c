"""Weights moved to a file-backed mapping keep their identity and values, stay writable, and their read pages leave
the resident set when handed back; a read-only file mapping's pages are dropped and read again on use."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.resident_pages import dropping_file_pages, in_mapping, move_to_file, page_out

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps: Linux")


def resident_kib(address: int) -> int:
    """The resident KiB of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_moved_tensors_keep_identity_values_and_ties_and_leave_the_resident_set(tmp_path):
    weight = torch.nn.Parameter(torch.randn(256, 1024))
    tied = torch.nn.Parameter(weight.data)  # another tensor on the same bytes, as tied embeddings are
    half, index = torch.randn(64, 64).bfloat16(), torch.arange(10)
    strided = torch.randn(8, 8).t()  # not contiguous: stays where it is
    values = [t.detach().clone() for t in (weight, half, index, strided)]
    mapping = move_to_file([weight, tied, half, index, strided], tmp_path)
    assert mapping is not None and not list(tmp_path.iterdir())  # the file is unlinked at once
    for tensor, value in zip((weight, half, index, strided), values, strict=True):
        assert tensor.dtype == value.dtype and torch.equal(tensor, value)
    assert all(in_mapping(t, mapping) for t in (weight, half, index)) and not in_mapping(strided, mapping)
    assert tied.data_ptr() == weight.data_ptr() and isinstance(weight, torch.nn.Parameter)
    assert weight.sum().item() == pytest.approx(values[0].sum().item(), rel=1e-5)  # read: resident again
    assert resident_kib(weight.data_ptr()) >= weight.nbytes // 1024 // 2
    page_out(mapping)
    assert resident_kib(weight.data_ptr()) < weight.nbytes // 1024 // 8
    assert torch.equal(weight, values[0])  # read back from the file


def test_pages_written_after_the_move_survive_page_out(tmp_path):
    weight = torch.zeros(512, 512)
    mapping = move_to_file([weight], tmp_path)
    with torch.no_grad():
        weight.add_(1.5)  # as a LoRA merge does: copy-on-write pages of this process
    page_out(mapping)
    assert torch.equal(weight, torch.full((512, 512), 1.5))


def test_read_only_file_pages_are_dropped_while_and_after_a_block_runs(tmp_path):
    path = tmp_path / "model.bin"
    data = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    with dropping_file_pages(path):
        assert float(mapped.sum()) == pytest.approx(float(data.sum()), rel=1e-4)
    assert resident_kib(mapped.ctypes.data) == 0
    assert np.array_equal(mapped, data)  # read from the file again
