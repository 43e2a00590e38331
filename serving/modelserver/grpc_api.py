"""tensorflow.serving.PredictionService and ModelService on grpc.aio, with TF Serving's codes and texts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from client.protos.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from serving.modelserver.core import Core, check_output_filter, check_request_inputs, signature_for_predict
from serving.modelserver.errors import MAX_MESSAGE, ServingError, from_exception, invalid
from serving.modelserver.manager import Handle
from serving.modelserver.servable import CLASSIFY_METHOD, DEFAULT_SIGNATURE, REGRESS_METHOD
from serving.modelserver.tensors import numpy_to_proto, proto_to_numpy

STATE_ENUM = {
    "START": get_model_status_pb2.ModelVersionStatus.START,
    "LOADING": get_model_status_pb2.ModelVersionStatus.LOADING,
    "AVAILABLE": get_model_status_pb2.ModelVersionStatus.AVAILABLE,
    "UNLOADING": get_model_status_pb2.ModelVersionStatus.UNLOADING,
    "END": get_model_status_pb2.ModelVersionStatus.END,
}


def spec_choice(spec: Any) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


async def _abort(context: grpc.aio.ServicerContext, err: ServingError) -> None:
    await context.abort(err.code, err.message[:MAX_MESSAGE])


def status_response(core: Core, name: str, version: int | None, label: str | None
                    ) -> get_model_status_pb2.GetModelStatusResponse:
    resp = get_model_status_pb2.GetModelStatusResponse()
    for st in core.manager.status(name, version, label):
        resp.model_version_status.add(
            version=st.version, state=STATE_ENUM[st.state],
            status={"error_code": st.error_code.value[0], "error_message": st.error_message})
    return resp


def metadata_response(handle: Handle, name: str) -> get_model_metadata_pb2.GetModelMetadataResponse:
    resp = get_model_metadata_pb2.GetModelMetadataResponse()
    resp.model_spec.name = name
    resp.model_spec.version.value = handle.servable.version
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    for key, sd in handle.servable.signature_defs.items():
        sigmap.signature_def[key].CopyFrom(sd)
    resp.metadata["signature_def"].Pack(sigmap)
    return resp


def check_metadata_fields(fields: list[str]) -> None:
    if not fields:
        raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
    for f in fields:
        if f != "signature_def":
            raise invalid(f"Metadata field %s is not supported{f}")


def classify_signature_error(handle: Handle, signature_name: str, method: str) -> ServingError:
    """Classify/Regress on a model: TF Serving's signature checks (our exports have predict signatures only)."""
    key = signature_name or DEFAULT_SIGNATURE
    sig = handle.servable.signature(key)
    if sig is None:
        return invalid(f"No signature was found with the name: {key}")
    kind = "classification" if method == CLASSIFY_METHOD else "regression"
    if sig.method_name != method:
        return invalid(f"Expected {kind} signature method_name to be {method}. Was: {sig.method_name}")
    return ServingError(grpc.StatusCode.UNIMPLEMENTED,
                        f"{kind} signatures over tf.Example are not supported by the embedded model server")


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def Predict(self, request: predict_pb2.PredictRequest,  # noqa: N802 - gRPC method name
                      context: grpc.aio.ServicerContext) -> predict_pb2.PredictResponse:
        started = time.perf_counter()
        name = request.model_spec.name
        version = None
        try:
            handle = self.core.manager.acquire(name, *spec_choice(request.model_spec))
            try:
                version = handle.servable.version
                sig = signature_for_predict(handle, request.model_spec.signature_name)
                check_request_inputs(sig, list(request.inputs.keys()))
                inputs = {k: proto_to_numpy(v, k) for k, v in request.inputs.items()}
                outputs = check_output_filter(sig, list(request.output_filter))
                result = await self.core.run(handle, sig, inputs, outputs)
            finally:
                handle.release()
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name = name
            resp.model_spec.version.value = version
            resp.model_spec.signature_name = sig.name
            for alias, arr in result.items():
                numpy_to_proto(arr, resp.outputs[alias])
        except asyncio.CancelledError:
            self.core.record(name, version, "predict", "GRPC", grpc.StatusCode.CANCELLED, started)
            raise
        except Exception as exc:  # noqa: BLE001
            err = from_exception(exc)
            self.core.record(name, version, "predict", "GRPC", err.code, started)
            await _abort(context, err)
        self.core.record(name, version, "predict", "GRPC", grpc.StatusCode.OK, started)
        return resp

    async def _classify_like(self, request: Any, context: grpc.aio.ServicerContext, method: str, api: str) -> None:
        started = time.perf_counter()
        name = request.model_spec.name
        try:
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            handle = self.core.manager.acquire(name, *spec_choice(request.model_spec))
            handle.release()
            raise classify_signature_error(handle, request.model_spec.signature_name, method)
        except Exception as exc:  # noqa: BLE001
            err = from_exception(exc)
            self.core.record(name, None, api, "GRPC", err.code, started)
            await _abort(context, err)

    async def Classify(self, request: classification_pb2.ClassificationRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> classification_pb2.ClassificationResponse:
        await self._classify_like(request, context, CLASSIFY_METHOD, "classify")
        return classification_pb2.ClassificationResponse()

    async def Regress(self, request: regression_pb2.RegressionRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> regression_pb2.RegressionResponse:
        await self._classify_like(request, context, REGRESS_METHOD, "regress")
        return regression_pb2.RegressionResponse()

    async def MultiInference(self, request: inference_pb2.MultiInferenceRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> inference_pb2.MultiInferenceResponse:
        started = time.perf_counter()
        spec = request.tasks[0].model_spec if request.tasks else None
        name = spec.name if spec is not None else ""
        try:
            handle = self.core.manager.acquire(name, *(spec_choice(spec) if spec is not None else (None, None)))
            handle.release()
            model, signatures = "", set()
            for task in request.tasks:
                if not task.model_spec.name:
                    raise invalid("Found ModelSpec with an empty model name.")
                if model and model != task.model_spec.name:
                    raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
                model = task.model_spec.name
                key = task.model_spec.signature_name or DEFAULT_SIGNATURE
                if key in signatures:
                    raise invalid(f"Duplicate evaluation of signature: {key}")
                signatures.add(key)
                sig = handle.servable.signature(key)
                if sig is None:
                    raise invalid(f"Requested signature not found in model graph: {key}")
                if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                    raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                       f"Unsupported signature method_name: {task.method_name}")
                raise classify_signature_error(handle, key, task.method_name)
            raise invalid("Expected at least one task")
        except Exception as exc:  # noqa: BLE001
            err = from_exception(exc)
            self.core.record(name, None, "multi_inference", "GRPC", err.code, started)
            await _abort(context, err)
        return inference_pb2.MultiInferenceResponse()

    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> get_model_metadata_pb2.GetModelMetadataResponse:
        try:
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            check_metadata_fields(list(request.metadata_field))
            handle = self.core.manager.acquire(request.model_spec.name, *spec_choice(request.model_spec))
            handle.release()
            return metadata_response(handle, request.model_spec.name)
        except Exception as exc:  # noqa: BLE001
            await _abort(context, from_exception(exc))


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> get_model_status_pb2.GetModelStatusResponse:
        try:
            if not request.HasField("model_spec"):
                raise invalid("Missing ModelSpec")
            return status_response(self.core, request.model_spec.name, *spec_choice(request.model_spec))
        except Exception as exc:  # noqa: BLE001
            await _abort(context, from_exception(exc))

    async def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest,  # noqa: N802
                                        context: grpc.aio.ServicerContext) -> model_management_pb2.ReloadConfigResponse:
        try:
            await asyncio.to_thread(self.core.manager.reload, request.config)
        except Exception as exc:  # noqa: BLE001
            await _abort(context, from_exception(exc))
        resp = model_management_pb2.ReloadConfigResponse()
        resp.status.error_code = 0
        return resp
