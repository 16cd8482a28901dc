"""SIGTERM under load, against the real process: in-flight calls finish, new ones get UNAVAILABLE, exit 0."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from client.channel import SERVICE_CONFIG, channel_options
from protos.inference import grpc_predict_v2_pb2 as ipb
from protos.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.operations import drain
from tests.helpers.images import encode, photo_like
from tests.helpers.processes import free_port, start_server, wait_for_status
from tests.helpers.servers import ServerThread, make_settings

GRACE_S = 30.0
IN_FLIGHT = 6


def metric(metrics_port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def in_progress(metrics_port: int) -> float:
    return metric(metrics_port, "segserve_requests_in_progress", method="Segment")


@pytest.mark.slow
def test_sigterm_under_load_drains_in_flight_refuses_new_and_exits_zero() -> None:
    metrics_port = free_port()
    process, target = start_server(
        "--weights", "random", "--no-warmup", "--max-batch-size", "1", "--metrics-port", str(metrics_port),
        env={"SEGSERVE_GRACE_PERIOD_S": str(GRACE_S)},
    )  # fmt: skip
    try:
        wait_for_status(target, health_pb2.HealthCheckResponse.SERVING, timeout=120)
        # One at a time through the model at the default size, with overlays: each takes a good while on a CPU.
        image = encode(photo_like(1024, 768), "JPEG")
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SegmenterStub(channel)
            in_flight = [
                stub.Segment.future(
                    pb.SegmentRequest(id=str(i), image=image, options=pb.SegmentOptions(overlay=True)), timeout=120
                )
                for i in range(IN_FLIGHT)
            ]
            deadline = time.monotonic() + 60
            while in_progress(metrics_port) < IN_FLIGHT:
                assert time.monotonic() < deadline, "requests never all arrived"
                time.sleep(0.005)
            assert sum(f.done() for f in in_flight) < IN_FLIGHT, (
                "everything finished before SIGTERM; test proves nothing"
            )
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)

            # A call that reaches the server before it handles the signal is in flight like the others;
            # from the moment health stops saying SERVING, every new call must be refused.
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                except grpc.RpcError:
                    break
                if status != health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.001)
            # New calls, on the open connection and on new ones, are refused with UNAVAILABLE until the process is gone.
            refusals: list[grpc.StatusCode] = []
            while process.poll() is None and time.monotonic() - signalled < GRACE_S:
                for stub_for_new in (stub, pb_grpc.SegmenterStub(grpc.insecure_channel(target))):
                    try:
                        stub_for_new.Segment(pb.SegmentRequest(id="new", image=image), timeout=5)
                        refusals.append(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        refusals.append(exc.code())
                time.sleep(0.05)

            results = [f.result(timeout=GRACE_S) for f in in_flight]
        output, _ = process.communicate(timeout=GRACE_S)
        exited_after = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    assert sorted(r.id for r in results) == [str(i) for i in range(IN_FLIGHT)]
    assert all(r.width == 1024 and r.overlay_png for r in results)
    assert refusals, "no call was tried during the drain"
    assert set(refusals) == {grpc.StatusCode.UNAVAILABLE}, refusals
    assert process.returncode == 0, output
    assert exited_after < GRACE_S, f"took {exited_after:.1f}s"
    assert "Traceback" not in output and "shutting down" in output
    print(f"drain: {len(refusals)} new calls refused; exit {exited_after:.2f}s after SIGTERM")


def frames_then(before: list[bytes], signalled: threading.Event, after: list[bytes]) -> Iterator[pb.SegmentRequest]:
    """A stream's requests: some before the signal, the rest once the server has stopped saying SERVING."""
    for i, image in enumerate(before):
        yield pb.SegmentRequest(id=f"before-{i}", image=image)
    signalled.wait(60)
    for i, image in enumerate(after):
        yield pb.SegmentRequest(id=f"after-{i}", image=image)


def infer_requests_then(
    before: list[bytes], signalled: threading.Event, after: list[bytes]
) -> Iterator[ipb.ModelInferRequest]:
    """ModelStreamInfer's counterpart of frames_then."""
    for name, images in (("before", before), ("after", after)):
        if name == "after":
            signalled.wait(60)
        for i, image in enumerate(images):
            tensor = ipb.ModelInferRequest.InferInputTensor(
                name="IMAGE", datatype="BYTES", shape=[1], contents=ipb.InferTensorContents(bytes_contents=[image])
            )
            yield ipb.ModelInferRequest(id=f"{name}-{i}", model_name="deeplabv3_mobilenet_v3_large", inputs=[tensor])


def chunks_then(image: bytes, signalled: threading.Event) -> Iterator[pb.ImageChunk]:
    """An upload's chunks: the first half before the signal, the rest once the drain has begun."""
    half = len(image) // 2
    yield pb.ImageChunk(id="upload", data=image[: half // 2])
    yield pb.ImageChunk(data=image[half // 2 : half])
    signalled.wait(60)
    yield pb.ImageChunk(data=image[half:])


def drain_begun(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "the server never left SERVING"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stream", "upload", "model-stream-infer"])
def test_sigterm_in_the_middle_of_a_stream_or_an_upload_lets_it_finish(kind: str) -> None:
    """A call that began before SIGTERM is admitted: a stream's later frames and an upload's later chunks
    are served too, while a call begun after it is refused with UNAVAILABLE."""
    metrics_port = free_port()
    process, target = start_server(
        "--weights", "random", "--no-warmup", "--max-size", "64", "--metrics-port", str(metrics_port),
        env={"SEGSERVE_GRACE_PERIOD_S": str(GRACE_S)},
    )  # fmt: skip
    image = encode(photo_like(320, 240), "JPEG")
    signalled = threading.Event()
    try:
        wait_for_status(target, health_pb2.HealthCheckResponse.SERVING, timeout=120)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SegmenterStub(channel)
            if kind == "stream":
                call = stub.SegmentStream(frames_then([image] * 3, signalled, [image] * 3), timeout=60)
                first = next(call)  # the stream is under way: admitted
            elif kind == "model-stream-infer":
                inference = ipb_grpc.GRPCInferenceServiceStub(channel)
                infer_call = inference.ModelStreamInfer(
                    infer_requests_then([image] * 3, signalled, [image] * 3), timeout=60
                )
                first_infer = next(infer_call)
            else:
                upload = stub.SegmentUpload.future(chunks_then(image, signalled), timeout=60)
                deadline = time.monotonic() + 30
                while metric(metrics_port, "segserve_upload_bytes_in_flight") == 0:  # admitted, part read
                    assert time.monotonic() < deadline, "the upload never started"
                    time.sleep(0.01)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            drain_begun(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Segment(pb.SegmentRequest(id="new", image=image), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            signalled.set()
            if kind == "stream":
                answers = [first, *call]
                expected = [f"before-{i}" for i in range(3)] + [f"after-{i}" for i in range(3)]
                assert sorted(a.id for a in answers) == sorted(expected)  # a stream answers as images are done
                assert all(not a.HasField("error") and a.width == 320 for a in answers), answers
            elif kind == "model-stream-infer":
                replies = [first_infer, *infer_call]
                assert [r.error_message for r in replies] == [""] * 6, [r.error_message for r in replies]
                expected = [f"before-{i}" for i in range(3)] + [f"after-{i}" for i in range(3)]
                assert [r.infer_response.id for r in replies] == expected  # answered in order
            else:
                result = upload.result(timeout=30)
                assert result.id == "upload" and result.width == 320 and result.mask_png
        output, _ = process.communicate(timeout=GRACE_S)
        exited_after = time.monotonic() - started
    finally:
        signalled.set()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert exited_after < GRACE_S / 2, f"took {exited_after:.1f}s"
    assert "Traceback" not in output and "drained in" in output, output


def test_calls_that_wait_for_a_busy_event_loop_are_refused_not_cancelled() -> None:
    """The cause of the CANCELLED seen in the scaling test: calls that had reached gRPC while the server's
    event loop was busy, not yet handed to a handler, were cancelled by gRPC's stop. They must instead be
    answered, with UNAVAILABLE (retried elsewhere by clients), since stop now waits for callers to stop."""
    server = ServerThread(make_settings())
    image = encode(photo_like(64, 48))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SegmenterStub(channel)
        stub.Segment(pb.SegmentRequest(image=image), timeout=30)  # connected and warm

        async def busy_then_stop() -> None:
            time.sleep(0.5)  # blocks the loop, as a busy moment does, while the calls below arrive
            await server.app.stop(10)

        stopping = asyncio.run_coroutine_threadsafe(busy_then_stop(), server.loop)
        time.sleep(0.1)
        calls = [stub.Segment.future(pb.SegmentRequest(id=str(i), image=image), timeout=30) for i in range(5)]
        codes = [call.code() for call in calls]
        stopping.result(30)
    server.loop.call_soon_threadsafe(server.loop.stop)
    server.thread.join(10)
    assert grpc.StatusCode.CANCELLED not in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert grpc.StatusCode.UNAVAILABLE in codes, f"no call arrived during the drain: {codes}"


STUBBORN_CALLERS = 48
DRAINS = 10


def stubborn_channel_options(retryable: list[str]) -> list[tuple[str, object]]:
    """The client's own channel settings, less its health watch: a caller that keeps calling a draining
    replica, as one that does not watch health does, retrying on `retryable`."""
    config = copy.deepcopy(SERVICE_CONFIG)
    del config["healthCheckConfig"]
    for method in config["methodConfig"]:
        method["retryPolicy"]["retryableStatusCodes"] = retryable
    options = [option for option in channel_options() if option[0] != "grpc.service_config"]
    return [*options, ("grpc.service_config", json.dumps(config))]


def call_until(done: threading.Event, target: str, options: list[tuple[str, object]], failed: Counter[str]) -> int:
    """Segment calls one after another until `done`; the failures' codes go to `failed`. Returns the answered."""
    image = encode(photo_like(64, 48))
    answered = 0
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.SegmenterStub(channel)
        while not done.is_set():
            try:
                stub.Segment(pb.SegmentRequest(image=image), timeout=20)
                answered += 1
            except grpc.RpcError as exc:
                failed[exc.code().name] += 1
    return answered


def failures_over_drains(steady: ServerThread, options: list[tuple[str, object]], drains: int) -> Counter[str]:
    """Stops a fresh server `drains` times while the stubborn callers keep calling it and `steady`; the codes
    of the calls that failed (after the channel's retries). Stops early once a drain has lost a call."""
    failed: Counter[str] = Counter()
    for _ in range(drains):
        draining = ServerThread(make_settings())
        done = threading.Event()
        with ThreadPoolExecutor(STUBBORN_CALLERS) as pool:
            target = f"ipv4:{draining.target},{steady.target}"
            callers = [pool.submit(call_until, done, target, options, failed) for _ in range(STUBBORN_CALLERS)]
            time.sleep(0.5)
            draining.stop(10)
            time.sleep(0.3)  # calls go on to the steady server after the stop
            done.set()
            answered = sum(caller.result(30) for caller in callers)
        assert answered > STUBBORN_CALLERS, "the callers hardly called: the drain proves nothing"
        if failed:
            break
    return failed


def test_repeated_drains_under_heavy_load_lose_no_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers that ignore health and keep calling a replica that stops (the cause of the CANCELLED once
    seen in the SIGTERM test): gRPC's stop answers CANCELLED for the calls it had taken in but not handed
    over (grpc/grpc#41785), so the client's policy retries CANCELLED too, and over many drains under heavy
    load no call is lost. The same drains with a policy that retries only UNAVAILABLE show the window is
    really reached."""
    # The lull a drain allows callers that keep coming; shortened so that each of the many drains reaches
    # the stop while they still call, as the 2 s lull does after 2 s.
    monkeypatch.setattr(drain, "MAX_LULL_WAIT_S", 0.05)
    steady = ServerThread(make_settings())
    try:
        unavailable_only = failures_over_drains(steady, stubborn_channel_options(["UNAVAILABLE"]), DRAINS)
        assert unavailable_only.get("CANCELLED"), f"no drain reached the window: {unavailable_only}"
        retryable = SERVICE_CONFIG["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"]  # type: ignore[index]
        lost = failures_over_drains(steady, stubborn_channel_options(list(retryable)), DRAINS)
    finally:
        steady.stop()
    assert not lost, f"calls lost over {DRAINS} drains with the client's policy: {dict(lost)}"
    print(
        f"retrying UNAVAILABLE only: {dict(unavailable_only)}; with the client's policy: none lost in {DRAINS} drains"
    )
