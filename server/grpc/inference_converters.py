"""Open Inference Protocol protobuf messages <-> server.inference.protocol's domain. The only module that knows both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from protos.inference import grpc_predict_v2_pb2 as pb
from server.dataplane import IndexEntry, StatisticDuration, StatisticsReport
from server.errors import InvalidTensor, SegservError
from server.inference import protocol as inference
from server.inference import tensors
from server.inference.protocol import InferRequest, InferResponse, ModelDescription, ParameterValue, TensorSpec
from server.inference.tensors import Contents, InputTensor

# Which typed-contents list carries each datatype (FP16 and BF16 travel only raw).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_CONFIG_TYPES = {name: getattr(pb, f"TYPE_{'STRING' if name == 'BYTES' else name}") for name in tensors.DATATYPES}


def parameters_from_proto(parameters: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    values: dict[str, ParameterValue] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def request_from_proto(message: pb.ModelInferRequest) -> InferRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidTensor(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; one per input, in order"
        )
    inputs = [_input_from_proto(tensor, raw[i] if raw else None) for i, tensor in enumerate(message.inputs)]
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=[output.name for output in message.outputs],
        parameters=parameters_from_proto(message.parameters),
    )


def _input_from_proto(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InputTensor:
    """One input, its contents left undecoded: the data plane checks its shape against the server's limits
    before any element is built (protocol.images_of)."""
    name, datatype = tensor.name, tensor.datatype
    shape = tensors.check_shape(name, tensor.shape)
    tensors.check_datatype(name, datatype)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidTensor(f"{name}: send contents or raw_input_contents, not both")
        return InputTensor(name, datatype, shape, Contents(raw=raw))
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidTensor(f"{name}: {datatype} travels only in raw_input_contents")
    values: Sequence[object] = getattr(tensor.contents, field)
    return InputTensor(name, datatype, shape, Contents(values=values))


def response_to_proto(response: InferResponse) -> pb.ModelInferResponse:
    """Outputs as raw_output_contents, as Triton answers and its clients read."""
    return pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in response.outputs
        ],
        raw_output_contents=[tensors.to_raw(t.data) for t in response.outputs],
    )


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def metadata_to_proto(model: ModelDescription) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[inference.MODEL_VERSION],
        platform=inference.PLATFORM,
        inputs=[_tensor_metadata(spec) for spec in inference.INPUT_SPECS],
        outputs=[_tensor_metadata(spec) for spec in inference.OUTPUT_SPECS],
        parameters={
            "labels": pb.InferParameter(string_param=inference.labels_json(model.labels)),
            "extra_outputs": pb.InferParameter(string_param=inference.extra_outputs_json()),
        },
    )


def config_to_proto(model: ModelDescription) -> pb.ModelConfig:
    """Triton's model configuration: shapes without the batch dimension (max_batch_size > 0)."""
    return pb.ModelConfig(
        name=model.name,
        platform=inference.PLATFORM,
        backend=inference.PLATFORM,
        max_batch_size=model.max_batch_size,
        parameters={
            "labels": pb.ModelParameter(string_value=inference.labels_json(model.labels)),
            "extra_outputs": pb.ModelParameter(string_value=inference.extra_outputs_json()),
        },
        input=[
            pb.ModelInput(
                name=spec.name,
                data_type=_CONFIG_TYPES[spec.datatype],
                format=pb.ModelInput.FORMAT_NHWC if spec.name == inference.PIXELS else pb.ModelInput.FORMAT_NONE,
                dims=spec.shape[1:],
                optional=spec.optional,
            )
            for spec in inference.INPUT_SPECS
        ],
        output=[
            pb.ModelOutput(name=spec.name, data_type=_CONFIG_TYPES[spec.datatype], dims=spec.shape[1:] or (1,))
            for spec in inference.OUTPUT_SPECS
        ],
        dynamic_batching=pb.ModelDynamicBatching(
            preferred_batch_size=[model.preferred_batch_size],
            max_queue_delay_microseconds=model.max_queue_delay_us,
        ),
    )


def statistics_to_proto(report: StatisticsReport) -> pb.ModelStatistics:
    def duration(d: StatisticDuration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=report.name,
        version=report.version,
        last_inference=report.last_inference_ms,
        inference_count=report.inference_count,
        execution_count=report.execution_count,
        inference_stats=pb.InferStatistics(**{stage: duration(getattr(report, stage)) for stage in report.STAGES}),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=duration(d)) for size, d in report.batches],
    )


def index_to_proto(entries: list[IndexEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in entries
        ]
    )


class InferStreamCodec:
    """ModelStreamInfer's messages for the data plane's stream engine: a request's error is its answer's
    error_message, and the stream goes on."""

    @staticmethod
    def size(message: pb.ModelInferRequest) -> int:
        return message.ByteSize()

    @staticmethod
    def request_id(message: pb.ModelInferRequest) -> str:
        return message.id

    @staticmethod
    def parse(message: pb.ModelInferRequest) -> InferRequest:
        return request_from_proto(message)

    @staticmethod
    def answer(request_id: str, response: InferResponse) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(infer_response=response_to_proto(response))

    @staticmethod
    def error(request_id: str, error: SegservError) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(error_message=error.message)

    @staticmethod
    def answer_size(answer: pb.ModelStreamInferResponse) -> int:
        return answer.ByteSize()


INFER_STREAM = InferStreamCodec()
