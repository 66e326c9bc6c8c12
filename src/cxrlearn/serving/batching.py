"""Dynamic batching: requests that arrive within a few milliseconds of each other share one forward pass.

What Triton's and TorchServe's dynamic batchers do, over a :class:`~cxrlearn.inference.predictor.Predictor` (any
runtime): the first request waiting opens a batch, which closes when it holds ``max_batch`` images or ``wait_s``
has passed since it opened, whichever comes first; one thread runs the network on it while the next batch fills.
A batch waits only while other requests are on their way (being decoded, :meth:`Batcher.arriving`): a lone
request does not wait at all, and under load the next batch is already waiting when a pass ends.

What is batched is only the network: each request decodes and prepares its image in its own thread before it
joins (:meth:`Predictor.prepare`), so a slow or undecodable upload never holds a batch back. A batch whose pass
fails is run again one image at a time, so that only the image at fault fails.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from cxrlearn.errors import ConfigError
from cxrlearn.inference.predictor import Prediction, Predictor, Prepared


@dataclass
class _Job:
    prepared: Prepared
    name: str
    answer: Future = field(default_factory=Future)


class Batcher:
    """``Batcher(predictor, max_batch, wait_s).predict(prepared, name)`` from any number of threads at once.

    ``lock`` is held for each forward pass: whatever else runs the same model (Grad-CAM) takes it too."""

    def __init__(self, predictor: Predictor, max_batch: int, wait_s: float,
                 observe: Callable[[int], None] | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a whole number >= 1, not {max_batch!r}")
        if not wait_s >= 0:
            raise ConfigError(f"wait_s must be >= 0, not {wait_s!r}")
        self.predictor, self.max_batch, self.wait_s = predictor, max_batch, wait_s
        self.observe = observe  # told each forward pass's size (the service's metrics)
        self.lock = threading.Lock()
        self.batches = 0  # forward passes run, and the images in them: how well requests are being batched
        self.images = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._arriving = 0  # requests being decoded, which a batch may wait for
        self._counting = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cxrlearn-batcher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self):
        """Around a request's decoding: while it lasts, an open batch may wait (at most ``wait_s``) for it."""
        with self._counting:
            self._arriving += 1
        try:
            yield
        finally:
            with self._counting:
                self._arriving -= 1

    def predict(self, prepared: Prepared, name: str) -> Prediction:
        """The prediction for one prepared image, from a forward pass it may share with others; raises what the
        pass raised for this image alone."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        job = _Job(prepared, name)
        self._queue.put(job)
        return job.answer.result()

    def close(self) -> None:
        """Answer what is waiting, then stop the thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _next_batch(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        closes_at = time.monotonic() + self.wait_s
        while len(jobs) < self.max_batch:
            if self._arriving == 0 and self._queue.empty():  # no one else on the way: no reason to wait
                break
            try:
                job = self._queue.get(timeout=max(0.0, closes_at - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # closing: answer this batch, then stop
                self._queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            self._answer(jobs)

    def _answer(self, jobs: list[_Job]) -> None:
        try:
            with self.lock:
                results = self.predictor.predict_prepared([job.prepared for job in jobs], [job.name for job in jobs])
                self.batches, self.images = self.batches + 1, self.images + len(jobs)
            if self.observe is not None:
                self.observe(len(jobs))
        except Exception as err:  # noqa: BLE001 - handed to the request that waits for it
            if len(jobs) == 1:
                jobs[0].answer.set_exception(err)
                return
            for job in jobs:  # alone, so that only the image at fault fails
                self._answer([job])
            return
        for job, result in zip(jobs, results):
            job.answer.set_result(result)
