"""The OpenVINO engine: the model's own networks (UNet, VAE encoder and decoder, text encoders, ControlNets),
converted by OpenVINO's converter and run by its CPU plugin, whose kernels (Winograd convolutions, fused attention,
bf16 on AVX-512) are faster on x86 CPUs than PyTorch's.

    pipe = Pipeline.from_config(config, ckpt, device="cpu", precision="bf16", engine="openvino")

Only module forwards go through the engine: :func:`attach_openvino` replaces each network's ``forward`` by an
:class:`EngineForward`, so samplers, guidance, prompts, LoRA merging and outputs stay this project's code. Each
distinct call (the input shapes and dtypes, and the values of non-tensor arguments) gets its own static-shape model,
converted once and kept in the disk cache (:mod:`ldm.openvino_cache`) under the weights' digest, the architecture
and the inputs. A call falls back to the torch forward where a compiled graph would be wrong: with gradients on
(training), in training mode, or with forward hooks on the network (textual-inversion vectors go in through one).
When the weights change in place (a LoRA merged for a run), the compiled models are dropped and found again under
the new digest. The compiled model holds its own copy of the weights, so the torch weights move to a file-backed
mapping and the converted file's pages are handed back (:mod:`ldm.resident_pages`): the weights stay resident once.
A compiled model also keeps its intermediate tensors between calls (SD 1.5's VAE decoder at 512x512: 376 MB), so
each network belongs to a stage (text encoder, denoiser, VAE encoder or decoder) and when a run moves on to another
stage, the buffers of the one that ended are handed back; at the end of a run the pipeline hands back the last.

Inference precision: ``full`` is float32; ``bf16`` computes in bfloat16 (the weights are bf16, as in the torch
engine). Outputs are float32.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import sys
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ldm.errors import UserError
from ldm.openvino_cache import cache_root, cached_model_path, entry_key
from ldm.resident_pages import dropping_file_pages, in_mapping, movable, move_to_file, page_out

ENGINES = ("torch", "openvino")
INSTALL = "pip install -r requirements-openvino.txt"
INFERENCE_PRECISION = {"full": "f32", "autocast": "f32", "bf16": "bf16"}
FORMAT = 1  # bumped when what an entry holds changes
# Compiled models kept per network: each holds its own copy of the weights, so a run that changes size (the hires
# fix's second pass, a benchmark's sizes) must not pile them up; the disk cache brings a dropped one back quickly.
KEPT_SHAPES = 2
TEXT_ENCODER, DENOISER = "text encoder", "denoiser"  # stages (OpenVINOEngine.attach) of several networks


def add_engine_argument(parser: argparse.ArgumentParser) -> None:
    """``--engine torch|openvino``, the same in every script."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="torch",
        help=f"what runs the networks: torch, or openvino (x86 CPUs, faster there; {INSTALL})",
    )


def import_openvino() -> Any:
    """The openvino module; UserError naming the install command where it is missing."""
    try:
        import openvino
    except ImportError:
        raise UserError(f"--engine openvino needs OpenVINO, which is not installed: {INSTALL}") from None
    return openvino


def check_engine(engine: str, device: torch.device, precision: str, compile: bool) -> None:
    """UserError unless ``engine`` can run with these options (called once, by ``RuntimeOptions``)."""
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got '{engine}'.")
    if engine == "torch":
        return
    if device.type != "cpu":
        raise UserError(f"--engine openvino runs on the CPU: give --device cpu, or use --engine torch on {device}.")
    if precision not in INFERENCE_PRECISION:
        raise UserError(f"--engine openvino computes in full (fp32) or bf16 precision, not {precision}.")
    if compile:
        raise UserError("--compile is torch's compiler; the openvino engine compiles the networks itself: drop one.")
    import_openvino()


class OpenVINOEngine:
    """OpenVINO's CPU plugin with one inference precision, and where converted models are cached."""

    def __init__(self, precision: str, cache: Path | None = None) -> None:
        self.ov = import_openvino()
        self.forwards: weakref.WeakSet[EngineForward] = weakref.WeakSet()  # a ControlNet the cache drops goes
        self.stage: str | None = None  # the stage whose networks ran last, and may hold buffers
        self.core = self.ov.Core()
        self.precision = precision
        self.config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        self.cache = cache if cache is not None else cache_root()

    def attach(self, module: nn.Module, name: str, stage: str | None = None) -> None:
        """Run ``module``'s forward through this engine from now on (once: a second call changes nothing).
        ``stage``: the networks that run together, in turn (the UNet and its ControlNets), and keep their buffers
        while they do; by default the network alone."""
        if not isinstance(module.__dict__.get("forward"), EngineForward):
            module.forward = EngineForward(module, name, stage or name, self)
            self.forwards.add(module.forward)

    def enter(self, stage: str) -> None:
        """A network of ``stage`` is about to run: the stages never overlap, so the one before it (if another)
        hands its buffers back."""
        if stage != self.stage:
            self.release_memory()
            self.stage = stage

    def release_memory(self) -> None:
        """Hand back the intermediate buffers of the stage that ran last; its next call allocates them again."""
        for forward in self.forwards:
            if forward.stage == self.stage:
                forward.release_memory()
        self.stage = None


def networks(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """The (name, stage, module) triples of a latent diffusion model that the engine runs: the UNet, the VAE's
    encoder and decoder, and the text encoders (the CLIP text model; OpenCLIP's residual blocks, which its embedder
    calls one by one). Other conditioning models (BERT, class embedders) and small glue layers stay in torch."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

    yield "UNet", DENOISER, model.model.diffusion_model
    first_stage = model.first_stage_model
    for part in ("encoder", "decoder"):
        if isinstance(getattr(first_stage, part, None), nn.Module):
            yield f"VAE {part}", f"VAE {part}", getattr(first_stage, part)
    cond_stage = model.cond_stage_model
    for path, module in cond_stage.named_modules() if isinstance(cond_stage, nn.Module) else ():
        where = f" ({path})" if path else ""
        if isinstance(module, FrozenCLIPEmbedder):
            yield f"CLIP text encoder{where}", TEXT_ENCODER, module.transformer
        elif isinstance(module, FrozenOpenCLIPEmbedder):
            for i, block in enumerate(module.model.transformer.resblocks):
                yield f"OpenCLIP text block {i}{where}", TEXT_ENCODER, block


def attach_openvino(model: nn.Module, precision: str) -> OpenVINOEngine:
    """Route the forwards of ``model``'s networks (:func:`networks`) through a new engine, which is returned."""
    engine = OpenVINOEngine(precision)
    for name, stage, module in networks(model):
        engine.attach(module, name, stage)
    return engine


def _hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _weights_token(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Changes when a weight is replaced or modified in place (every in-place op bumps a tensor's ``_version``)."""
    return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of ``module``'s state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"")
    return digest.hexdigest()


def architecture_digest(module: nn.Module) -> str:
    """SHA-256 of the module tree (layers and sizes) and of the source files of every class in it, so that a change
    to the code that the graph was traced from never reuses the old graph."""
    digest = hashlib.sha256(repr(module).encode())
    sources = sorted({inspect.getsourcefile(type(m)) or "" for m in module.modules()})
    for source in sources:
        if source:
            digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def _describe(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        dtype = torch.float32 if leaf.is_floating_point() else leaf.dtype  # floats go in as float32
        return ["tensor", list(leaf.shape), str(dtype)]
    return ["value", repr(leaf)]


def _flatten_output(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A JSON description of a forward's output, its tensors appended to ``tensors`` in order."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {"tensor": len(tensors) - 1}
    if value is None:
        return {"none": True}
    if isinstance(value, Mapping):  # transformers' ModelOutput is one
        items = {k: _flatten_output(v, tensors) for k, v in value.items()}
        return {"class": f"{type(value).__module__}:{type(value).__qualname__}", "items": items}
    if isinstance(value, list | tuple):
        return {"sequence": type(value).__name__, "items": [_flatten_output(v, tensors) for v in value]}
    raise TypeError(f"the engine cannot return a {type(value).__name__} from a network's forward")


def _rebuild_output(description: Any, tensors: Sequence[torch.Tensor]) -> Any:
    if "tensor" in description:
        return tensors[description["tensor"]]
    if "none" in description:
        return None
    if "class" in description:
        module, qualname = description["class"].split(":")
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**{k: _rebuild_output(v, tensors) for k, v in description["items"].items()})
    items = [_rebuild_output(v, tensors) for v in description["items"]]
    return items if description["sequence"] == "list" else tuple(items)


class _FlatForward(nn.Module):
    """The traceable form of one call: tensors in, a tuple of float32 (or integer) tensors out.

    Float inputs arrive as float32 and are cast to the weights' dtype here, as the torch engine runs the network."""

    def __init__(self, module: nn.Module, forward: Any, spec: Any, leaves: list[Any]) -> None:
        super().__init__()
        self.module = module  # a submodule, so that its weights become the graph's constants
        self.call, self.spec, self.leaves = forward, spec, leaves
        self.slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.dtype = next(module.parameters()).dtype
        self.structure: Any = None

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = list(self.leaves)
        for slot, tensor in zip(self.slots, tensors, strict=True):
            leaves[slot] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        args, kwargs = tree_unflatten(leaves, self.spec)
        flat: list[torch.Tensor] = []
        self.structure = _flatten_output(self.call(*args, **kwargs), flat)
        return tuple(t.float() if t.is_floating_point() else t for t in flat)


class EngineForward:
    """Stands in for a network's ``forward``: each distinct call runs a compiled OpenVINO model of that call."""

    def __init__(self, module: nn.Module, name: str, stage: str, engine: OpenVINOEngine) -> None:
        self.torch_forward = module.forward
        self.module, self.name, self.stage, self.engine = module, name, stage, engine
        self.compiled: OrderedDict[str, _CompiledCall] = OrderedDict()
        self.weights: tuple[tuple[int, int], ...] | None = None
        self.digest: str | None = None
        self.mapping: torch.UntypedStorage | None = None  # where move_to_file put the torch weights
        # Now rather than at the first compile: a network that never runs (the VAE encoder in txt2img) then never
        # holds resident memory, and the others hold none while they wait for their turn.
        self._release_torch_weights()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() or self.module.training or _hooked(self.module):
            return self.torch_forward(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        token = _weights_token(self.module)
        if token != self.weights:
            self.compiled.clear()
            self.weights, self.digest = token, None
        signature = repr((str(spec), [_describe(leaf) for leaf in leaves]))
        call = self.compiled.get(signature)
        if call is None:
            while len(self.compiled) >= KEPT_SHAPES:
                self.compiled.popitem(last=False)
            call = self.compiled[signature] = self._compile(spec, leaves, tensors)
        self.compiled.move_to_end(signature)
        self.engine.enter(self.stage)
        return call(tensors)

    def release_memory(self) -> None:
        for call in self.compiled.values():
            call.compiled.release_memory()

    def _compile(self, spec: Any, leaves: list[Any], tensors: list[torch.Tensor]) -> _CompiledCall:
        ov = self.engine.ov
        if self.digest is None:
            self.digest = weights_digest(self.module)
        parts = {
            "network": self.name,
            "class": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
            "architecture": architecture_digest(self.module),
            "weights": self.digest,
            "call": [str(spec), [_describe(leaf) for leaf in leaves]],
            "openvino": ov.__version__,
            "torch": torch.__version__,
            "format": FORMAT,
        }
        shapes = ", ".join("x".join(map(str, t.shape)) for t in tensors)
        flat = _FlatForward(self.module, self.torch_forward, spec, leaves)

        def convert(xml: Path) -> dict[str, Any]:
            from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

            print(f"openvino: converting the {self.name} for inputs {shapes} (once: cached in {self.engine.cache})",
                  file=sys.stderr, flush=True)  # fmt: skip
            start = time.perf_counter()
            examples = tuple(t.detach().float() if t.is_floating_point() else t.detach() for t in tensors)
            # The tracer warns that shapes become constants (the point of a per-shape model) and that it is deprecated
            # (OpenVINO's converter calls it).
            # Traced outside autocast: _FlatForward runs the network in its weights' dtype, as the graph should.
            with torch.no_grad(), torch.autocast("cpu", enabled=False), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)
                # torch's trace check traces once more and runs both graphs to compare them: over half of the
                # conversion (SD 1.5 at 256x256: UNet 37 s -> 17 s, VAE decoder 29 s -> 9 s). These networks have no
                # data-dependent control flow, and the converted outputs are tested against torch's
                # (tests/test_openvino_engine.py).
                traced = TorchScriptPythonDecoder(flat, example_input=examples, trace_kwargs={"check_trace": False})
                model = ov.convert_model(traced, example_input=examples, input=[tuple(t.shape) for t in examples])
            ov.save_model(model, str(xml), compress_to_fp16=False)
            print(f"openvino: converted the {self.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            return {"outputs": flat.structure}

        xml, made = cached_model_path(self.engine.cache, entry_key(parts), parts, convert, self.name)
        self._release_torch_weights()
        with dropping_file_pages(xml.with_suffix(".bin")):
            compiled = self.engine.core.compile_model(str(xml), "CPU", self.engine.config)
        return _CompiledCall(compiled, made["outputs"])

    def _release_torch_weights(self) -> None:
        """Keep the torch weights, which the compiled model has copied, out of resident memory
        (:mod:`ldm.resident_pages`): moved to a file-backed mapping the first time, their read pages handed back
        after each conversion (tracing reads them all)."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        if self.mapping is not None and all(in_mapping(t, self.mapping) for t in tensors if movable(t, self.mapping)):
            page_out(self.mapping)
            return
        # First time, or tensors replaced since (a dtype change, weights assigned): one new mapping for them all.
        self.mapping = move_to_file(tensors, self.engine.cache, previous=self.mapping)
        self.weights = _weights_token(self.module)  # the same weights in new places


class _CompiledCall:
    """One compiled model and how to rebuild the forward's output from its output tensors."""

    def __init__(self, compiled: Any, structure: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.outputs = len(compiled.outputs)
        self.structure = structure

    def __call__(self, tensors: Sequence[torch.Tensor]) -> Any:
        inputs = [(t.detach().float() if t.is_floating_point() else t.detach()).contiguous().numpy() for t in tensors]
        self.request.infer(inputs)
        outputs = [torch.from_numpy(self.request.get_output_tensor(i).data.copy()) for i in range(self.outputs)]
        return _rebuild_output(self.structure, outputs)
