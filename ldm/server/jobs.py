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
    ``count`` / ``steps``: iterations and sampler steps per iteration, for the progress fraction.
    """

    name: str
    run: Callable[[Job], Any]
    count: int = 1
    steps: int = 0
    previews: bool = True
    size: tuple[int, int] | None = None  # (width, height) of the images, for the preview
    id: str = field(default_factory=lambda: f"task({next(_ids)})")
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.time)
    started: float | None = None
    number: int = 0  # the iteration running, from 0
    step: int = 0  # sampler steps done in it
    preview: torch.Tensor | None = None  # (C, h, w) float32 on the CPU: the first image's x0 estimate
    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def begin_iteration(self, number: int) -> None:
        self.number, self.step = number, 0
        self.skipped.clear()

    def on_step(self, i: int, denoised: torch.Tensor) -> None:
        """The sampler callback: record progress and the preview latent, then stop if asked to."""
        self.step = i + 1
        if self.previews:
            self.preview = denoised[0].detach().float().cpu()
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
    """Jobs served one at a time, in order, by a worker thread; at most ``limit`` jobs wait."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current: Job | None = None
        self.finished = 0
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="ldm-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

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
        """A1111's Interrupt: end the running job after this step, keeping the images so far."""
        if (job := self.current) is not None:
            job.interrupted.set()

    def skip(self) -> None:
        """A1111's Skip: end the running iteration after this step and go on with the next."""
        if (job := self.current) is not None:
            job.skipped.set()

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            self._lock.notify()
        self._thread.join(timeout=30)

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue
                self.current = job
            job.started = time.time()
            try:
                job.future.set_result(job.run(job))
            except BaseException as err:  # every failure goes to the waiting handler; the worker keeps serving
                job.future.set_exception(err)
            finally:
                with self._lock:
                    self.current = None
                    self.finished += 1
