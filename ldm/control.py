"""ControlNets in a generation run: what the user asks for (:class:`ControlSpec`) and how a run applies it.

    from ldm.control import ControlSpec
    pipe.generate("a house", controls=[ControlSpec("control_v11p_sd15_canny.pth", "photo.png", preprocessor="canny")])

Each ControlNet sees the noisy latent, the timestep, the text context (and SDXL's ADM vector) and its control image,
resized to 8x the latent (the output size, for SD's 8x VAE), and gives residuals that the UNet adds to its skip
connections and middle block (see :mod:`ldm.modules.diffusionmodules.controlnet`); several ControlNets add theirs
up. As A1111's default ("Balanced"), the residuals go to the conditional and the unconditional branch alike: the
control images ride in the conditioning as ``c_control`` (so the two branches stay one batch), and the ControlNets
wait on the UNet's wrapper (``DiffusionWrapper.control``) for the run. With the pipeline's ``idle_device`` they are
kept there between runs and come to the device only for a run, as the refiner's UNet does.

``strength`` scales a ControlNet's residuals (A1111's "Weight"; 0 leaves the image exactly as without it).
``start`` / ``end`` are A1111's "Guidance Start / End": the ControlNet acts at step ``i`` of the ``N`` steps the run
takes (img2img: its share of them) when ``start <= i / N <= end``. The steps are counted by the sampler's callback,
which comes after a step's first evaluation: a second-order correction (Heun's), made at the next step's sigma, counts
as the next step, as a refiner hand-off (:mod:`ldm.models.diffusion.handoff`) counts it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.control_files import load_controlnet
from ldm.control_preprocess import CANNY_THRESHOLDS, check_preprocessor, preprocess
from ldm.errors import UserError
from ldm.models.diffusion.guidance import StepConditioning
from ldm.models.diffusion.samplers import img2img_start, resolve_sampler
from ldm.models.diffusion.schedules import COMPVIS_GRIDS
from ldm.modules.diffusionmodules.controlnet import HINT_FACTOR, ControlNet
from ldm.outputs import load_image, model_hash


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet of a request.

    Attributes:
        model: a ControlNet file (cldm or diffusers layout, see :mod:`ldm.control_files`) or a loaded ControlNet.
        image: the control image (PIL image or path), before the preprocessor.
        strength: scale of the residuals, >= 0 (A1111's "Weight").
        start, end: the share of the steps in which it acts, 0 <= start <= end <= 1 (A1111's "Guidance Start/End").
        preprocessor: one of :data:`ldm.control_preprocess.PREPROCESSORS`; ``canny_thresholds`` for ``canny``.
        name: the model name written in the infotext; by default the file's stem.
    """

    model: str | os.PathLike | ControlNet
    image: Image.Image | str | os.PathLike
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    canny_thresholds: tuple[int, int] = CANNY_THRESHOLDS
    name: str | None = None

    def __post_init__(self) -> None:
        for what in ("strength", "start", "end"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UserError(f"the ControlNet {what} must be a number, got {value!r}.")
        if self.strength < 0:
            raise UserError(f"the ControlNet strength must be at least 0 (1 = as trained), got {self.strength}.")
        if not 0 <= self.start <= self.end <= 1:
            raise UserError(
                f"the ControlNet's guidance range must satisfy 0 <= start <= end <= 1, got {self.start}..{self.end}."
            )
        check_preprocessor(self.preprocessor)
        if self.name is None:
            name = type(self.model).__name__ if isinstance(self.model, torch.nn.Module) else Path(self.model).stem
            object.__setattr__(self, "name", name)

    def active(self, step: int, steps: int) -> bool:
        """Whether it acts at step ``step`` (0-based) of ``steps``."""
        return self.strength != 0 and self.start <= step / steps <= self.end

    def infotext(self) -> str:
        """A1111's (sd-webui-controlnet's) entry: ``Module: canny, Model: name [hash], Weight: 1.0, ...``."""
        digest = "" if isinstance(self.model, torch.nn.Module) else f" [{model_hash(self.model)[:8]}]"
        return (
            f"Module: {self.preprocessor}, Model: {self.name}{digest}, Weight: {float(self.strength)}, "
            f"Guidance Start: {float(self.start)}, Guidance End: {float(self.end)}"
        )


def check_controls(controls: Sequence[ControlSpec | Mapping[str, Any]] | None) -> tuple[ControlSpec, ...]:
    """The controls of a request as ControlSpecs; a dict gives a ControlSpec's fields."""
    if controls is None:
        return ()
    if isinstance(controls, ControlSpec | Mapping):
        controls = [controls]
    specs = []
    for control in controls:
        if isinstance(control, Mapping):
            unknown = set(control) - {f.name for f in dataclasses.fields(ControlSpec)}
            if unknown:
                raise UserError(f"unknown ControlNet setting(s) {', '.join(sorted(unknown))}.")
            control = ControlSpec(**control)
        if not isinstance(control, ControlSpec):
            raise UserError(f"controls must be ControlSpecs or dicts of their fields, got {type(control).__name__}.")
        specs.append(control)
    return tuple(specs)


def control_image(spec: ControlSpec, width: int, height: int) -> torch.Tensor:
    """The control image of ``spec`` at the output size: (1, 3, height, width) float32 in [0, 1]."""
    image = spec.image if isinstance(spec.image, Image.Image) else load_image(spec.image, "control image")
    image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    image = preprocess(image, spec.preprocessor, spec.canny_thresholds)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def run_steps(request: Any) -> int:
    """The number of steps a request's run takes: all of them for txt2img, img2img's share of them otherwise."""
    if request.init_image is None or request.strength is None:
        return request.steps
    _, schedule = resolve_sampler(request.sampler, request.schedule)
    tail, _ = img2img_start(torch.zeros(request.steps + 1), request.strength, schedule in COMPVIS_GRIDS, 0.0)
    return max(len(tail) - 1, 1)


class ControlNetCache:
    """The ControlNets a pipeline has loaded, by file (path, size, mtime), so a second run reads none again."""

    def __init__(self) -> None:
        self._nets: dict[tuple[str, int, int], ControlNet] = {}
        self.prepare: Callable[[ControlNet], None] | None = None  # called on each net before use (an engine's)

    def get(self, model: str | os.PathLike | ControlNet, unet: torch.nn.Module, device: torch.device) -> ControlNet:
        """The ControlNet ``model`` names, on ``device`` in the UNet's dtype; a file is checked against ``unet``."""
        dtype = next(unet.parameters()).dtype
        if isinstance(model, torch.nn.Module):
            net = model.to(device, dtype)
        else:
            path = Path(model).resolve()
            if not path.is_file():
                raise UserError(f"ControlNet file '{model}' does not exist.")
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key not in self._nets:
                self._nets[key] = load_controlnet(path, base_unet=unet)
            net = self._nets[key].to(device, dtype)
        if self.prepare is not None:
            self.prepare(net)
        return net


class ControlStack:
    """The ControlNets of one run, called by ``DiffusionWrapper`` with the control images of ``c_control``."""

    def __init__(self, specs: Sequence[ControlSpec], nets: Sequence[ControlNet], steps: int) -> None:
        self.specs, self.nets, self.steps = tuple(specs), tuple(nets), steps
        self.step = 0

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None,
        y: torch.Tensor | None,
        hints: Sequence[torch.Tensor],
    ) -> list[torch.Tensor] | None:
        """The summed, scaled residuals of the ControlNets acting now; None when none is.

        x: (B, C, h, w) latents (before an inpainting model's concatenated channels), t: (B,), context: (B, M, D),
        y: (B, D_adm) or None; hints: one (B, 3, 8h, 8w) per ControlNet."""
        if len(hints) != len(self.nets):
            raise ValueError(f"{len(hints)} control images for {len(self.nets)} ControlNets")
        total = None
        for spec, net, hint in zip(self.specs, self.nets, hints, strict=True):
            if not spec.active(self.step, self.steps):
                continue
            residuals = [r * spec.strength for r in net(x, hint, t, context, y)]
            total = residuals if total is None else [a + b for a, b in zip(total, residuals, strict=True)]
        return total

    def counting(self, callback: Callable[[int, torch.Tensor], None] | None) -> Callable[[int, torch.Tensor], None]:
        """A sampler callback that counts the steps for the guidance range, then calls ``callback``."""

        def step_done(i: int, denoised: torch.Tensor) -> None:
            self.step = i + 1
            if callback is not None:
                callback(i, denoised)

        return step_done


def with_control(cond: Any, hints: Sequence[torch.Tensor], conditioning_key: str | None) -> Any:
    """``cond`` (a tensor, list or ``apply_model`` dict) as a dict with the control images added as ``c_control``."""
    if not isinstance(cond, Mapping):
        key = "c_concat" if conditioning_key == "concat" else "c_crossattn"
        cond = {key: cond if isinstance(cond, list) else [cond]}
    return {**cond, "c_control": list(hints)}


class ControlRun:
    """The ControlNets of one request on a pipeline; does nothing for a request without controls.

    control = ControlRun(pipe, request)
    cond, uncond = control.conditioning(cond, uncond)
    with control.attached():
        sample(..., callback=control.callback(callback))
    """

    def __init__(self, pipe: Any, request: Any) -> None:
        self.specs: tuple[ControlSpec, ...] = request.controls
        self.wrapper = pipe.model.model
        self.stack: ControlStack | None = None
        if not self.specs:
            return
        if not hasattr(self.wrapper, "control"):
            raise UserError(f"ControlNets need a UNet model; this is a {type(pipe.model).__name__}.")
        unet = self.wrapper.diffusion_model
        # With an idle device the ControlNets wait there, and come to the device while attached.
        self.device, self.idle_device = pipe.device, pipe.idle_device
        home = pipe.device if pipe.idle_device is None else pipe.idle_device
        nets = [pipe.controlnets.get(spec.model, unet, home) for spec in self.specs]
        # The hint block takes the image down 8x, to the latent: the output size for SD's VAE (which also is 8x).
        width, height = (side // pipe.geometry.factor * HINT_FACTOR for side in (request.width, request.height))
        self.hints = [control_image(spec, width, height).to(pipe.device) for spec in self.specs]
        self.batch = request.batch
        self.stack = ControlStack(self.specs, nets, run_steps(request))

    def conditioning(self, cond: Any, uncond: Any) -> tuple[Any, Any]:
        """cond / uncond with the control images (expanded to the batch) as ``c_control``."""
        if self.stack is None:
            return cond, uncond
        hints = [hint.expand(self.batch, -1, -1, -1) for hint in self.hints]
        key = self.wrapper.conditioning_key

        def add(c: Any) -> Any:
            if isinstance(c, StepConditioning):  # prompt editing / AND: each row gets the images of its image
                owners = torch.tensor(c.owners, dtype=torch.long)
                rows = [hint.index_select(0, owners.to(hint.device)) for hint in hints]
                return dataclasses.replace(c, extend=lambda selected: with_control(selected, rows, key), _cache={})
            return with_control(c, hints, key)

        return add(cond), None if uncond is None else add(uncond)

    @contextmanager
    def attached(self) -> Iterator[None]:
        """The ControlNets on the UNet's wrapper (and on the device) for the block, and off it (back on the idle
        device) after, however it ends."""
        if self.stack is None:
            yield
            return
        nets = dict.fromkeys(self.stack.nets) if self.idle_device is not None else {}  # a file given twice moves once
        for net in nets:
            net.to(self.device)
        self.wrapper.control = self.stack
        try:
            yield
        finally:
            self.wrapper.control = None
            for net in nets:
                net.to(self.idle_device)

    def callback(self, callback: Callable[[int, torch.Tensor], None] | None) -> Any:
        return callback if self.stack is None else self.stack.counting(callback)

    def fields(self) -> dict[str, str]:
        """The infotext entries, ``ControlNet 0: "Module: ..., Model: ..."`` per ControlNet."""
        return {f"ControlNet {i}": spec.infotext() for i, spec in enumerate(self.specs)}
