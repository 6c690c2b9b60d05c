"""``BaseModel``: what every MiDaS network shares, loading a MiDaS weights file."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ldm.util import ConfigError


class BaseModel(nn.Module):
    def load(self, path: str) -> None:
        """Load a MiDaS weights file (e.g. ``dpt_hybrid-midas-501f0c75.pt``: a bare state dict of this network's
        keys, or one under ``model`` beside an ``optimizer``) strictly, running nothing the file holds."""
        from ldm.serialization import read_file

        _, data = read_file(path)
        if isinstance(data, Mapping) and "optimizer" in data:
            data = data.get("model")
        if not isinstance(data, Mapping):
            raise ConfigError(f"MiDaS weights '{path}' hold no state dict (found {type(data).__name__}).")
        try:
            self.load_state_dict({k: v for k, v in data.items() if isinstance(v, torch.Tensor)})
        except RuntimeError as err:  # missing, unexpected or misshapen keys
            first = str(err).strip().splitlines()[0]
            raise ConfigError(f"MiDaS weights '{path}' do not fit {type(self).__name__} ({first}).") from None
