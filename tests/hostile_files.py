"""Hostile and malformed checkpoint files in the published formats, written byte by byte for the security tests."""

import io
import json
import pickle
import struct
import tarfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class MarkerWriter(torch.nn.Module):
    """A TorchScript module whose ``__setstate__``, run by ``torch.jit.load``, creates the file ``target``."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.weight = torch.zeros(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.target, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.training = state[2]
        # from_file with shared=True creates the file: any path the user can write.
        self.weight = torch.from_file(state[0], True, 2)


def write_torchscript(path: Path, marker: Path) -> Path:
    """A TorchScript archive that creates ``marker`` when torch.jit.load (or torch.load, which hands it on) reads it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(MarkerWriter(str(marker))), str(path))
    return path


def write_zip_checkpoint(
    path: Path, data_pkl: bytes, records: dict[str, bytes], compress: bool = False, prefix: str = "archive"
) -> Path:
    """A torch.save-style zip archive from its parts: ``data.pkl`` and ``data/<key>`` records."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        archive.writestr(f"{prefix}/data.pkl", data_pkl)
        archive.writestr(f"{prefix}/byteorder", "little")
        for key, data in records.items():
            archive.writestr(f"{prefix}/data/{key}", data)
        archive.writestr(f"{prefix}/version", "3\n")
    return path


class _StorageRef:
    """Pickled as the persistent id of a storage: ``('storage', torch.FloatStorage, key, 'cpu', numel[, view])``."""

    def __init__(self, key: str, numel: int, legacy: bool) -> None:
        self.saved_id = ("storage", torch.FloatStorage, key, "cpu", numel) + ((None,) if legacy else ())


class _TensorRef:
    """Pickled as ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``."""

    def __init__(self, storage: _StorageRef, size: tuple[int, ...]) -> None:
        self.storage, self.size = storage, size

    def __reduce__(self):
        stride = tuple(int(torch.tensor(self.size[i + 1 :]).prod()) for i in range(len(self.size)))
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, stride, False, OrderedDict()))


def pickle_with_storages(obj: object) -> bytes:
    """Pickle ``obj`` (protocol 2, as torch.save) with every ``_StorageRef`` written as a persistent id."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, value: object):
            return value.saved_id if isinstance(value, _StorageRef) else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def float_state(values: dict[str, list[float]], legacy: bool, declared: dict[str, int] | None = None):
    """``({name: _TensorRef}, {key: bytes})`` for float32 tensors; ``declared`` overrides a storage's element count."""
    refs, records = {}, {}
    for i, (name, data) in enumerate(values.items()):
        key = str(i)
        storage = _StorageRef(key, (declared or {}).get(name, len(data)), legacy)
        refs[name] = _TensorRef(storage, (len(data),))
        records[key] = struct.pack(f"<{len(data)}f", *data)
    return refs, records


def legacy_stream(
    obj: object, records: dict[str, bytes], keys: list[str] | None = None, little_endian: bool = True
) -> bytes:
    """The legacy torch.save stream: magic, protocol, system info, ``obj``, the key list, then each storage."""
    keys = list(records) if keys is None else keys
    system = {"protocol_version": 1001, "little_endian": little_endian, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(LEGACY_MAGIC, 2), pickle.dumps(1001, 2), pickle.dumps(system, 2)]
    parts += [pickle_with_storages(obj), pickle.dumps(keys, 2)]
    for key in keys:
        parts += [struct.pack("<q", len(records[key]) // 4), records[key]]
    return b"".join(parts)


def write_tar_with_fifo(path: Path) -> Path:
    """A pre-1.0 tar checkpoint whose ``storages`` member is a FIFO (extracting and reading it blocks forever)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("sys_info", "pickle", "tensors"):
            data = pickle.dumps({}, 2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        fifo = tarfile.TarInfo("storages")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    return path


def write_safetensors_header(path: Path, header: dict, data: bytes = b"", claimed_length: int | None = None) -> Path:
    """A safetensors file with this JSON header; ``claimed_length`` writes another length and pads the file sparsely."""
    encoded = json.dumps(header).encode()
    length = len(encoded) if claimed_length is None else claimed_length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length) + encoded + data)
        if claimed_length is not None:
            f.truncate(8 + claimed_length + len(data))
    return path
