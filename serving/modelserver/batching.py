"""Server-side batching with TF Serving's BasicBatchScheduler semantics.

Requests with the same servable, signature and per-example input shapes share a queue. A batch is processed
when it is full, when its first task has waited `batch_timeout_micros`, or when a later task did not fit;
`num_batch_threads` threads run batches. A queue holding `max_enqueued_batches` batches rejects a task that
needs a new batch with RESOURCE_EXHAUSTED.

One deliberate difference: the timeout applies only while another batch is being processed. When every
batch thread is idle, nothing is in flight that could join, so the batch goes at once: a lone request is
not delayed by the timeout (measured in docs/modelserver.md), while under load the idle thread still waits
for a fuller batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from serving.modelserver.config import BatchingOptions
from serving.modelserver.errors import ServingError, from_exception

log = logging.getLogger("modelserver")

QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"


class _Task:
    __slots__ = ("inputs", "size", "future", "loop", "enqueued")

    def __init__(self, inputs: dict[str, np.ndarray], size: int, future: asyncio.Future,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.inputs, self.size, self.future, self.loop = inputs, size, future, loop
        self.enqueued = time.monotonic()


class _Batch:
    __slots__ = ("tasks", "size", "created", "closed")

    def __init__(self) -> None:
        self.tasks: list[_Task] = []
        self.size = 0
        self.created = 0.0
        self.closed = False


class _Queue:
    __slots__ = ("servable", "signature", "batches")

    def __init__(self, servable: Any, signature: str) -> None:
        self.servable, self.signature = servable, signature
        self.batches: deque[_Batch] = deque()


# Called after each batch: (servable, task sizes, processed size incl. padding, queueing delays in s).
BatchObserver = Callable[[Any, list[int], int, list[float]], None]


def _deliver(results: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for fut, value, exc in results:
        if not fut.done():
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)


class Batcher:
    def __init__(self, opts: BatchingOptions, observer: BatchObserver | None = None) -> None:
        self.opts = opts
        self.max_batch = opts.max_batch_size
        self.exec_batch = (opts.max_execution_batch_size if opts.enable_large_batch_splitting
                           and opts.max_execution_batch_size else opts.max_batch_size)
        self.timeout = opts.batch_timeout_micros / 1e6
        self._observer = observer
        self._queues: dict[tuple, _Queue] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._running = 0  # batches being processed now
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(opts.num_batch_threads)]
        for t in self._threads:
            t.start()

    # --- event-loop side ---------------------------------------------------------------------------------

    def submit(self, servable: Any, signature: str, inputs: dict[str, np.ndarray], size: int) -> asyncio.Future:
        """Queues one request; the returned future gets the outputs dict (rows of this request only)."""
        loop = asyncio.get_running_loop()
        if size > self.exec_batch:
            if not self.opts.enable_large_batch_splitting or size > self.max_batch:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Task size {size} is larger than maximum input batch size {self.max_batch}")
            return self._submit_split(servable, signature, inputs, size, loop)
        fut = loop.create_future()
        self._enqueue(servable, signature, [_Task(inputs, size, fut, loop)])
        return fut

    def _submit_split(self, servable: Any, signature: str, inputs: dict[str, np.ndarray], size: int,
                      loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        tasks = []
        for start in range(0, size, self.exec_batch):
            part = {k: v[start:start + self.exec_batch] for k, v in inputs.items()}
            tasks.append(_Task(part, min(self.exec_batch, size - start), loop.create_future(), loop))
        self._enqueue(servable, signature, tasks)

        async def gather() -> dict[str, np.ndarray]:
            parts = await asyncio.gather(*(t.future for t in tasks))
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

        return asyncio.ensure_future(gather())

    def _enqueue(self, servable: Any, signature: str, tasks: list[_Task]) -> None:
        first = tasks[0].inputs
        key = (id(servable), signature,
               tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(first.items())))
        with self._cv:
            if self._stopping:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "Server is shutting down")
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = _Queue(servable, signature)
            # Capacity first, so that a split task is queued whole or not at all.
            batches, open_size = len(q.batches), q.batches[-1].size if q.batches and not q.batches[-1].closed \
                else None
            for t in tasks:
                if open_size is None or open_size + t.size > self.exec_batch:
                    batches += 1
                    open_size = t.size
                else:
                    open_size += t.size
            if batches > self.opts.max_enqueued_batches:
                if not q.batches:
                    del self._queues[key]
                raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, QUEUE_FULL)
            now = time.monotonic()
            for t in tasks:
                b = q.batches[-1] if q.batches and not q.batches[-1].closed else None
                if b is None or b.size + t.size > self.exec_batch:
                    if b is not None:
                        b.closed = True
                    b = _Batch()
                    b.created = now
                    q.batches.append(b)
                b.tasks.append(t)
                b.size += t.size
                if b.size >= self.exec_batch:
                    b.closed = True
            self._cv.notify()

    # --- batch threads -------------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[_Queue, _Batch] | None:
        with self._cv:
            while True:
                now = time.monotonic()
                best: tuple[_Queue, _Batch] | None = None
                wait: float | None = None
                for q in self._queues.values():
                    if not q.batches:
                        continue
                    b = q.batches[0]
                    due = b.created + (self.timeout if self._running else 0.0)
                    if b.closed or now >= due or self._stopping:
                        if best is None or b.created < best[1].created:
                            best = (q, b)
                    else:
                        wait = due - now if wait is None else min(wait, due - now)
                if best is not None:
                    q, b = best
                    q.batches.popleft()
                    b.closed = True
                    self._running += 1
                    if not q.batches:
                        self._queues = {k: v for k, v in self._queues.items() if v is not q}
                    return best
                if self._stopping:
                    return None
                self._cv.wait(wait)

    def _work(self) -> None:
        while True:
            item = self._next_batch()
            if item is None:
                return
            q, b = item
            try:
                self._process(q.servable, q.signature, b.tasks)
            except Exception:  # never lose a batch thread
                log.exception("batch thread failed")
            finally:
                with self._cv:
                    self._running -= 1
                    # A waiting batch's due time depends on _running: let the other threads re-check.
                    self._cv.notify_all()

    def _pad_to(self, size: int) -> int:
        for allowed in self.opts.allowed_batch_sizes:
            if allowed >= size:
                return allowed
        return size

    def _process(self, servable: Any, signature: str, tasks: list[_Task]) -> None:
        start = time.monotonic()
        sizes = [t.size for t in tasks]
        total = sum(sizes)
        padded = self._pad_to(total)
        results: list[tuple[asyncio.Future, Any, BaseException | None]] = []
        try:
            if len(tasks) == 1 and padded == total:
                merged = tasks[0].inputs
            else:
                merged = {}
                for k in tasks[0].inputs:
                    parts = [t.inputs[k] for t in tasks]
                    if padded > total:  # allowed_batch_sizes: pad with copies of the first row
                        parts.append(np.repeat(parts[0][:1], padded - total, axis=0))
                    merged[k] = np.concatenate(parts)
            out = servable.run(signature, merged)
            offset = 0
            for t in tasks:
                part = {k: (v[offset:offset + t.size] if v.ndim and v.shape[0] == padded else v)
                        for k, v in out.items()}
                offset += t.size
                results.append((t.future, part, None))
        except Exception as exc:  # noqa: BLE001 - every error goes back to the callers
            err = from_exception(exc)
            if len(tasks) > 1 and err.code == grpc.StatusCode.INVALID_ARGUMENT:
                # One bad input (e.g. an undecodable image) must not fail its neighbours: run each alone.
                for t in tasks:
                    try:
                        results.append((t.future, servable.run(signature, t.inputs), None))
                    except Exception as single:  # noqa: BLE001
                        results.append((t.future, None, from_exception(single)))
            else:
                results = [(t.future, None, err) for t in tasks]
        if self._observer is not None:
            try:
                self._observer(servable, sizes, padded, [start - t.enqueued for t in tasks])
            except Exception:  # noqa: BLE001
                log.exception("batch observer failed")
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for t, r in zip(tasks, results, strict=True):
            by_loop.setdefault(t.loop, []).append(r)
        for loop, rs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, rs)
            except RuntimeError:
                pass  # the loop has closed: nobody is waiting

    def stop(self) -> None:
        """Processes what is queued, then ends the threads."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
