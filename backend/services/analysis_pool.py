"""A bounded, batching queue in front of live analysis.

Uploads wait in a queue of fixed size; one worker thread takes everything queued (up to a batch)
and runs CLIP and the SAE once for the lot. A full queue refuses at once (the caller answers 503
with Retry-After) instead of queueing without end, so memory stays bounded under any load.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from backend.services.prediction import Question
from clipscope.db.models import Sae

if TYPE_CHECKING:  # the analyzer, or the app's LazyAnalyzer standing for it: torch is imported with it
    from backend.services.analyze import Analyzer


class PoolFull(Exception):
    """The analysis queue is full; try again later."""


class PoolClosed(RuntimeError):
    """The server shut down before this upload was analysed."""


class AnalysisInterrupted(RuntimeError):
    """The worker thread was interrupted (an exception beyond ``Exception``, such as ``KeyboardInterrupt``)
    while this upload was in its hands; the next upload starts a new worker."""


@dataclass
class _Job:
    sae: Sae
    image: Image.Image
    occlude: bool = False
    question: Question | None = None
    future: Future = field(default_factory=Future)


class AnalysisPool:
    def __init__(self, analyzer: Analyzer, queue_size: int, max_batch: int):
        self.analyzer, self.max_batch = analyzer, max(1, max_batch)
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max(1, queue_size))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def submit(self, sae: Sae, image: Image.Image, occlude: bool = False, question: Question | None = None) -> Future:
        """A future of the image's :class:`~backend.services.firing.Analysis`; raises :class:`PoolFull` at once when full."""
        job = _Job(sae, image, occlude, question)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise PoolFull() from None
        self._ensure_worker()
        return job.future

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._work, name="clipscope-analysis", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 60) -> None:
        """At the app's shutdown: the worker finishes the batch in hand and ends, uploads still queued
        fail with :class:`PoolClosed`, and the analyzer lets go of its models. Until then the worker
        thread holds the analyzer, and with it CLIP and the SAE, for as long as the process lives."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None:
            thread.join(timeout)
        while True:
            try:
                self._queue.get_nowait().future.set_exception(PoolClosed("The server shut down before this upload was analysed."))
            except queue.Empty:
                break
        self.analyzer.close()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = [self._queue.get(timeout=0.25)]  # wakes to see a shutdown
            except queue.Empty:
                continue
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            by_sae: dict[tuple, list[_Job]] = {}
            for job in jobs:  # one forward pass per SAE and question
                by_sae.setdefault((job.sae.key, job.occlude, job.question), []).append(job)
            try:
                for group in by_sae.values():
                    try:
                        results = self.analyzer.analyse(group[0].sae, [j.image for j in group], occlude=group[0].occlude, question=group[0].question)
                    except Exception as exc:  # delivered to each waiting request, which reports it
                        for j in group:
                            j.future.set_exception(exc)
                    else:
                        for j, result in zip(group, results):
                            j.future.set_result(result)
            except BaseException as exc:  # the thread ends, but no upload it took is left waiting
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(AnalysisInterrupted(f"The analysis was interrupted ({type(exc).__name__}); try again."))
                raise
