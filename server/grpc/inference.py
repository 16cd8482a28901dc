"""inference.GRPCInferenceService (Open Inference Protocol, with Triton's extensions): thin. Messages in
(inference_converters), one call of the data plane (server/dataplane/), messages out; errors become statuses
in server.grpc.calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from server.dataplane import DataPlane
from server.errors import NotServed, SegservError
from server.grpc import inference_converters as converters
from server.grpc.calls import at_once, authorization, call_deadline, guarded, guarded_stream, read_message
from server.grpc.interceptor import Context
from server.inference import protocol as inference
from server.inference.protocol import InferResponse
from server.operations.tracing import trace_settings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_NOT_SERVED = {
    "SystemSharedMemoryStatus": "segserve takes tensors in the request only; it has no shared memory",
    "SystemSharedMemoryRegister": "segserve takes tensors in the request only; it has no shared memory",
    "SystemSharedMemoryUnregister": "segserve takes tensors in the request only; it has no shared memory",
    "CudaSharedMemoryStatus": "segserve takes tensors in the request only; it has no CUDA shared memory",
    "CudaSharedMemoryRegister": "segserve takes tensors in the request only; it has no CUDA shared memory",
    "CudaSharedMemoryUnregister": "segserve takes tensors in the request only; it has no CUDA shared memory",
    "LogSettings": "segserve's log level is set at start-up (SEGSERVE_LOG_LEVEL)",
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        ready = await guarded(context, at_once(self.plane.model_ready, request.name, request.version))
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="segserve", version=inference.server_version(), extensions=inference.EXTENSIONS
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        model = await guarded(context, at_once(self.plane.describe, request.name, request.version))
        return converters.metadata_to_proto(model)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        model = await guarded(context, at_once(self.plane.describe, request.name, request.version))
        return pb.ModelConfigResponse(config=converters.config_to_proto(model))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        reports = await guarded(context, at_once(self.plane.statistics, request.name, request.version))
        return pb.ModelStatisticsResponse(model_stats=[converters.statistics_to_proto(r) for r in reports])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        index = await guarded(context, at_once(self.plane.index, request.ready, authorization(context)))
        return converters.index_to_proto(index)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        response = await guarded(context, self._infer(request, call_deadline(context)))
        return converters.response_to_proto(response)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request answered in order; up to a window of them in progress at once, so frames share batches.
        A failed request is answered with its error_message and the stream goes on."""
        deadline = call_deadline(context)
        answers: AsyncIterator[pb.ModelStreamInferResponse] = guarded_stream(
            context, lambda: self.plane.infer_stream(lambda: read_message(context), converters.INFER_STREAM, deadline)
        )
        async for answer in answers:
            yield answer

    # ---- not served -----------------------------------------------------------------------

    async def _not_served(self, context: Context, method: str) -> Any:
        return await guarded(context, self._raise(NotServed(f"{method} is not implemented: {_NOT_SERVED[method]}")))

    @staticmethod
    async def _raise(error: SegservError) -> Any:
        raise error

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        return await guarded(context, self._load(request, context))

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        return await guarded(context, self._unload(request, context))

    async def _load(self, request: pb.RepositoryModelLoadRequest, context: Context) -> pb.RepositoryModelLoadResponse:
        await self.plane.load(
            request.model_name, request.parameters, authorization(context), _client_certified(context)
        )
        return pb.RepositoryModelLoadResponse()

    async def _unload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.plane.unload(
            request.model_name, request.parameters, authorization(context), _client_certified(context)
        )
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        return await self._not_served(context, "SystemSharedMemoryStatus")

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        return await self._not_served(context, "SystemSharedMemoryRegister")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        return await self._not_served(context, "SystemSharedMemoryUnregister")

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        return await self._not_served(context, "CudaSharedMemoryStatus")

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        return await self._not_served(context, "CudaSharedMemoryRegister")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        return await self._not_served(context, "CudaSharedMemoryUnregister")

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Context) -> pb.TraceSettingResponse:
        """Triton's trace settings mapped onto OpenTelemetry (server/operations/tracing.py): a setting with no
        values goes back to its value at start-up; an empty request reads them."""
        update = {key: list(setting.value) for key, setting in request.settings.items()}
        settings = await guarded(context, at_once(trace_settings, update, request.model_name))
        return pb.TraceSettingResponse(
            settings={key: pb.TraceSettingResponse.SettingValue(value=values) for key, values in settings.items()}
        )

    async def LogSettings(self, request: Any, context: Context) -> Any:
        return await self._not_served(context, "LogSettings")

    # ---- helpers --------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> InferResponse:
        return await self.plane.infer(converters.request_from_proto(request), deadline)


def _client_certified(context: Context) -> bool:
    return bool(context.auth_context().get("x509_pem_cert"))
