"""Coalesce concurrent classify requests into shared Predict calls.

Each gRPC call costs the gateway and the model server far more CPU than the 3 KB of pixels in it, so with
many small concurrent uploads the number of calls, not the model, limits throughput. At most
`max_calls` Predict calls are in flight; requests arriving meanwhile wait and leave together in the next
call, up to `max_images`. A lone request leaves at once (no timer, so no added latency at low load), and
the images of one request are never split across calls. Requests for different versions or labels never
share a call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from client.tfserving import AsyncModelServerClient, Prediction
from serving.gateway import metrics


@dataclass
class _Item:
    images: np.ndarray
    key: tuple[int | None, str | None]
    deadline: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, client: AsyncModelServerClient, *, max_images: int = 64, max_calls: int = 2) -> None:
        self.client = client
        self.max_images = max_images
        self._slots = asyncio.Semaphore(max_calls)
        self._pending: list[_Item] = []
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()

    async def predict(self, images: np.ndarray, *, version: int | None, label: str | None,
                      timeout: float) -> Prediction:
        loop = asyncio.get_running_loop()
        item = _Item(images, (version, label), loop.time() + timeout, loop.create_future())
        self._pending.append(item)
        self._wakeup.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await item.future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._slots.acquire()
                batch = self._take()
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._call(batch))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)

    def _take(self) -> list[_Item]:
        live = [it for it in self._pending if not it.future.done()]  # drop requests cancelled while waiting
        if not live:
            self._pending = []
            return []
        key = live[0].key
        taken: list[_Item] = []
        rest: list[_Item] = []
        count = 0
        for it in live:
            if it.key == key and (not taken or count + len(it.images) <= self.max_images):
                taken.append(it)
                count += len(it.images)
            else:
                rest.append(it)
        self._pending = rest
        return taken

    async def _call(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([it.images for it in batch])
            metrics.BATCH_IMAGES.observe(len(images))
            version, label = batch[0].key
            timeout = max(min(it.deadline for it in batch) - loop.time(), 0.001)
            prediction = await self.client.predict_pixels(images, version=version, label=label, timeout=timeout)
            offset = 0
            for it in batch:
                n = len(it.images)
                if not it.future.done():
                    it.future.set_result(Prediction(prediction.version, prediction.probabilities[offset:offset + n]))
                offset += n
        except BaseException as exc:  # every waiter gets the outcome, whatever it is
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
        finally:
            self._slots.release()

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        for task in list(self._calls):
            task.cancel()
