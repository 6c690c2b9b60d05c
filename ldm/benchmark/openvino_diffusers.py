"""The peer the OpenVINO engine is measured against: OpenVINO running diffusers' own networks directly, as FastSD
CPU and optimum-intel do. diffusers' ``StableDiffusionPipeline`` (:class:`DiffusersEngine`) keeps its scheduler and
loop; its UNet, VAE decoder and text encoder are each converted by ``openvino.convert_model`` straight from diffusers'
module (float32 weights, the inference precision set on the CPU plugin, as optimum-intel exports them) and compiled
once per input shape. Conversion happens on a shape's first call, which the benchmark's warm-up makes."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ldm.benchmark.comparison import DiffusersEngine
from ldm.benchmark.settings import Settings
from ldm.openvino_engine import INFERENCE_PRECISION, import_openvino


class DirectOpenVINO:
    """Stands in for one diffusers module's ``forward``: ``flat(module, *args)`` names the tensors converted, and
    ``wrap(outputs)`` gives diffusers what the module would return."""

    def __init__(
        self, module: torch.nn.Module, precision: str, flat: Callable, wrap: Callable, **constants: Any
    ) -> None:
        self.ov = import_openvino()
        self.core = self.ov.Core()
        self.module, self.flat, self.wrap, self.constants = module, flat, wrap, constants
        self.config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        self.requests: dict[tuple, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = self.flat(*args, **kwargs)
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if key not in self.requests:
            self.requests.clear()  # one shape at a time: each compiled model holds a copy of the weights
            self.requests[key] = self._compile(tensors)
        request = self.requests[key]
        request.infer([t.detach().float().numpy() if t.is_floating_point() else t.numpy() for t in tensors])
        return self.wrap([torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(self.outputs)])

    def _compile(self, tensors: list[torch.Tensor]) -> Any:
        forward, module, constants = type(self.module).forward, self.module, self.constants

        class Traced(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, *inputs: torch.Tensor) -> Any:
                return forward(self.inner, *inputs, **constants)

        examples = tuple(t.float() if t.is_floating_point() else t for t in tensors)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = self.ov.convert_model(Traced(), example_input=examples, input=[tuple(t.shape) for t in examples])
        compiled = self.core.compile_model(model, "CPU", self.config)
        self.outputs = len(compiled.outputs)
        return compiled.create_infer_request()


def _unet_inputs(sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **_: Any) -> list:
    timestep = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0]).to(torch.long)
    return [sample, timestep, encoder_hidden_states]


def _text_inputs(input_ids: torch.Tensor, **_: Any) -> list:
    return [input_ids]


class OpenVINODiffusersEngine(DiffusersEngine):
    """diffusers' pipeline with its UNet, VAE decoder and text encoder run by OpenVINO (see the module docstring)."""

    def __init__(self, config: DictConfig, weights: Path, settings: Settings) -> None:
        super().__init__(config, weights, Settings(**{**settings.__dict__, "dtype": "fp32"}))
        self.settings = settings
        precision = "bf16" if settings.dtype == "bf16" else "full"
        pipe = self.pipe
        pipe.unet.forward = DirectOpenVINO(pipe.unet, precision, _unet_inputs, lambda out: (out[0],), return_dict=False)
        pipe.vae.decoder.forward = DirectOpenVINO(pipe.vae.decoder, precision, lambda z: [z], lambda out: out[0])
        pipe.text_encoder.forward = DirectOpenVINO(
            pipe.text_encoder, precision, _text_inputs,
            lambda out: BaseModelOutputWithPooling(last_hidden_state=out[0], pooler_output=out[1]), return_dict=False,
        )  # fmt: skip

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.pipe.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
