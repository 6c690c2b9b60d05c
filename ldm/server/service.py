"""The model a server serves, and what it does on the worker thread: load or switch checkpoints, generate, answer.

One :class:`Service` holds one loaded :class:`~ldm.inference.Pipeline` and the server's A1111 options. Only the
worker thread of :mod:`ldm.server.jobs` calls :meth:`Service.switch` and :meth:`Service.generate`; the handlers
read the rest.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.adapters.embeddings import Embedding, attach_embeddings, load_embeddings
from ldm.cli import SAFETY_DIR, choose_config, project_path
from ldm.devices import available_memory
from ldm.errors import UserError
from ldm.geometry import LatentGeometry
from ldm.inference import GenerationResult, Pipeline
from ldm.memory import Footprint, check_memory, estimate, min_chunks
from ldm.models.diffusion.samplers import StopSampling
from ldm.outputs import save_numbered
from ldm.postprocess import OutputStep
from ldm.request import RuntimeOptions
from ldm.server.batching import merge, split
from ldm.server.catalog import Catalog, Checkpoint
from ldm.server.errors import FieldError, JobCancelled
from ldm.server.images import encode_png
from ldm.server.jobs import Job
from ldm.server.preview import fit_preview
from ldm.server.translate import Work

# A1111's options this server has, with their defaults; POST /sdapi/v1/options sets them, override_settings per job.
DEFAULT_OPTIONS: dict[str, Any] = {
    "sd_model_checkpoint": None,
    "CLIP_stop_at_last_layers": 1,
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "live_previews_enable": True,
    "samples_format": "png",
    "sd_checkpoint_hash": None,
}
READ_ONLY = ("samples_format", "sd_checkpoint_hash")
# The command line's words in the shared memory advice, as the API's fields.
API_WORDS = {"--n_samples": "batch_size", "--H/--W": "width/height", "--n_iter": "n_iter"}


def check_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """FieldError for an unknown or read-only option or a value of the wrong kind; returns the values."""
    for name, value in values.items():
        if name not in DEFAULT_OPTIONS:
            known = ", ".join(n for n in DEFAULT_OPTIONS if n not in READ_ONLY)
            raise FieldError(name, f"unknown option {name!r}; this server's options: {known}.")
        if name in READ_ONLY:
            raise FieldError(name, f"option {name!r} is read-only here.")
        if name == "sd_model_checkpoint" and not isinstance(value, str):
            raise FieldError(name, f"{name} is a checkpoint title (see /sdapi/v1/sd-models), got {value!r}.")
        if name == "CLIP_stop_at_last_layers" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise FieldError(name, f"{name} is a whole number >= 1 (1 = the last layer), got {value!r}.")
        if name.startswith("eta_") and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise FieldError(name, f"{name} is a number >= 0, got {value!r}.")
        if name == "live_previews_enable" and not isinstance(value, bool):
            raise FieldError(name, f"{name} is true or false, got {value!r}.")
    return dict(values)


class Service:
    """A loaded checkpoint, the catalog it may switch to, and the server's options and output folder."""

    def __init__(
        self,
        catalog: Catalog,
        first: Checkpoint,
        runtime: RuntimeOptions,
        *,
        lora_dir: Path | None = None,
        embeddings_dir: Path | None = None,
        outdir: Path = Path("outputs/server"),
        max_images: int = 16,
    ) -> None:
        self.catalog, self.runtime = catalog, runtime
        self.lora_dir, self.embeddings_dir, self.outdir = lora_dir, embeddings_dir, Path(outdir)
        self.max_images = max_images
        self.options = dict(DEFAULT_OPTIONS)
        self.embeddings: list[Embedding] = []
        self.loaded: list[Embedding] = []
        self.pipe: Pipeline | None = None
        self.checkpoint: Checkpoint | None = None
        self.load(first)
        self.output, notices = OutputStep.load(self.outdir, runtime.device, safety_dir=project_path(SAFETY_DIR))
        for notice in notices:
            print(f"note: {notice}", file=sys.stderr)

    # -- loading ------------------------------------------------------------------------------------------------

    def load(self, checkpoint: Checkpoint) -> None:
        """Load ``checkpoint`` (config detected unless it names one), with the server's LoRA and embedding folders."""
        config = _config(checkpoint)
        pipe = Pipeline.from_config(config, checkpoint.path, self.runtime)
        pipe.loras.directory = self.lora_dir
        self.config, self.pipe, self.checkpoint = config, pipe, checkpoint
        self.refresh_embeddings()
        self.preview_map = fit_preview(pipe)
        self.catalog.hash(checkpoint)
        self.options.update(sd_model_checkpoint=self.catalog.title(checkpoint), sd_checkpoint_hash=pipe.model_hash)

    def refresh_embeddings(self) -> None:
        """(Re)read the embeddings folder and attach what fits the model (A1111's ``/refresh-embeddings``)."""
        self.embeddings = load_embeddings(self.embeddings_dir) if self.embeddings_dir is not None else []
        self.loaded = attach_embeddings(self.pipe.model, self.embeddings) if self.embeddings else []

    def switch(self, checkpoint: Checkpoint) -> None:
        """Serve ``checkpoint`` from now on. The old model is freed first, so two never share the device; if the new
        one fails to load, the old one is loaded again and the error raised."""
        if checkpoint == self.checkpoint:
            return
        previous = self.checkpoint
        self.pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self.load(checkpoint)
        except Exception:
            self.load(previous)
            raise

    def geometry(self, checkpoint: Checkpoint | None = None) -> LatentGeometry:
        """The image sizes and steps a checkpoint takes (the loaded one's without reading anything)."""
        if checkpoint is None or checkpoint == self.checkpoint:
            return self.pipe.geometry
        config = _config(checkpoint)
        return LatentGeometry.from_config(config)

    # -- checks before queueing ---------------------------------------------------------------------------------

    def check_size(self, work: Work) -> None:
        """FieldError when a job asks for more images than allowed, or more memory than the device has."""
        images = sum(r.batch for r in work.requests)
        if images > self.max_images:
            raise FieldError("n_iter", f"batch_size x n_iter is {images} images; this server makes at most "
                                       f"{self.max_images} per request (--max_images).")  # fmt: skip
        request, device = work.requests[0], self.runtime.device
        memory = estimate(
            Footprint.from_config(self.config), batch=request.batch, height=request.height, width=request.width,
            chunks=max(min_chunks(p) for p in [*request.prompts, *request.negative_prompts]),
            half=self.runtime.half, vae_tiling=self.runtime.vae_tiling, encode=work.mode == "img2img",
        )  # fmt: skip
        try:
            check_memory(memory, available_memory(device), device, self.runtime.vae_tiling)
        except UserError as err:
            message = str(err)
            for cli, api in API_WORDS.items():
                message = message.replace(cli, api)
            raise FieldError("batch_size", message) from None

    # -- generation (worker thread) -----------------------------------------------------------------------------

    def generate(self, work: Work, job: Job) -> list[GenerationResult]:
        """Run every iteration of ``work``, reporting to ``job``; an interrupt keeps what was made so far."""
        results = []
        for number, request in enumerate(work.requests):
            if job.interrupted.is_set():
                break
            job.begin_iteration(number)
            results.append(self.pipe.run(request, callback=job.on_step, progress=False))
        return results

    def run_batch(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Jobs of one :func:`~ldm.server.batching.batch_key` in one ``Pipeline.run``; each gets its response. The
        batch stops when all its clients are gone, or at an interrupt of any (it is one sampling run)."""
        requests = [job.work.requests[0] for job in jobs]

        def callback(i: int, denoised: torch.Tensor) -> None:
            for job in jobs:
                job.record(i, denoised)
            if all(job.cancelled.is_set() for job in jobs):
                raise JobCancelled
            if any(job.interrupted.is_set() or job.skipped.is_set() for job in jobs):
                raise StopSampling

        result = self.pipe.run(merge(requests), callback=callback, progress=False)
        parts = split(result, [request.batch for request in requests])
        return [job.finish([part]) for job, part in zip(jobs, parts, strict=True)]

    def respond(self, work: Work, results: list[GenerationResult], body: dict[str, Any]) -> dict[str, Any]:
        """A1111's response: ``images`` (base64 PNG with infotext), ``parameters`` (the request), ``info`` (JSON)."""
        images, infotexts = [], []
        for result in results:
            kept = self.output.process(result.images, result.seeds)
            for i, image in enumerate(kept):
                infotexts.append(result.parameters(i))
                if work.save_images:
                    save_numbered(image, self.outdir / f"{work.mode}-images", infotexts[-1])
                if work.send_images:
                    images.append(encode_png(image, infotexts[-1]))
        images += [encode_png(image) for image in work.init_images]
        return {"images": images, "parameters": body, "info": json.dumps(self.info(work, results, infotexts))}

    def info(self, work: Work, results: list[GenerationResult], infotexts: list[str]) -> dict[str, Any]:
        """A1111's ``info`` object of a job (the response carries it as a JSON string)."""
        request = work.requests[0]
        seeds = [s for r in results for s in r.seeds]
        subseeds = [s for r in work.requests[: len(results)] for s in (r.subseeds or r.seeds)]
        first = results[0] if results else None
        img2img = work.mode == "img2img"
        return {
            "prompt": request.prompts[0],
            "all_prompts": [p for r in results for p in r.prompts],
            "negative_prompt": request.negative_prompts[0],
            "all_negative_prompts": [p for r in results for p in r.negative_prompts],
            "seed": request.seeds[0],
            "all_seeds": seeds,
            "subseed": subseeds[0] if subseeds else -1,
            "all_subseeds": subseeds,
            "subseed_strength": request.subseed_strength,
            "width": request.width,
            "height": request.height,
            "sampler_name": first.sampler if first else request.sampler,
            "cfg_scale": request.scale,
            "steps": request.steps,
            "batch_size": request.n,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": first.model_name if first else None,
            "sd_model_hash": first.model_hash if first else None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": request.strength
            if img2img
            else (request.denoising_strength if request.enable_hr else None),  # fmt: skip
            "extra_generation_params": {k: v for k, v in (first.extra if first else {}).items() if v is not None},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": request.clip_skip,
            "is_using_inpainting_conditioning": img2img and self.pipe.model.inpaints_by_conditioning,
            "version": "ldm",
        }

    def with_options(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """The server's options with a request's ``override_settings`` (checked) on top."""
        return {**self.options, **check_options(overrides or {})}

    def embeddings_listing(self) -> dict[str, Any]:
        """A1111's ``/sdapi/v1/embeddings``: the loaded and the skipped embeddings."""

        def entry(embedding: Embedding) -> dict[str, Any]:
            return {
                "step": embedding.step,
                "sd_checkpoint": None,
                "sd_checkpoint_name": embedding.sd_checkpoint_name,
                "shape": next(iter(embedding.widths.values())),
                "vectors": embedding.num_vectors,
            }

        loaded = {e.name for e in self.loaded}
        return {
            "loaded": {e.name: entry(e) for e in self.loaded},
            "skipped": {e.name: entry(e) for e in self.embeddings if e.name not in loaded},
        }

    def override_checkpoint(self, overrides: Mapping[str, Any]) -> Checkpoint | None:
        """The checkpoint an ``override_settings`` names, when it is not the loaded one."""
        name = overrides.get("sd_model_checkpoint")
        if name is None:
            return None
        checkpoint = self.catalog.find(name, "override_settings")
        return None if checkpoint == self.checkpoint else checkpoint


def _config(checkpoint: Checkpoint) -> Any:
    """The checkpoint's config: the one it names, or the one detected from its file (announced in one line)."""
    named = str(checkpoint.config) if checkpoint.config else None
    return choose_config(named, checkpoint.path, list(checkpoint.overrides))


def without_images(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request echoed as A1111's ``parameters``: init images and mask left out, as A1111 does by default."""
    return {k: (None if k in ("init_images", "mask") else v) for k, v in body.items()}
