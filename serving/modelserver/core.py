"""What both protocols share: Predict's checks in TF Serving's order, running on the batcher or a worker
thread (never on the event loop), and request metrics."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from serving.modelserver.batching import Batcher
from serving.modelserver.errors import ServingError, invalid
from serving.modelserver.manager import Handle, Manager
from serving.modelserver.metrics import Metrics
from serving.modelserver.servable import (
    CLASSIFY_METHOD,
    DEFAULT_SIGNATURE,
    PREDICT_METHOD,
    REGRESS_METHOD,
    Signature,
)


def check_request_inputs(sig: Signature, names: list[str]) -> None:
    """VerifySignature + VerifyRequestInputsSize + alias check of predict_util.cc."""
    if sig.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD):
        raise ServingError(grpc.StatusCode.INTERNAL,
                           f"Expected prediction signature method_name to be one of {{{PREDICT_METHOD}, "
                           f"{CLASSIFY_METHOD}, {REGRESS_METHOD}}}. Was: {sig.method_name}")
    if len(names) != len(sig.inputs):
        req, want = sorted(names), sorted(sig.inputs)
        extra = sorted(set(req) - set(want))
        missing = sorted(set(want) - set(req))
        raise invalid(f"input size does not match signature: {len(req)}!={len(want)} len({{{','.join(req)}}}) != "
                      f"len({{{','.join(want)}}}). Sent extra: {{{','.join(extra)}}}. "
                      f"Missing but required: {{{','.join(missing)}}}.")
    for alias in names:
        if alias not in sig.inputs:
            raise invalid(f"input tensor alias not found in signature: {alias}. Inputs expected to be in the set "
                          f"{{{','.join(sorted(sig.inputs))}}}.")


def check_output_filter(sig: Signature, output_filter: list[str]) -> list[str]:
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in sig.outputs:
            raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                          f"{{{','.join(sorted(sig.outputs))}}}.")
        if alias in seen:
            raise invalid(f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return list(output_filter) or sorted(sig.outputs)


def signature_for_predict(handle: Handle, name: str) -> Signature:
    key = name or DEFAULT_SIGNATURE
    sig = handle.servable.signature(key)
    if sig is None:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f"Serving signature key \"{key}\" not found.")
    return sig


class Core:
    def __init__(self, manager: Manager, metrics: Metrics, batcher: Batcher | None, workers: int) -> None:
        self.manager = manager
        self.metrics = metrics
        self.batcher = batcher
        self.executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="infer")

    async def run(self, handle: Handle, sig: Signature, inputs: dict[str, np.ndarray],
                  outputs: list[str]) -> dict[str, np.ndarray]:
        servable = handle.servable
        batch = servable.check_inputs(sig, inputs)
        if self.batcher is not None and batch > 0 and all(a.ndim for a in inputs.values()):
            result = await self.batcher.submit(servable, sig.name, inputs, batch)
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self.executor, servable.run, sig.name, inputs)
        return {k: result[k] for k in outputs}

    def record(self, model: str, version: int | None, api: str, entrypoint: str, code: grpc.StatusCode,
               started: float) -> None:
        v = "" if version is None else str(version)
        self.metrics.request_count.inc(model, v, code.name)
        self.metrics.request_latency.observe(model, v, api, entrypoint, value=(time.perf_counter() - started) * 1e6)

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.executor.shutdown(wait=True)
