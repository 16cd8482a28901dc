"""inference.GRPCInferenceService (Open Inference Protocol, with Triton's extensions): thin.
Messages in (inference_grpc_converters), server.inference.protocol, messages out; errors become statuses here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from server.core.model_pipeline import ModelPipeline
from server.core.stream_window import STREAM_WINDOW
from server.errors import NotPermitted, NotReady, NotServed, SegservError
from server.grpc import inference_converters as converters
from server.grpc.calls import call_deadline, guarded, read_message, refuse_new_call
from server.grpc.interceptor import Context
from server.inference import protocol as inference
from server.inference.protocol import InferenceModels, note_response
from server.operations.access import ImageNote, note_image

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_NOT_SERVED = {
    "SystemSharedMemoryStatus": "segserve takes tensors in the request only; it has no shared memory",
    "SystemSharedMemoryRegister": "segserve takes tensors in the request only; it has no shared memory",
    "SystemSharedMemoryUnregister": "segserve takes tensors in the request only; it has no shared memory",
    "CudaSharedMemoryStatus": "segserve takes tensors in the request only; it has no CUDA shared memory",
    "CudaSharedMemoryRegister": "segserve takes tensors in the request only; it has no CUDA shared memory",
    "CudaSharedMemoryUnregister": "segserve takes tensors in the request only; it has no CUDA shared memory",
    "TraceSetting": "segserve has no request tracing; its per-call log line carries x-request-id",
    "LogSettings": "segserve's log level is set at start-up (SEGSERVE_LOG_LEVEL)",
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: InferenceModels) -> None:
        self.models = models

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.models.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return await guarded(context, self._model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="segserve", version=inference.server_version(), extensions=inference.EXTENSIONS
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return await guarded(context, self._checked(request.name, request.version, converters.metadata_to_proto))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        config = await guarded(context, self._checked(request.name, request.version, converters.config_to_proto))
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        if not request.name:  # every model
            reports = self.models.every_statistics_report()
            return pb.ModelStatisticsResponse(model_stats=[converters.statistics_to_proto(r) for r in reports])
        stats = await guarded(context, self._checked(request.name, request.version, self._statistics))
        return pb.ModelStatisticsResponse(model_stats=[stats])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        return converters.index_to_proto(self.models.index(request.ready), self.models.pipeline.draining)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await guarded(context, self._infer(request, call_deadline(context)))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request answered in order; up to a window of them in progress at once, so frames share batches.
        A failed request is answered with its error_message and the stream goes on."""
        deadline = call_deadline(context)
        pipeline = self.models.pipeline
        if pipeline.draining:  # refused whole, before any answer, so the client retries it elsewhere
            await guarded(context, refuse_new_call(pipeline))
        window = asyncio.Semaphore(min(STREAM_WINDOW, pipeline.settings.max_queue))
        # Bytes each request counts (then its response, until written), as in SegmentStream.
        held = pipeline.stream_bytes.stream()
        pending: asyncio.Queue[tuple[asyncio.Task[pb.ModelStreamInferResponse], list[int]] | None] = asyncio.Queue()

        async def one(
            request: pb.ModelInferRequest, size: list[int], refusal: SegservError | None
        ) -> pb.ModelStreamInferResponse:
            try:
                if refusal is not None:
                    raise refusal
                # A stream open when the drain began is an admitted call: it is served to its end.
                response = await self._infer(request, deadline, admitted_before_drain=True)
                answer = pb.ModelStreamInferResponse(infer_response=response)
            except SegservError as exc:
                note_image(ImageNote(request.id, code=exc.code.name))
                answer = pb.ModelStreamInferResponse(error_message=exc.message)
            except Exception:
                log.exception("unexpected error in stream request %r", request.id)
                note_image(ImageNote(request.id, code=grpc.StatusCode.INTERNAL.name))
                answer = pb.ModelStreamInferResponse(error_message="internal error; see the server log")
            answer_size = held.response_made(answer.ByteSize())
            held.add(answer_size)
            held.remove(size[0])
            size[0] = answer_size
            return answer

        async def read_all() -> None:
            try:
                while True:
                    await window.acquire()
                    await held.wait_for_room()
                    request = await read_message(context)
                    if request is None:
                        window.release()
                        break
                    refusal = held.refusal()
                    size = [0 if refusal else held.in_progress(request.ByteSize())]  # changed by one()
                    held.add(size[0])
                    await pending.put((asyncio.create_task(one(request, size, refusal)), size))
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read_all())
        tasks: list[asyncio.Task[Any]] = [reader]
        try:
            while (entry := await pending.get()) is not None:
                task, size = entry
                tasks.append(task)
                response = await task
                tasks.remove(task)
                yield response
                held.remove(size[0])
                size[0] = 0
                window.release()
            try:
                await reader
            except DecodeError as exc:  # bytes that are no ModelInferRequest: the caller's error, said once
                error = f"a stream request could not be parsed: {exc}"
            else:
                return
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        finally:
            for task in tasks:
                task.cancel()
            while not pending.empty():
                if (entry := pending.get_nowait()) is not None:
                    entry[0].cancel()
                    tasks.append(entry[0])
            try:
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                held.release()

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
        self._check_caller(context)
        inference.check_control_parameters(request.parameters, ())
        await self.models.control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def _unload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_caller(context)
        inference.check_control_parameters(request.parameters, inference.UNLOAD_PARAMETERS)
        await self.models.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _check_caller(self, context: Context) -> None:
        """Under TLS with client certificates, model control is for callers that presented one. gRPC's handshake
        already requires it of every caller then; this holds even if that ever changes."""
        self.models.control.check_enabled()
        if self.models.pipeline.settings.tls_client_ca and not context.auth_context().get("x509_pem_cert"):
            raise NotPermitted("loading and unloading models takes a client certificate")

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

    async def TraceSetting(self, request: Any, context: Context) -> Any:
        return await self._not_served(context, "TraceSetting")

    async def LogSettings(self, request: Any, context: Context) -> Any:
        return await self._not_served(context, "LogSettings")

    # ---- helpers --------------------------------------------------------------------------

    async def _model_ready(self, name: str, version: str) -> pb.ModelReadyResponse:
        try:
            model = self.models.known(name, version)
        except NotReady:  # known, and failed to load
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.models.model_ready(model))

    def _statistics(self, model: ModelPipeline) -> pb.ModelStatistics:
        return converters.statistics_to_proto(self.models.statistics_report(model))

    async def _checked(self, name: str, version: str, convert: Any) -> Any:
        return convert(self.models.known(name, version))

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None, admitted_before_drain: bool = False
    ) -> pb.ModelInferResponse:
        response = await self.models.infer(converters.request_from_proto(request), deadline, admitted_before_drain)
        note_response(request.id, response)
        return converters.response_to_proto(response)
