"""Unit tests of each door's converters at their seam: the data plane's values in, each protocol's messages out,
and the same value said alike by both doors (the doors only serialise: nothing is computed twice)."""

from __future__ import annotations

import dataclasses
import json

from google.protobuf import json_format

from protos.segserve.v1 import segserve_pb2 as pb
from server.core.types import SegmentOptions
from server.dataplane import IndexEntry, ModelInfo, ModelState, StatisticDuration, StatisticsReport
from server.grpc import inference_converters as grpc_converters
from server.grpc import segmenter_converters
from server.inference.protocol import ModelDescription
from server.labels import make_labels
from server.rest import converters as rest_converters

LABELS = make_labels(("background", "cat", "dog"))
MODEL = ModelDescription("m", LABELS, max_batch_size=64, preferred_batch_size=8, max_queue_delay_us=5000)


def test_metadata_is_the_same_over_both_doors() -> None:
    over_grpc = json_format.MessageToDict(grpc_converters.metadata_to_proto(MODEL))
    over_http = rest_converters.metadata_to_http(MODEL)
    assert over_grpc["name"] == over_http["name"] == "m"
    assert json.loads(over_grpc["parameters"]["labels"]["stringParam"]) == over_http["parameters"]["labels"]
    assert [label["name"] for label in over_http["parameters"]["labels"]] == ["background", "cat", "dog"]
    for side in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in over_grpc[side]] == [
            (t["name"], t["datatype"], t["shape"]) for t in over_http[side]
        ]


def test_config_is_the_same_over_both_doors() -> None:
    over_grpc = json_format.MessageToDict(grpc_converters.config_to_proto(MODEL), preserving_proto_field_name=True)
    over_http = rest_converters.config_to_http(MODEL)
    assert over_grpc["max_batch_size"] == over_http["max_batch_size"] == 64
    batching = over_grpc["dynamic_batching"]
    assert batching["preferred_batch_size"] == over_http["dynamic_batching"]["preferred_batch_size"] == [8]
    assert int(batching["max_queue_delay_microseconds"]) == 5000
    assert over_grpc["parameters"]["labels"] == over_http["parameters"]["labels"]


def test_the_index_is_the_same_over_both_doors() -> None:
    entries = [
        IndexEntry("a", "1", ModelState.READY, ""),
        IndexEntry("b", "1", ModelState.UNAVAILABLE, "shutting down"),
    ]
    over_grpc = [json_format.MessageToDict(m) for m in grpc_converters.index_to_proto(entries).models]
    assert over_grpc == rest_converters.index_to_http(entries)  # no reason where there is none, on both


def test_an_upload_chunk_carries_options_only_where_they_were_sent() -> None:
    first = segmenter_converters.chunk_from_proto(
        pb.ImageChunk(id="x", data=b"12", options=pb.SegmentOptions(max_size=100, model="m"))
    )
    later = segmenter_converters.chunk_from_proto(pb.ImageChunk(data=b"34"))
    assert (first.request_id, first.data, first.options) == ("x", b"12", SegmentOptions(max_size=100, model="m"))
    assert (later.request_id, later.data, later.options) == ("", b"34", None)


def test_model_info_keeps_every_field() -> None:
    info = ModelInfo(
        model="deeplabv3_mobilenet_v3_large",
        name="m",
        is_default=True,
        weights="random",
        device="cpu",
        runtime="torch fp32",
        max_size=512,
        max_batch_size=8,
        max_batch_delay_ms=5.0,
        max_queue=64,
        batch_sizes=(3, 1),
        labels=LABELS,
        weights_are_trained=True,
        resident_bytes=123,
    )
    message = segmenter_converters.model_info_to_proto(info)
    for field in dataclasses.fields(ModelInfo):
        sent = getattr(message, field.name)
        if field.name == "labels":
            sent = tuple((label.index, label.name, label.color) for label in sent)
            assert sent == tuple((label.index, label.name, label.hex_color) for label in LABELS)
        else:
            assert (tuple(sent) if field.name == "batch_sizes" else sent) == getattr(info, field.name), field.name


def test_statistics_are_the_same_over_both_doors_and_every_figure_lands_in_its_field() -> None:
    """Each duration distinct, so a figure sent in another's field (compute_input for compute_output, the
    model's batch time for the request's) shows."""
    durations = {stage: StatisticDuration(k + 1, (k + 1) * 1000 + 7) for k, stage in enumerate(StatisticsReport.STAGES)}
    report = StatisticsReport(
        name="m",
        version="1",
        last_inference_ms=1_733_400_000_123,
        inference_count=12,
        execution_count=5,
        batches=((1, StatisticDuration(3, 30_000)), (4, StatisticDuration(2, 50_000))),
        **durations,
    )
    over_http = rest_converters.statistics_to_json(report)
    over_grpc = json_format.MessageToDict(grpc_converters.statistics_to_proto(report), preserving_proto_field_name=True)
    assert over_http == {
        "name": "m",
        "version": "1",
        "last_inference": 1_733_400_000_123,
        "inference_count": 12,
        "execution_count": 5,
        "inference_stats": {stage: {"count": d.count, "ns": d.ns} for stage, d in durations.items()},
        "batch_stats": [
            {"batch_size": 1, "compute_infer": {"count": 3, "ns": 30_000}},
            {"batch_size": 4, "compute_infer": {"count": 2, "ns": 50_000}},
        ],
    }
    assert over_grpc == json.loads(json.dumps(over_http), parse_int=str), "protobuf's JSON gives uint64 as text"
