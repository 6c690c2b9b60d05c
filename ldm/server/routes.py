"""A1111's ``/sdapi/v1`` endpoints, with its paths, field names and response shapes, plus ``/ldm/v1/model``.

Generation and anything that changes the model (switching checkpoints, re-reading embeddings) goes through the job
queue, in order; the rest answers at once. A generation's request is translated and checked before it is queued,
so bad input costs no queue slot and never reaches the worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from safetensors import SafetensorError, safe_open
from starlette.responses import JSONResponse

from ldm.adapters.lora_prompts import SUFFIXES as LORA_SUFFIXES
from ldm.devices import is_out_of_memory
from ldm.errors import UserError
from ldm.hires import IMAGE_UPSCALERS, LATENT_UPSCALERS
from ldm.models.diffusion.sampler_registry import SAMPLERS, SCHEDULE_LABELS
from ldm.outputs import PARAMETERS_KEY, parse_parameters
from ldm.server.batching import batch_key
from ldm.server.errors import error_response
from ldm.server.images import encode_png, image_texts
from ldm.server.jobs import Job, JobQueue
from ldm.server.preview import preview_image
from ldm.server.schemas import Img2ImgBody, PngInfoBody, Txt2ImgBody
from ldm.server.service import Service, check_options, without_images
from ldm.server.translate import Work, translate

log = logging.getLogger("ldm.server")


async def wait_for(queue: JobQueue, job: Job, request: Request) -> Any:
    """Queue ``job`` and wait for its result; if the client disconnects meanwhile, the job is cancelled."""
    future = asyncio.wrap_future(queue.submit(job))
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=0.25)
        except TimeoutError:
            if await request.is_disconnected():
                queue.cancel(job)
                return error_response(499, "client_closed", "the client went away; the job was cancelled.")
        except UserError:
            raise  # bad input found by the worker (a LoRA the prompt names, say): 422
        except Exception as err:  # a failure inside generation: answered, logged, and the worker goes on
            log.exception("%s failed", job.name)
            detail = "out of memory; lower batch_size or width/height." if is_out_of_memory(err) else None
            return error_response(500, "server_error", detail or f"{type(err).__name__}: {err}")


def _generation_job(service: Service, work: Work, body: dict[str, Any], options: dict[str, Any]) -> Job:
    target = service.override_checkpoint(options)
    restore = body.get("override_settings_restore_afterwards", True)
    finish = functools.partial(service.respond, work, body=without_images(body))

    def run(job: Job) -> dict[str, Any]:
        previous = service.checkpoint
        if target is not None:
            service.switch(target)
        try:
            return finish(service.generate(work, job))
        finally:
            if target is not None and restore:
                service.switch(previous)

    first = work.requests[0]
    return Job(
        name=work.mode, run=run, count=len(work.requests), steps=work.steps,
        previews=bool(options["live_previews_enable"]), size=(first.width, first.height),
        batch_key=batch_key(work.requests, work.mode) if target is None else None,
        images=sum(r.batch for r in work.requests), work=work, finish=finish,
    )  # fmt: skip


def api_router(service: Service, queue: JobQueue) -> APIRouter:
    router = APIRouter()

    async def generate(body: Txt2ImgBody, request: Request) -> Any:
        options = service.with_options(body.override_settings)
        target = service.override_checkpoint(options)
        geometry = await run_in_threadpool(service.geometry, target)
        work = await run_in_threadpool(translate, body, geometry, options)
        service.check_size(work)
        return await wait_for(queue, _generation_job(service, work, body.model_dump(), options), request)

    @router.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgBody, request: Request) -> Any:
        return await generate(body, request)

    @router.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgBody, request: Request) -> Any:
        return await generate(body, request)

    @router.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        job = queue.current
        if job is None:
            state = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                     "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                    "current_task": None, "queued": queue.waiting}  # fmt: skip
        done = job.progress
        elapsed = time.time() - (job.started or time.time())
        image = None
        if not skip_current_image and job.preview is not None and job.size is not None:
            image = encode_png(preview_image(job.preview.float().cpu(), service.preview_map, job.size))
        state = {
            "skipped": job.skipped.is_set(), "interrupted": job.interrupted.is_set(), "job": job.name,
            "job_count": job.count, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "job_no": job.number, "sampling_step": job.step, "sampling_steps": job.steps,
        }  # fmt: skip
        return {
            "progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0, "state": state,
            "current_image": image, "textinfo": f"Step {job.step}/{job.steps}" if job.steps else None,
            "current_task": job.id, "queued": queue.waiting,
        }  # fmt: skip

    @router.post("/sdapi/v1/interrupt")
    def interrupt() -> None:
        queue.interrupt()

    @router.post("/sdapi/v1/skip")
    def skip() -> None:
        queue.skip()

    @router.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.label, "aliases": [s.id, *s.aliases], "options": {}} for s in SAMPLERS.values()]

    @router.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        automatic = {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                     "need_inner_model": False}  # fmt: skip
        return [automatic, *({**automatic, "name": name, "label": label} for name, label in SCHEDULE_LABELS.items())]

    @router.get("/sdapi/v1/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
                for name in IMAGE_UPSCALERS]  # fmt: skip

    @router.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    @router.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @router.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        catalog = service.catalog
        return [
            {"title": catalog.title(c), "model_name": c.model_name, "hash": catalog.hashes.get(c.path),
             "sha256": None, "filename": str(c.path), "config": str(c.config) if c.config else None}
            for c in catalog.entries
        ]  # fmt: skip

    @router.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        service.catalog.refresh()

    @router.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return dict(service.options)

    @router.post("/sdapi/v1/options")
    async def set_options(values: dict[str, Any], request: Request) -> Any:
        values = check_options(values)
        name = values.pop("sd_model_checkpoint", None)
        if name is not None:
            checkpoint = service.catalog.find(name)
            result = await wait_for(queue, Job(name="options", run=lambda job: service.switch(checkpoint)), request)
            if isinstance(result, JSONResponse):
                return result
        service.options.update(values)
        return None

    @router.post("/sdapi/v1/png-info")
    def png_info(body: PngInfoBody) -> dict[str, Any]:
        texts = image_texts(body.image, "image")
        text = texts.pop(PARAMETERS_KEY, "")
        parameters = parse_parameters(text) if text else {}
        if "Size" in parameters:
            width, _, height = parameters["Size"].partition("x")
            parameters.update({"Size-1": width, "Size-2": height})
        return {"info": text, "items": texts, "parameters": parameters}

    @router.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        return service.embeddings_listing()

    @router.post("/sdapi/v1/refresh-embeddings")
    async def refresh_embeddings(request: Request) -> Any:
        return await wait_for(queue, Job(name="embeddings", run=lambda job: service.refresh_embeddings()), request)

    @router.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        folder = service.lora_dir
        if folder is None or not folder.is_dir():
            return []
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in LORA_SUFFIXES and p.is_file())
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": _lora_metadata(p)} for p in files]

    @router.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> None:
        """LoRA files are looked up by name when a prompt uses them, so there is nothing to re-read."""

    @router.get("/ldm/v1/model")
    def model() -> dict[str, Any]:
        geometry = service.pipe.geometry
        return {
            "title": service.options["sd_model_checkpoint"], "default_width": geometry.default_size,
            "default_height": geometry.default_size, "size_multiple": geometry.multiple,
            "inpainting": bool(service.pipe.model.inpaints_by_conditioning), "max_images": service.max_images,
        }  # fmt: skip

    return router


def _lora_metadata(path: Path) -> dict[str, Any]:
    """A safetensors LoRA's training metadata (kohya's ``ss_*`` keys), as A1111 lists it; {} for other files."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as file:
            return file.metadata() or {}
    except (OSError, SafetensorError) as err:  # listed with its fault; using it by name reports it in full
        return {"error": f"not a readable safetensors file: {err}"}
