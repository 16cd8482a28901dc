"""What tracing costs a Segment call, measured roughly: `python -m tests.tracing.measure_overhead [ROUNDS] [CALLS]`.

Two `python -m server` children on the same settings, one without tracing (no OTEL_ variable: the API's no-op
path, as by default) and one exporting every span (OTEL_EXPORTER_OTLP_ENDPOINT, sampler always on) to an OTLP
receiver in this process; ROUNDS rounds of CALLS sequential Segment calls each, the two servers alternating
round by round so that the machine's load weighs on both alike. Prints each side's median and mean latency
seen by the client. A development measurement on a shared machine, not the benchmark (make bench).
"""

from __future__ import annotations

import statistics
import sys
import time

from client import SegmentClient
from tests.helpers.images import encode, photo_like
from tests.helpers.processes import start_server, wait_for_status
from tests.tracing.receiver import OtlpReceiver

ARGS = ("--weights", "random", "--runtime", "torch", "--no-warmup", "--max-size", "64", "--http-port", "-1")


def main(rounds: int = 10, calls: int = 20) -> None:
    image = encode(photo_like(96, 64), "PNG")
    with OtlpReceiver() as receiver:
        off, off_target = start_server(*ARGS)
        on, on_target = start_server(*ARGS, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
        try:
            for target in (off_target, on_target):
                wait_for_status(target, 1, timeout=180)
            seen: dict[str, list[float]] = {"off": [], "on": []}
            with SegmentClient(off_target) as off_client, SegmentClient(on_target) as on_client:
                for client in (off_client, on_client):
                    for _ in range(5):  # each channel connected and each server's first calls paid
                        client.segment(image)
                for round_ in range(rounds):
                    order = [("off", off_client), ("on", on_client)]
                    for name, client in order if round_ % 2 == 0 else order[::-1]:
                        for _ in range(calls):
                            started = time.perf_counter()
                            client.segment(image)
                            seen[name].append((time.perf_counter() - started) * 1000)
            time.sleep(1)
            for name, values in seen.items():
                print(
                    f"tracing {name:3}: {len(values)} calls, median {statistics.median(values):.2f} ms, "
                    f"mean {statistics.fmean(values):.2f} ms"
                )
            ratio = statistics.median(seen["on"]) / statistics.median(seen["off"])
            print(f"median on / off: {ratio:.3f}; spans received: {len(receiver.spans)}")
        finally:
            for process in (off, on):
                process.terminate()
                process.communicate(timeout=30)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
