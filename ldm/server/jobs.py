"""The job queue: one worker thread owns the model and serves jobs in order; progress, interrupt and cancellation.

The HTTP handlers only submit jobs and wait for their futures, so a slow generation never blocks the event loop,
and requests beyond ``limit`` waiting jobs are refused at once (429) instead of piling up. A job whose client went
away is dropped from the queue, or, when it is running, stopped at the next sampler step: the device never keeps
working for nobody.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm.models.diffusion.samplers import StopSampling
from ldm.server.errors import JobCancelled, QueueFull

_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One unit of the worker's work (a generation, a model switch) and its live state.

    ``run(job)`` is called on the worker thread; generations call :meth:`on_step` from the sampler callback.
    ``count`` / ``steps``: iterations and sampler steps per iteration, for the progress fraction. Jobs with equal
    ``batch_key`` s (not None) that wait next to each other may run as one batch of at most the queue's
    ``max_batch`` ``images``, through the queue's batch runner, which calls ``finish(results)`` of each with
    ``work`` done.
    """

    name: str
    run: Callable[[Job], Any]
    count: int = 1
    steps: int = 0
    previews: bool = True
    size: tuple[int, int] | None = None  # (width, height) of the images, for the preview
    batch_key: Any = None
    images: int = 1
    work: Any = None
    finish: Callable[[list[Any]], Any] | None = None
    id: str = field(default_factory=lambda: f"task({next(_ids)})")
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.time)
    started: float | None = None
    number: int = 0  # the iteration running, from 0
    step: int = 0  # sampler steps done in it
    preview: torch.Tensor | None = None  # (C, h, w) on the model's device: the first image's x0 estimate
    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def begin_iteration(self, number: int) -> None:
        self.number, self.step = number, 0
        self.skipped.clear()

    def record(self, i: int, denoised: torch.Tensor) -> None:
        """Step ``i`` is done: its progress and the preview latent."""
        self.step = i + 1
        if self.previews:
            self.preview = denoised[0].detach().clone()  # stays on the device: no host sync per step

    def on_step(self, i: int, denoised: torch.Tensor) -> None:
        """The sampler callback of a job run alone: record the step, then stop if asked to."""
        self.record(i, denoised)
        if self.cancelled.is_set():
            raise JobCancelled
        if self.interrupted.is_set() or self.skipped.is_set():
            raise StopSampling

    @property
    def progress(self) -> float:
        """The share of the job done, in [0, 1]."""
        if self.steps == 0:
            return 0.0
        return min(1.0, (self.number + min(self.step, self.steps) / self.steps) / self.count)


class JobQueue:
    """Jobs served one at a time (or one batch at a time), in order, by a worker thread; at most ``limit`` jobs
    wait. ``run_batch(jobs)`` runs a group of batchable jobs and returns their results in order."""

    def __init__(
        self, limit: int, max_batch: int = 1, run_batch: Callable[[list[Job]], list[Any]] | None = None
    ) -> None:
        self.limit, self.max_batch, self.run_batch = limit, max_batch, run_batch
        self.running: list[Job] = []
        self.finished = 0
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="ldm-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def current(self) -> Job | None:
        """The running job (the first of a running batch)."""
        running = self.running
        return running[0] if running else None

    def submit(self, job: Job) -> Future:
        """Queue ``job``; QueueFull when ``limit`` jobs already wait."""
        with self._lock:
            if len(self._waiting) >= self.limit:
                raise QueueFull(f"{len(self._waiting)} jobs are waiting, the limit; retry when one is done.")
            self._waiting.append(job)
            self._lock.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        """The job's client is gone: drop it if it waits, stop it at the next step if it runs."""
        job.cancelled.set()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.cancel()

    def interrupt(self) -> None:
        """A1111's Interrupt: end the running job (or batch) after this step, keeping the images so far."""
        for job in self.running:
            job.interrupted.set()

    def skip(self) -> None:
        """A1111's Skip: end the running iteration after this step and go on with the next."""
        for job in self.running:
            job.skipped.set()

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            self._lock.notify()
        self._thread.join(timeout=30)

    def _take(self) -> list[Job]:
        """The next job, and the batchable jobs waiting right behind it (called with the lock held)."""
        group = [self._waiting.popleft()]
        first = group[0]
        while (
            self.run_batch is not None and first.batch_key is not None and self._waiting
            and self._waiting[0].batch_key == first.batch_key
            and sum(job.images for job in group) + self._waiting[0].images <= self.max_batch
        ):  # fmt: skip
            group.append(self._waiting.popleft())
        return [job for job in group if job.future.set_running_or_notify_cancel()]

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                group = self._take()
                if not group:
                    continue
                self.running = group
            for job in group:
                job.started = time.time()
            try:
                if len(group) == 1:
                    group[0].future.set_result(group[0].run(group[0]))
                else:
                    for job, result in zip(group, self.run_batch(group), strict=True):
                        job.future.set_result(result)
            except BaseException as err:  # every failure goes to the waiting handlers; the worker keeps serving
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(err)
            finally:
                with self._lock:
                    self.running = []
                    self.finished += len(group)
