"""The asynchronous memory update (paper §4, step 3), off the caller's and the decoder's thread.

STM_t = MemAttn(STM_{t-1}, Encoder(concat(X_t, Y_t))) starts when an answer is complete and runs
on a worker thread, so the answer's stream is never delayed by it, and it completes whether or not
anyone still reads that stream. Updates that are queued together run as one batch (right-padded;
the model's update is exact under right padding). On a GPU the worker issues its kernels on its
own CUDA stream, which waits only for the event recorded after the turn's last decoder kernel, so
encoder and memory attention overlap the next decode steps of other conversations.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import pad_sequences


@dataclass(frozen=True)
class UpdateTiming:
    """Wall-clock instants (``time.perf_counter``) of one memory update."""

    queued_at: float
    started_at: float
    finished_at: float

    @property
    def duration_s(self) -> float:
        """Compute time of the update (the batch it ran in)."""
        return self.finished_at - self.started_at

    @property
    def latency_s(self) -> float:
        """From the answer's end to the new STM being available."""
        return self.finished_at - self.queued_at


@dataclass
class UpdateJob:
    """One conversation's update: ``stm`` (1, L, S, d) and the turn's ``interaction`` ids.

    ``done(stm_next, error, timing)`` is called on the worker thread, exactly once."""

    stm: torch.Tensor
    interaction: Sequence[int]
    done: Callable[[torch.Tensor | None, BaseException | None, UpdateTiming], None]
    started: Callable[[], None] | None = None
    ready: torch.cuda.Event | None = None  # decoder work this update must wait for (GPU)
    queued_at: float = 0.0


class MemoryUpdater:
    """A worker thread that applies queued memory updates, batching those that wait together."""

    def __init__(
        self, model: ReactiveTransformer, *, max_batch: int = 16, threads: int = 1
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.threads = threads
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[UpdateJob | None] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        device = model.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="rxt-memory-update", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Updates queued or running."""
        return self._pending

    def submit(self, job: UpdateJob) -> None:
        job.queued_at = time.perf_counter()
        with self._lock:
            self._pending += 1
        self._queue.put(job)

    def close(self) -> None:
        """Finish every queued update, then stop the worker."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        set_intra_op_threads(self.model.device, self.threads)
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                jobs.append(more)
            self._process(jobs)

    def _process(self, jobs: list[UpdateJob]) -> None:
        for job in jobs:
            if job.started is not None:
                job.started()
        started = time.perf_counter()
        try:
            results: list[torch.Tensor | BaseException] = list(self._compute(jobs))
        except Exception as exc:
            # One conversation's bad update must not fail the others batched with it.
            results = [self._alone(job) for job in jobs] if len(jobs) > 1 else [exc]
        finished = time.perf_counter()
        with self._lock:
            self._pending -= len(jobs)
        for job, result in zip(jobs, results, strict=True):
            timing = UpdateTiming(job.queued_at, started, finished)
            if isinstance(result, BaseException):
                job.done(None, result, timing)
            else:
                job.done(result, None, timing)

    def _alone(self, job: UpdateJob) -> torch.Tensor | BaseException:
        try:
            return self._compute([job])[0]
        except Exception as exc:  # delivered to its conversation; the worker keeps running
            return exc

    def _compute(self, jobs: list[UpdateJob]) -> list[torch.Tensor]:
        model, device = self.model, self.model.device
        lengths = [len(job.interaction) for job in jobs]
        ids, mask = pad_sequences([job.interaction for job in jobs])
        if min(lengths) == max(lengths):
            mask = None
        on_stream = torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()
        with torch.no_grad(), on_stream:
            if self._stream is not None:
                for job in jobs:
                    if job.ready is not None:
                        self._stream.wait_event(job.ready)
            stm = torch.cat([job.stm.to(device) for job in jobs])
            ids = ids.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True) if mask is not None else None
            stm_next = model.update_memory(stm, ids, mask)
            rows = [stm_next[i : i + 1].clone() for i in range(len(jobs))]
            if self._stream is not None:
                # Publish only finished values: the next turn reads them on another stream.
                self._stream.synchronize()
        return rows


def set_intra_op_threads(device: torch.device, threads: int) -> None:
    """Intra-op CPU threads for the calling thread (OpenMP teams are per thread)."""
    if device.type == "cpu":
        torch.set_num_threads(threads)
