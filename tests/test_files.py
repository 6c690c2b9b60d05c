"""ldm.files.atomic_path: a file appears complete under its name or not at all, and replaces another only if asked."""

import os

import pytest

from ldm.files import atomic_path


def test_a_finished_file_replaces_the_old_one_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    path.parent.mkdir()
    path.write_text("old")
    with atomic_path(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old", "the name still shows the old file while the new one is written"
    assert path.read_text() == "new" and os.listdir(path.parent) == ["cache.json"]


def test_without_overwrite_a_taken_name_is_refused_and_kept(tmp_path):
    path = tmp_path / "00000.png"
    path.write_text("a concurrent run's sample")
    with pytest.raises(FileExistsError), atomic_path(path, overwrite=False) as tmp:
        tmp.write_text("ours")
    assert path.read_text() == "a concurrent run's sample" and os.listdir(tmp_path) == ["00000.png"]


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="encoder failed"), atomic_path(tmp_path / "model.ckpt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("encoder failed")
    assert os.listdir(tmp_path) == []
