"""The benchmark's arithmetic and outputs, on made-up samples (the real run is `make bench`, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from bench.loadgen import Sample, summarise
from bench.plot import plot
from bench.report import BEGIN, END, targets, update_performance_doc
from bench.run import _split_at


def sample(finished: float, latency_s: float, kind: str = "photo", batch: int = 1, error: str | None = None) -> Sample:
    return Sample(finished, latency_s, kind, error, batch, (1.0, 2.0, 3.0, 4.0))


def test_summary_counts_windows_after_the_warmup_and_the_mean_batch() -> None:
    start = 100.0
    samples = [sample(100.5, 9.0)]  # in the warm-up window: not counted
    samples += [sample(101.0 + k * 0.25, 0.1, batch=2) for k in range(4)]  # window 1: 4 images, two batches of 2
    samples += [sample(102.0 + k * 0.5, 0.3, kind="large") for k in range(2)]  # window 2: 2 images alone
    samples += [sample(102.9, 0.2, error="RESOURCE_EXHAUSTED")]
    summary = summarise(samples, start, warmup_s=1.0, duration_s=1.0, repeats=2)
    assert summary["throughput_windows"] == [4.0, 2.0]
    assert summary["throughput"] == 3.0
    assert summary["requests"] == 6 and summary["errors"] == 1
    assert summary["error_codes"] == {"RESOURCE_EXHAUSTED": 1}
    assert abs(summary["mean_batch_size"] - 6 / 4) < 1e-9  # 6 images in 4 batches
    assert summary["by_kind"]["photo"]["count"] == 4 and abs(summary["by_kind"]["large"]["p50_ms"] - 300) < 1e-6
    assert summary["server_parts_ms"] == {"preprocess": 1.0, "queue": 2.0, "inference": 3.0, "postprocess": 4.0}


def step(concurrency: int, throughput: float, photo_ms: float = 100, large_ms: float = 150) -> dict[str, object]:
    return {
        "concurrency": concurrency,
        "throughput": throughput,
        "p50_ms": photo_ms,
        "p95_ms": photo_ms,
        "p99_ms": photo_ms * 2,
        "errors": 0,
        "mean_batch_size": 1.0,
        "by_kind": {"photo": {"p50_ms": photo_ms}, "large": {"p50_ms": large_ms}},
        "server_parts_ms": {"preprocess": 1.0, "queue": 2.0, "inference": 3.0, "postprocess": 4.0},
    }


def result(served_at_8: float, off_at_2: float) -> dict[str, object]:
    return {
        "date": "2026-01-01",
        "machine": {
            "device": "cpu",
            "cpu": "Test CPU",
            "cores": 2,
            "torch": "2",
            "torch_threads": 2,
            "python": "3",
            "load_average_at_start": [0.1, 0.2, 0.3],
        },
        "run": {"concurrency": [1, 2, 8], "warmup_s": 1, "window_s": 1, "windows": 3, "wall_s": 60},
        "inprocess": [
            {"batch_size": 1, "throughput": 9.0, "by_kind": {"photo": {"p50_ms": 95.0}}},
            {"batch_size": 2, "throughput": 10.0, "by_kind": {}},
        ],
        "served": {"steps": [step(1, 9), step(2, 9.5), step(8, served_at_8)], "batch_sizes": [3, 1]},
        "batching_off": {"steps": [step(1, 8.5), step(2, off_at_2), step(8, 9)], "batch_sizes": [5]},
    }


def rendered(data: dict[str, object], tmp_path: Path) -> str:
    """The report section written from `data` into a fresh performance.md."""
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps(data))
    doc = tmp_path / "performance.md"
    update_performance_doc(json_path, doc)
    return doc.read_text()


def test_targets_compute_ratios_and_verdicts() -> None:
    rows = {row["bound"]: row for row in targets(result(served_at_8=9.5, off_at_2=9.0))}
    assert abs(rows[">= 0.9"]["ratio"] - 0.95) < 1e-9 and rows[">= 0.9"]["met"] is True
    assert rows[">= 1.0"]["met"] is True
    assert abs(rows["<= 1.15"]["ratio"] - 100 / 95) < 1e-9 and rows["<= 1.15"]["met"] is True
    assert rows["<= 2.0"]["ratio"] == 1.5

    failing = {row["bound"]: row for row in targets(result(served_at_8=9.5, off_at_2=10.0))}
    assert failing[">= 1.0"]["met"] is False and "(c=2)" in failing[">= 1.0"]["target"]
    assert rows[">= 0.9"]["met"] is True and rows[">= 1.4"]["ratio"] is None  # no torch sweep: not measured
    limit = next(r for r in targets(result(served_at_8=8.0, off_at_2=9.0)) if "in-process limit" in r["target"])
    assert limit["met"] is False


def with_runtimes(data: dict[str, object], torch_at_8: float, fastest: float) -> dict[str, object]:
    """A result of the runtime-comparing benchmark: the served (default) runtime, torch, openvino, int8."""

    def rows(throughput: float, photo_ms: float) -> list[dict[str, object]]:
        return [
            {"batch_size": 1, "throughput": throughput * 0.9, "by_kind": {"photo": {"p50_ms": photo_ms}}},
            {"batch_size": 4, "throughput": throughput, "by_kind": {}},
        ]

    return {
        **data,
        "served_torch": {"steps": [step(8, torch_at_8)], "batch_sizes": [1]},
        "runtimes": [
            {"runtime": "onnxruntime", "precision": "fp32", "default": True, "rows": data["inprocess"]},
            {"runtime": "torch", "precision": "fp32", "default": False, "rows": rows(6.0, 140.0)},
            {"runtime": "openvino", "precision": "fp32", "default": False, "rows": rows(fastest, 90.0)},
            {"runtime": "onnxruntime", "precision": "int8", "default": False, "rows": rows(50.0, 40.0)},
        ],
        "agreement": [
            {
                "runtime": "openvino",
                "precision": "fp32",
                "device": "cpu",
                "description": "ov",
                "agreement_with_torch_fp32": 0.9995,
            },
            {
                "runtime": "onnxruntime",
                "precision": "int8",
                "device": "cpu",
                "description": "i8",
                "agreement_with_torch_fp32": 0.97,
            },
        ],
    }


def test_runtime_targets_use_the_torch_sweep_and_the_fastest_fp32_limit(tmp_path: Path) -> None:
    data = with_runtimes(result(served_at_8=9.5, off_at_2=9.0), torch_at_8=6.0, fastest=12.0)
    rows = {row["bound"]: row for row in targets(data)}
    assert abs(rows[">= 1.4"]["ratio"] - 9.5 / 6.0) < 1e-9 and rows[">= 1.4"]["met"] is True
    # The limit is openvino's 12/s (the fastest fp32), not int8's 50/s nor the served runtime's 10/s.
    assert abs(rows[">= 0.9"]["ratio"] - 9.5 / 12.0) < 1e-9 and rows[">= 0.9"]["met"] is False
    assert "(openvino)" in rows[">= 0.9"]["target"]
    slow_default = with_runtimes(result(served_at_8=7.0, off_at_2=6.0), torch_at_8=6.0, fastest=8.0)
    assert next(r for r in targets(slow_default) if r["bound"] == ">= 1.4")["met"] is False

    text = rendered(data, tmp_path)
    assert "| openvino | fp32 | 12.00 | 4 | 90 | 99.95% |" in text
    assert "| onnxruntime | int8 | 50.00 | 4 | 40 | 97.00% |" in text
    assert "| torch | 8 | 6.00 |" in text  # the torch sweep's row in the served table
    assert "perf_analyzer" not in text  # a result without the protocol sweep: no empty table


def test_report_puts_perf_analyzers_steps_beside_loadgens(tmp_path: Path) -> None:
    data = result(served_at_8=9.5, off_at_2=9.0)
    oip = {"server_queue_ms": 3.0, "server_compute_ms": 80.0}
    data["served"]["oip_steps"] = [  # type: ignore[index]
        {"protocol": "grpc", "concurrency": 1, "throughput": 8.5, "p50_ms": 118.0, "p99_ms": 140.0, **oip},
        {"protocol": "http", "concurrency": 8, "throughput": 9.25, "p50_ms": 850.0, "p99_ms": 990.0, **oip},
    ]
    text = rendered(data, tmp_path)
    assert "| grpc | 1 | 8.50 | 118 | 140 | 3 / 80 | 9.00 | 0.94 |" in text  # loadgen's 9/s at concurrency 1
    assert "| http | 8 | 9.25 | 850 | 990 | 3 / 80 | 9.50 | 0.97 |" in text


def test_report_rewrites_only_its_section_and_the_plot_is_a_png(tmp_path: Path) -> None:
    data = result(served_at_8=9.5, off_at_2=9.0)
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps(data))
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nHand-written.\n\n{BEGIN}\nold table\n{END}\n\nMore prose.\n")
    update_performance_doc(json_path, doc)
    text = doc.read_text()
    assert "Hand-written." in text and "More prose." in text and "old table" not in text
    assert "| batching off | 2 | 9.00 |" in text and "Test CPU" in text
    plot(data, tmp_path / "run.png")
    with Image.open(tmp_path / "run.png") as image:
        assert image.format == "PNG" and image.size[0] > 500


def test_inprocess_runs_before_and_after_are_merged_by_median() -> None:
    from bench.run import merge_inprocess_runs

    before = [
        {
            "batch_size": 1,
            "throughput": 10.0,
            "throughput_windows": [9.0, 10.0, 11.0],
            "by_kind": {"photo": {"count": 3, "p50_ms": 80.0}},
        }
    ]
    after = [
        {
            "batch_size": 1,
            "throughput": 7.0,
            "throughput_windows": [6.0, 7.0, 8.0],
            "by_kind": {"photo": {"count": 2, "p50_ms": 100.0}},
        }
    ]
    (row,) = merge_inprocess_runs(before, after)
    assert row["throughput"] == 8.5 and row["throughput_windows"] == [9.0, 10.0, 11.0, 6.0, 7.0, 8.0]
    assert row["by_kind"]["photo"] == {"count": 5, "p50_ms": 90.0}
    assert merge_inprocess_runs(before, []) == before


def test_served_against_the_model_alone_is_held_to_0_90_and_the_cpu_account_is_shown(tmp_path: Path) -> None:
    data = result(served_at_8=9.5, off_at_2=9.0)
    data["model_alone"] = [
        {"batch_size": 1, "throughput": 10.0, "core_ms_per_image": 200.0},
        {"batch_size": 2, "throughput": 10.4, "core_ms_per_image": 190.0},
    ]
    per_image = {"inference": 180.0, "decode/encode": 14.0, "event loop": 3.0, "gRPC core": 0.5, "other": 0.1}
    data["served"]["thread_account"] = {"concurrency": 8, "images": 200, "core_ms_per_image": per_image}  # type: ignore[index]
    row = next(r for r in targets(data) if "model alone" in r["target"])
    assert row["bound"] == ">= 0.9" and abs(row["ratio"] - 9.5 / 10.4) < 1e-9 and row["met"] is True
    text = rendered(data, tmp_path)
    assert "| served | 180.0 | 14.0 | 3.0 | 0.5 | 0.1 | 197.6 |" in text
    assert "| model alone, batch 2 (every thread) | 190.0 | n/a | n/a | n/a | n/a | 190.0 |" in text
    assert "offer 210.5 core-ms per image" in text  # 2 cores at 9.5 images/s


def test_the_accounted_step_runs_alone() -> None:
    assert _split_at("1,2,4,8,16", 8) == ["1,2,4", "8", "16"]
    assert _split_at("8", 8) == ["8"]
    assert _split_at("1,8", 8) == ["1", "8"]
    assert _split_at("1,2", 8) == ["1,2"]
    assert _split_at("1,2,8", None) == ["1,2,8"]


def test_the_work_around_the_model_is_shown_per_stage_with_the_ratio_it_allows(tmp_path: Path) -> None:
    data = result(served_at_8=9.5, off_at_2=9.0)
    data["model_alone"] = [{"batch_size": 4, "throughput": 40.0, "core_ms_per_image": 45.0}]
    per_image = {"inference": 46.0, "decode/encode": 11.0, "event loop": 2.5, "gRPC core": 0.4, "other": 0.1}
    data["served"]["thread_account"] = {"concurrency": 8, "images": 200, "core_ms_per_image": per_image}  # type: ignore[index]
    photo = {"decode": 1.5, "resize": 2.0, "model input array": 0.1, "mask PNG and class shares": 1.4}
    large = {"decode": 37.0, "resize": 3.5, "model input array": 0.1, "mask PNG and class shares": 7.0}
    data["stages"] = {"by_kind": {"photo": photo, "12 MP": large}, "mix": photo, "mix_total": 5.0, "images": 8}
    text = rendered(data, tmp_path)
    assert "| work around the model, alone (one thread, per stage) | n/a | 5.0 | n/a | n/a | n/a | 5.0 |" in text
    assert "| Stage | photo | 12 MP | the bench's mix, per image |" in text
    assert "| decode | 1.50 | 37.00 | 1.50 |" in text and "| total | 5.00 | 47.60 | 5.00 |" in text
    assert "2 x 1000 / (45.0 + 5.0) / 40.00 = **1.00**" in text


def test_stage_costs_are_averaged_over_the_runs_and_kept_out_of_the_limit_rows() -> None:
    from bench.run import _is_full_path, merge_stage_costs

    def run(decode: float) -> dict[str, object]:
        costs = {"decode": decode, "resize": 1.0}
        return {"by_kind": {"photo": costs}, "mix": costs, "mix_total": decode + 1.0, "images": 4}

    merged = merge_stage_costs([run(2.0), run(4.0)])
    assert merged["by_kind"]["photo"] == {"decode": 3.0, "resize": 1.0} and merged["mix"]["decode"] == 3.0
    assert merged["mix_total"] == 4.0 and merged["runs"] == 2 and merge_stage_costs([]) == {}
    rows = [{"batch_size": 1}, {"batch_size": 1, "model_alone": True}, {"stages": run(1.0)}]
    assert [row for row in rows if _is_full_path(row)] == [{"batch_size": 1}]


def test_stage_costs_time_each_stage_on_the_runtimes_own_mask() -> None:
    import io

    import numpy as np

    from bench.inprocess import STAGES, stage_costs
    from server.labels import Label
    from server.runtimes.base import ModelFacts
    from server.settings import Settings

    class Stripes:
        """A runtime whose mask is known: class 1 on the left half, so the PNG and shares have work to do."""

        facts = ModelFacts(
            "stripes", "none", False, (Label(0, "background", (0, 0, 0)), Label(1, "thing", (255, 0, 0)))
        )
        precision = "fp32"
        description = "stripes"
        device_name = "cpu"
        shapes: list[tuple[int, ...]] = []

        def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
            self.shapes += [image.shape for image in images]
            masks = [np.zeros(image.shape[:2], dtype=np.uint8) for image in images]
            for mask in masks:
                mask[:, : mask.shape[1] // 2] = 1
            return masks

    def jpeg(size: tuple[int, int]) -> bytes:
        out = io.BytesIO()
        Image.radial_gradient("L").resize(size).convert("RGB").save(out, "JPEG")
        return out.getvalue()

    settings = Settings(weights="random")
    runtime = Stripes()
    costs = stage_costs(runtime, settings, [("photo", jpeg((640, 480))), ("large", jpeg((4000, 3000)))], repeats=2)[
        "stages"
    ]
    assert set(costs["by_kind"]) == {"photo", "large"} and costs["images"] == 2
    assert all(max(size) == settings.max_size for size in (shape[:2] for shape in runtime.shapes))
    large = costs["by_kind"]["large"]
    assert list(large) == list(STAGES) and all(large[stage] > 0 for stage in STAGES)
    assert large["decode"] > costs["by_kind"]["photo"]["decode"]
    assert abs(costs["mix_total"] - sum(costs["mix"].values())) < 1e-9


def precisions(bf16: tuple[float, float], int8: tuple[float, float], amx: bool) -> dict[str, object]:
    per_batch = {
        str(batch): {"fp32": b / 2, "bf16": b, "int8": i} for batch, b, i in zip((1, 8), bf16, int8, strict=True)
    }
    return {
        "max_size": 512,
        "rounds": 5,
        "images_per_s": per_batch,
        "int8_over_bf16": {k: v["int8"] / v["bf16"] for k, v in per_batch.items()},
        "int8_over_fp32": {k: v["int8"] / v["fp32"] for k, v in per_batch.items()},
        "start_s": {"fp32": 3.0, "bf16": 0.5, "int8": 8.0},
        "descriptions": {"int8": "openvino (CPU, int8, the rest in bf16, 2 threads)"},
        "native_int8": amx,
        "amx_int8": amx,
        "int8_pays": all(v["int8"] > v["bf16"] for v in per_batch.values()),
    }


def test_int8_over_bf16_is_a_target_where_the_cpu_has_amx_and_only_reported_elsewhere(tmp_path: Path) -> None:
    data = result(served_at_8=9.5, off_at_2=9.0)
    data["precisions"] = precisions(bf16=(20.0, 22.0), int8=(34.0, 32.0), amx=True)
    row = next(r for r in targets(data) if "int8" in r["target"])
    assert abs(row["ratio"] - 32.0 / 22.0) < 1e-9, "the worse batch size is the figure"
    assert row["bound"] == ">= 1.5" and row["met"] is False
    data["precisions"] = precisions(bf16=(20.0, 22.0), int8=(34.0, 36.0), amx=True)
    assert next(r for r in targets(data) if "int8" in r["target"])["met"] is True
    text = rendered(data, tmp_path)
    assert "| 8 | 11.00 | 22.00 | 36.00 | 1.64 | 3.27 |" in text
    assert "This CPU: AMX int8; int8 pays here" in text and "int8 8.0 s (NNCF's quantization" in text

    data["precisions"] = precisions(bf16=(20.0, 22.0), int8=(12.0, 13.0), amx=False)
    row = next(r for r in targets(data) if "int8" in r["target"])
    assert row["met"] is None and "no AMX int8" in row["target"]
    text = rendered(data, tmp_path)
    assert "no AMX int8: reported, not a target) | 0.59 | >= 1.5 | n/a |" in text
    assert "This CPU: no int8 units; int8 does not pay here" in text


def test_the_runtime_table_shows_autos_check_verdict_on_each_variant(tmp_path: Path) -> None:
    data = with_runtimes(result(served_at_8=9.5, off_at_2=9.0), torch_at_8=6.0, fastest=12.0)
    refused = "agrees with fp32 on 97.76% of pixels, under 99.5%"
    data["agreement"][1]["check"] = {  # type: ignore[index]
        "agreement": 0.9776,
        "least": "coffee, near-black 79.0%",
        "judged": True,
        "problem": refused,
    }
    text = rendered(data, tmp_path)
    assert f"| 97.00% | 97.76%, least coffee, near-black 79.0%; refused: {refused} |" in text


def with_tracing(data: dict[str, object], on_at_8: float, on_p50_at_1: float) -> dict[str, object]:
    """A result with the traced sweep (tracing on at concurrency 1 and 8) and the off path timed alone."""
    traced = {"steps": [step(1, 8.5, photo_ms=on_p50_at_1), step(8, on_at_8)], "spans": 600, "traced_calls": 100}
    off_path = {"client_us": 1.0, "server_us": 1.5, "number": 200_000, "repeat": 5}
    return {**data, "served_tracing": traced, "tracing_off_path": off_path}


def test_tracing_on_over_off_is_reported_and_the_off_path_a_share_of_the_p50(tmp_path: Path) -> None:
    plain = result(served_at_8=9.5, off_at_2=9.0)
    data = with_tracing(plain, on_at_8=9.0, on_p50_at_1=104.0)
    assert not any("tracing" in r["target"] for r in targets(data)), "a figure the issue asks for, not a bound"

    text = rendered(data, tmp_path)
    assert "| Images/s at concurrency 8 | 9.50 | 9.00 | 0.95 |" in text
    assert "| p50 ms at concurrency 1 | 100 | 104 | 1.04 |" in text
    assert "600 spans received for 100 calls (6.0 a call)" in text
    # 1.0 + 1.5 us beside the default sweep's p50 of 100 ms at concurrency 1.
    assert "Tracing off adds 2.5 us to a Segment call" in text and "**0.0025%**" in text

    assert "Tracing:" not in rendered(plain, tmp_path)  # no traced sweep: no section


def test_tracing_figures_not_measured_read_n_a(tmp_path: Path) -> None:
    from bench.tracing_cost import summary

    data = with_tracing(result(served_at_8=9.5, off_at_2=9.0), on_at_8=9.0, on_p50_at_1=104.0)
    data["served_tracing"]["steps"] = [step(8, 9.0)]  # type: ignore[index]
    del data["tracing_off_path"]
    found = summary(data)
    assert found is not None and found["p50_on_over_off_at_1"] is None and found["off_path_share_of_p50_at_1"] is None
    text = rendered(data, tmp_path)
    assert "| p50 ms at concurrency 1 | 100 | n/a | n/a |" in text and "Tracing off adds" not in text


def json_health(statuses: list[int]) -> dict[str, object]:
    return {
        "bodies": 4,
        "body_bytes": 7_930_000,
        "statuses": statuses,
        "bodies_s": 3.24,
        "interval_ms": 20.0,
        "checks": 120,
        "median_ms": 12.4,
        "max_ms": 310.2,
        "idle": {"checks": 48, "median_ms": 1.2, "max_ms": 2.6},
    }


def test_grpc_health_during_big_json_bodies_is_reported(tmp_path: Path) -> None:
    data = result(served_at_8=9.5, off_at_2=9.0)
    data["served"]["json_health"] = json_health([200] * 4)  # type: ignore[index]
    text = rendered(data, tmp_path)
    assert "4 ModelInfer bodies of 7.9 MB at once" in text and "answered 200 x4 within 3.2 s" in text
    assert "every 20 ms on a connected channel: 120 answers, median **12 ms**, worst **310 ms**" in text
    assert "(idle just before: median 1 ms, worst 3 ms)" in text

    data["served"]["json_health"] = json_health([413, 200, 200, 200])  # type: ignore[index]
    assert "answered 200 x3, 413 x1 within" in rendered(data, tmp_path)
    data["served"]["json_health"] = {}  # type: ignore[index]
    assert "big JSON bodies" not in rendered(data, tmp_path)
