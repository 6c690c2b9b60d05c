"""Hostile checkpoints: nothing in a file runs, nothing hangs, memory stays within what the file holds, and every
refusal is one line naming the reason. The files are written by ``tests/hostile_files.py`` in the published formats."""

import functools
import os
import pickle
import re
import signal
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hostile_files import (
    float_state,
    legacy_stream,
    pickle_with_storages,
    write_safetensors_header,
    write_tar_with_fifo,
    write_torchscript,
    write_zip_checkpoint,
)
from omegaconf import OmegaConf

import main
from ldm import cli
from ldm.checkpoint import CheckpointError, load_state_dict_into, read_checkpoint
from ldm.lazy_checkpoint import open_checkpoint
from ldm.util import apply_overrides, instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
SHAPES_TINY = ROOT / "configs" / "latent-diffusion" / "shapes-tiny.yaml"


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: the attacks below used to block forever."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_lazily(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor through the loader's reader, one at a time."""
    tensors, _ = open_checkpoint(path)
    return {key: tensors[key] for key in tensors}


def refused(path: Path, match: str) -> str:
    """Refused with a one-line CheckpointError, both by read_checkpoint and by the lazy reader that loading uses."""
    for read in (read_checkpoint, read_lazily):
        with deadline(30), pytest.raises(CheckpointError, match=match) as err:
            read(path)
        assert "\n" not in str(err.value)
    return str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# Code execution: a TorchScript archive, through every entry point that reads a checkpoint


@pytest.fixture
def torchscript(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "sitecustomize.py"
    return write_torchscript(tmp_path / "evil.ckpt", marker), marker


def test_the_torchscript_file_really_runs_code_when_jit_loaded(torchscript):
    path, marker = torchscript
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path))  # what torch.load(weights_only=False) hands such a file to
    assert marker.exists()


def test_torchscript_is_refused_by_the_reader(torchscript):
    path, marker = torchscript
    refused(path, "TorchScript archive")
    assert not marker.exists()


def test_torchscript_is_refused_by_txt2img_ckpt(torchscript, tiny_files, tmp_path, capsys):
    path, marker = torchscript
    code = cli.main("txt2img", tiny_files_args(tiny_files, path, tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and re.fullmatch(r"error: .*TorchScript archive.*\n", err)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["model.params.ckpt_path", "model.params.first_stage_config.params.ckpt_path"])
def test_torchscript_is_refused_as_a_config_ckpt_path(torchscript, tiny_config, key):
    path, marker = torchscript
    config = apply_overrides(tiny_config, [f"{key}={path}"])
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        instantiate_from_config(config.model, path="model")
    assert not marker.exists()


@pytest.mark.parametrize("key", ["model.params.ckpt_path", "model.params.first_stage_config.params.ckpt_path"])
def test_torchscript_is_refused_by_main_py(torchscript, tmp_path, capsys, key):
    path, marker = torchscript
    code = main.main(["--base", str(SHAPES_TINY), "-t", "-l", str(tmp_path / "logs"), f"{key}={path}"])
    err = capsys.readouterr().err
    assert code == 2 and re.fullmatch(r"error: .*TorchScript archive.*\n", err)
    assert not marker.exists() and not (tmp_path / "logs").exists()


def test_torchscript_is_refused_as_the_checkpoint_to_resume(torchscript, tmp_path, capsys):
    path, marker = torchscript
    logdir = tmp_path / "logs" / "2026-01-01T00-00-00_shapes-tiny"
    (logdir / "configs").mkdir(parents=True)
    (logdir / "configs" / "2026-01-01T00-00-00-project.yaml").write_text(SHAPES_TINY.read_text())
    (logdir / "checkpoints").mkdir()
    os.replace(path, logdir / "checkpoints" / "last.ckpt")
    before = sorted(logdir.rglob("*"))
    code = main.main(["-r", str(logdir), "-t"])
    err = capsys.readouterr().err
    assert code == 2 and re.fullmatch(r"error: cannot resume from .*TorchScript archive.*\n", err)
    assert not marker.exists() and sorted(logdir.rglob("*")) == before


def test_a_torchscript_safety_checker_in_the_working_directory_is_refused(
    torchscript, tiny_files, tmp_path, capsys, monkeypatch
):
    path, marker = torchscript
    folder = tmp_path / "models" / "safety_checker"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    os.replace(path, folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    code = cli.main("txt2img", tiny_files_args(tiny_files, tiny_files / "tiny.safetensors", tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "TorchScript archive" in err and err.count("\n") == 1
    assert not marker.exists() and not list((tmp_path / "out").rglob("*.png"))


@pytest.fixture(scope="module")
def tiny_files(tiny_config, tmp_path_factory, tiny_dir) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    OmegaConf.save(tiny_config, folder / "tiny.yaml")
    (folder / "tiny.safetensors").symlink_to(tiny_dir / "model.safetensors")
    return folder


def tiny_files_args(folder: Path, ckpt: Path, tmp_path: Path) -> list[str]:
    return ["--config", str(folder / "tiny.yaml"), "--ckpt", str(ckpt), "--device", "cpu", "--ddim_steps", "2",
            "--n_samples", "1", "--n_iter", "1", "--H", "32", "--W", "32",
            "--outdir", str(tmp_path / "out")]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Hangs and memory


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.ckpt"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")


def test_a_tar_checkpoint_with_a_fifo_member_is_refused_without_blocking(tmp_path):
    refused(write_tar_with_fifo(tmp_path / "old.ckpt"), "pre-1.0 tar format")


def test_a_zip_bomb_is_refused_before_decompressing(tmp_path):
    refs, _ = float_state({"w": [0.0] * 4}, legacy=False, declared={"w": 64 << 20})
    path = tmp_path / "bomb.ckpt"
    write_zip_checkpoint(path, pickle_with_storages({"state_dict": refs}), {"0": bytes(64 << 20)}, compress=True)
    assert path.stat().st_size < 2 << 20
    refused(path, "compressed records")


def test_a_huge_safetensors_header_is_refused_before_parsing(tmp_path):
    path = write_safetensors_header(tmp_path / "big.safetensors", {}, claimed_length=67 << 20)
    refused(path, "safetensors header is 67 MiB")


def test_safetensors_tensors_outside_the_file_are_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}
    refused(write_safetensors_header(tmp_path / "short.safetensors", header, b"\0" * 16), "does not lie within")


def test_declared_storages_must_be_in_the_file_in_full(tmp_path):
    refs, records = float_state({"w": [1.0, 2.0]}, legacy=False, declared={"w": 1 << 40})
    path = write_zip_checkpoint(tmp_path / "big.ckpt", pickle_with_storages({"state_dict": refs}), records)
    refused(path, r"storage '0' is declared as 4398046511104 bytes but the file has a record of 8 bytes")


def test_legacy_files_load_and_never_return_uninitialised_memory(tmp_path):
    refs, records = float_state({"a": [1.0, 2.0, 3.0], "b": [4.0]}, legacy=True)
    good = tmp_path / "good.pth"
    good.write_bytes(legacy_stream(refs, records))
    state_dict, _ = read_checkpoint(good)
    assert state_dict["a"].tolist() == [1.0, 2.0, 3.0] and state_dict["b"].tolist() == [4.0]
    # A storage left out of the key list would stay torch.empty memory.
    omitted = tmp_path / "omitted.pth"
    omitted.write_bytes(legacy_stream(refs, records, keys=["0"]))
    refused(omitted, "list of storages does not match")
    refs, records = float_state({"a": [1.0]}, legacy=True, declared={"a": 1 << 40})
    huge = tmp_path / "huge.pth"
    huge.write_bytes(legacy_stream(refs, records))
    refused(huge, "not in the file in full")


@pytest.mark.parametrize("legacy", [False, True])
def test_every_dtype_and_shared_storage_round_trips(tmp_path, legacy):
    base = torch.arange(10.0)
    tensors = {"empty": torch.zeros(0), "bf16": torch.ones(3, dtype=torch.bfloat16), "bool": torch.tensor([True]),
               "i64": torch.arange(3), "complex": torch.ones(2, dtype=torch.complex64), "scalar": torch.tensor(3.0),
               "transposed": torch.ones(3, 4).t(), "base": base, "view": base[2:5]}  # fmt: skip
    if not legacy:  # storages of these dtypes are saved as bytes, which the legacy format cannot name
        tensors |= {"fp8": torch.ones(2, dtype=torch.float8_e4m3fn), "u16": torch.ones(2, dtype=torch.uint16)}
    path = tmp_path / "dtypes.ckpt"
    torch.save({"state_dict": tensors}, path, _use_new_zipfile_serialization=not legacy)
    state_dict, _ = read_checkpoint(path)
    for key, expected in tensors.items():
        assert state_dict[key].dtype == expected.dtype and state_dict[key].stride() == expected.stride(), key
        assert torch.equal(state_dict[key].reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), key
    assert state_dict["view"].untyped_storage().data_ptr() == state_dict["base"].untyped_storage().data_ptr()
    lazily = read_lazily(path)  # each tensor in memory of its own, with the same values and strides
    for key, expected in tensors.items():
        assert lazily[key].dtype == expected.dtype and lazily[key].stride() == expected.stride(), key
        assert torch.equal(lazily[key].reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), key


def test_torch_legacy_format_round_trips(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"x": torch.arange(6.0).reshape(2, 3)}, path, _use_new_zipfile_serialization=False)
    state_dict, _ = read_checkpoint(path)
    torch.testing.assert_close(state_dict["x"], torch.arange(6.0).reshape(2, 3))


# ---------------------------------------------------------------------------------------------------------------------
# Malformed pickles: one clear line each


class _Call:
    """Pickles as ``function(*args)``."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def _storage_with_type(storage_type):
    refs, records = float_state({"w": [1.0]}, legacy=False)
    refs["w"].storage.saved_id = ("storage", storage_type, "0", "cpu", 1)
    return refs, records


MALFORMED = {
    "not a pickle": (b"\x80\x02garbage", {}),
    "truncated": (pickle_with_storages({"state_dict": float_state({"w": [1.0]}, False)[0]})[:-7], {"0": b"\0" * 4}),
    "wrong arguments": (pickle_with_storages({"w": _Call(torch._utils._rebuild_tensor_v2, 1, 2)}), {}),
    "storage type without dtype": (pickle_with_storages(_storage_with_type(OrderedDict)[0]), {"0": b"\0" * 4}),
    "tensor larger than its storage": (pickle_with_storages(_Call(torch._utils._rebuild_tensor_v2,
        float_state({"w": [1.0]}, False)[0]["w"].storage, 0, (100,), (1,), False, OrderedDict())), {"0": b"\0" * 4}),
    "persistent id not a storage": (b"\x80\x02X\x03\x00\x00\x00abcQ.", {}),
    "missing record": (pickle_with_storages(float_state({"w": [1.0]}, False)[0]), {}),
    "protocol 4": (pickle.dumps({"w": OrderedDict()}, protocol=4), {}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_pickles_are_one_line_errors(tmp_path, name):
    data_pkl, records = MALFORMED[name]
    path = write_zip_checkpoint(tmp_path / "bad.ckpt", data_pkl, records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = refused(path, "")
    assert str(path) in message


def test_a_payload_naming_os_is_refused_as_malicious(tmp_path, tiny_files, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Call(os.system, "touch pwned")}, path)
    refused(path, r"refers to (os|posix)\.system.*probably malicious")
    code = cli.main("txt2img", tiny_files_args(tiny_files, path, tmp_path))
    assert code == 2 and capsys.readouterr().err.count("\n") == 1


def test_a_functools_partial_in_lightning_hparams_is_skipped(tmp_path):
    path = tmp_path / "hparams.ckpt"
    hparams = {"optimizer": functools.partial(torch.optim.Adam, lr=1e-4)}
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": hparams, "global_step": 5}, path)
    with pytest.warns(UserWarning, match=r"functools\.partial.*without running any code"):
        state_dict, info = read_checkpoint(path)
    assert state_dict["w"].tolist() == [1.0, 1.0] and info["global_step"] == 5


# ---------------------------------------------------------------------------------------------------------------------
# Formats by content, and damaged weights


@pytest.mark.parametrize("name", ["model.SAFETENSORS", "model.SafeTensors", "renamed.ckpt"])
def test_safetensors_are_recognised_by_content(tmp_path, name):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3.0)}, str(tmp_path / name))
    state_dict, _ = read_checkpoint(tmp_path / name)
    assert state_dict["w"].tolist() == [0.0, 1.0, 2.0]


def test_nan_and_inf_weights_are_reported_by_name(tiny_config, tiny_weights):
    damaged = dict(tiny_weights)
    for key, value in (
        ("model.diffusion_model.out.2.weight", float("inf")),
        ("first_stage_model.encoder.conv_in.bias", float("nan")),
    ):
        damaged[key] = torch.full_like(damaged[key], value)
    model = instantiate_from_config(tiny_config.model, path="model")
    with pytest.warns(UserWarning, match=r"2 tensor\(s\) of the checkpoint hold NaN or inf \(e\.g\. first_stage_model"):
        load_state_dict_into(model, damaged)


def test_no_code_path_uses_a_loader_that_can_run_code():
    """The one place that unpickles is ldm/serialization.py, through torch.load(weights_only=True)."""
    unsafe = re.compile(r"torch\.jit\.load|pickle\.loads?\(|Unpickler\(|weights_only\s*=\s*False|torch\.load\(")
    sources = [ROOT / "main.py", *(ROOT / "ldm").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
    offenders = []
    for source in sources:
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if unsafe.search(line) and source.name != "serialization.py":
                offenders.append(f"{source.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders
    loads = [line for line in (ROOT / "ldm" / "serialization.py").read_text().splitlines() if "torch.load(" in line]
    assert loads and all("weights_only=True" in line for line in loads)


def test_a_big_endian_legacy_file_is_refused(tmp_path):
    refs, records = float_state({"a": [1.0]}, legacy=True)
    path = tmp_path / "big-endian.pth"
    path.write_bytes(legacy_stream(refs, records, little_endian=False))
    refused(path, "big-endian")


def test_a_safety_checker_file_of_another_kind_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from ldm.postprocess import load_post_processing

    folder = tmp_path / "safety_checker"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a CompVis/stable-diffusion-safety-checker file: it lacks visual_"):
        load_post_processing(folder)


def test_a_checkpoint_replaced_while_it_is_read_lazily_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(2), "b": torch.ones(3)}, str(path))
    tensors, _ = open_checkpoint(path)
    assert tensors["a"].tolist() == [1.0, 1.0]
    save_file({"a": torch.zeros(2), "b": torch.zeros(1000)}, str(tmp_path / "other.safetensors"))
    os.replace(tmp_path / "other.safetensors", path)
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        tensors["b"]
