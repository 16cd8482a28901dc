"""auto's choice of runtime and precision: the candidates, the fastest winning, a lower precision refused
when it disagrees with fp32, the verdict cached and measured again when what it depends on changes; and the
lower precisions' agreement with fp32 on the known-answer model."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from server.errors import ModelLoadError
from server.runtimes import cpu_features, factory, selection
from server.runtimes.base import ModelFacts, Runtime
from server.runtimes.calibration import check_images
from server.runtimes.factory import create_runtime
from server.runtimes.selection import Candidate
from server.runtimes.weights import load_model, weights_fingerprint, without_aux_head
from tests.helpers.known_model import random_shapes, render_scene
from tests.helpers.servers import KNOWN_MAX_SIZE, known_settings, make_settings

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
FACTS = ModelFacts("m", "random", False, ())


def everything_installed(name: str) -> bool:
    return True


def names(found: list[Candidate]) -> list[str]:
    return [str(c) for c in found]


# ---- the candidates ----------------------------------------------------------------------------------------


def test_on_a_cpu_without_native_bf16_auto_compares_every_installed_runtime_at_fp32() -> None:
    found = selection.candidates("auto", "auto", CPU, installed=everything_installed, native_bf16=False)
    assert names(found) == ["onnxruntime fp32", "openvino fp32", "torch fp32"]
    missing = selection.candidates("auto", "auto", CPU, installed=lambda n: n != "openvino", native_bf16=False)
    assert names(missing) == ["onnxruntime fp32", "torch fp32"]


def test_native_bf16_adds_openvino_bf16_and_int8_units_add_openvino_int8_only() -> None:
    found = selection.candidates("auto", "auto", CPU, installed=everything_installed, native_bf16=True)
    assert names(found) == ["onnxruntime fp32", "openvino fp32", "openvino bf16", "torch fp32"]
    named = selection.candidates("openvino", "auto", CPU, installed=everything_installed, native_bf16=True)
    assert names(named) == ["openvino fp32", "openvino bf16"]
    amx = selection.candidates("auto", "auto", CPU, installed=everything_installed, native_bf16=True, native_int8=True)
    assert names(amx) == ["onnxruntime fp32", "openvino fp32", "openvino bf16", "openvino int8", "torch fp32"]
    int8 = selection.candidates("auto", "int8", CPU, installed=everything_installed, native_bf16=True)
    assert names(int8) == ["onnxruntime int8", "openvino int8"], "int8 asked for: every runtime that offers it"
    pinned = selection.candidates("auto", "fp32", CPU, installed=everything_installed, native_bf16=True)
    assert names(pinned) == ["onnxruntime fp32", "openvino fp32", "torch fp32"]
    cuda = selection.auto_precisions(CUDA, native_bf16=True, native_int8=True)
    assert "int8" not in cuda


def test_cuda_keeps_torch_and_compares_its_precisions() -> None:
    found = selection.candidates("auto", "auto", CUDA, installed=everything_installed, native_bf16=True)
    assert names(found) == ["torch fp32", "torch fp16", "torch bf16"]
    old_gpu = selection.candidates("auto", "auto", CUDA, installed=everything_installed, native_bf16=False)
    assert names(old_gpu) == ["torch fp32", "torch fp16"]


def test_a_precision_no_runtime_offers_here_is_a_one_line_error() -> None:
    with pytest.raises(ModelLoadError, match="precision fp16 is not offered by any runtime on cpu") as info:
        selection.candidates("auto", "fp16", CPU, installed=everything_installed, native_bf16=True)
    assert "\n" not in str(info.value)


# ---- the choice, with injected runtimes and timings ---------------------------------------------------------


class Painted:
    """A runtime whose labels are a fixed pattern, optionally with a share of pixels changed: of every image,
    or of the one image `only` (compared by its pixels)."""

    def __init__(self, precision: str, wrong_share: float = 0.0, only: np.ndarray | None = None) -> None:
        self.precision = precision
        self.wrong_share = wrong_share
        self.only = only
        self.facts = FACTS
        self.description = f"painted {precision}"
        self.device_name = "cpu"

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for image in images:
            labels = (image[..., 0] > 127).astype(np.uint8)
            if self.only is None or np.array_equal(image, self.only):
                wrong = int(labels.size * self.wrong_share)
                labels.reshape(-1)[:wrong] += 1
            out.append(labels)
        return out


def choose(
    found: list[Candidate],
    runtimes: dict[Candidate, Runtime],
    ms: dict[Candidate, float],
    root: Path,
    key: dict[str, str] | None = None,
) -> tuple[Runtime, selection.Choice, list[Candidate]]:
    built: list[Candidate] = []
    by_runtime = {id(r): c for c, r in runtimes.items()}

    def build(candidate: Candidate) -> Runtime:
        built.append(candidate)
        return runtimes[candidate]

    runtime, choice = selection.choose(
        found,
        build,
        max_size=256,  # masks large enough for a share of a thousandth to be whole pixels
        cache_root=root,
        key=key or {"model": "m", "what": "test"},
        time_once=lambda runtime, image: ms[by_runtime[id(runtime)]] / 1000,
    )
    return runtime, choice, built


ORT, OV, OV_BF16, TORCH = (
    Candidate(*c.split()) for c in ("onnxruntime fp32", "openvino fp32", "openvino bf16", "torch fp32")
)


def test_the_fastest_candidate_serves_and_the_log_shows_the_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtimes: dict[Candidate, Runtime] = {c: Painted(c.precision) for c in (ORT, OV, TORCH)}
    with caplog.at_level(logging.INFO, logger="server.runtimes.selection"):
        runtime, choice, _ = choose([ORT, OV, TORCH], runtimes, {ORT: 30.0, OV: 20.0, TORCH: 50.0}, tmp_path)
    assert runtime is runtimes[OV] and choice.chosen == OV and choice.measured and not choice.cached
    assert {t.candidate: t.ms_per_image for t in choice.trials} == pytest.approx({ORT: 30.0, OV: 20.0, TORCH: 50.0})
    rows = caplog.text[caplog.text.index("auto: measured") :].splitlines()[1:]
    assert [row.split()[:3] for row in rows if "<- serving" in row] == [["openvino", "fp32", "20.0"]]
    runtime, choice, _ = choose([ORT, OV, TORCH], {c: Painted(c.precision) for c in (ORT, OV, TORCH)},
                                {ORT: 10.0, OV: 20.0, TORCH: 10.0}, tmp_path / "other")  # fmt: skip
    assert choice.chosen == ORT, "a tie goes to the earlier candidate"


def test_a_lower_precision_that_disagrees_with_fp32_is_not_served_however_fast(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtimes: dict[Candidate, Runtime] = {OV: Painted("fp32"), OV_BF16: Painted("bf16", wrong_share=0.01)}
    with caplog.at_level(logging.INFO, logger="server.runtimes.selection"):
        _, choice, _ = choose([OV, OV_BF16], runtimes, {OV: 40.0, OV_BF16: 20.0}, tmp_path)
    assert choice.chosen == OV
    refused = next(t for t in choice.trials if t.candidate == OV_BF16)
    assert refused.agreement == pytest.approx(0.99, abs=2e-3)
    figure = f"{refused.agreement:.2%}"
    assert refused.problem == f"agrees with fp32 on {figure} of pixels, under 99.5%"
    assert f"not served: agrees with fp32 on {figure}" in caplog.text, "the log says why bf16 was not served"


def test_a_lower_precision_that_agrees_serves_when_faster_and_says_its_agreement(tmp_path: Path) -> None:
    runtimes: dict[Candidate, Runtime] = {OV: Painted("fp32"), OV_BF16: Painted("bf16", wrong_share=0.001)}
    _, choice, _ = choose([OV, OV_BF16], runtimes, {OV: 40.0, OV_BF16: 20.0}, tmp_path)
    assert choice.chosen == OV_BF16
    served = choice.trial
    assert served is not None and served.agreement == pytest.approx(0.999, abs=2e-4)
    assert f"{served.agreement:.2%} pixel agreement with fp32" in choice.summary()


def test_a_lower_precision_that_spoils_one_image_is_refused_and_the_log_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tenth of one check image wrong keeps the pooled agreement above 99.5% (over 28 images), so only the
    per-image rule can refuse it (a dark photo painted background is that case, wholesale)."""
    dark = dict(check_images(256))["coffee, near-black"]
    runtimes: dict[Candidate, Runtime] = {OV: Painted("fp32"), OV_BF16: Painted("bf16", wrong_share=0.1, only=dark)}
    with caplog.at_level(logging.INFO, logger="server.runtimes.selection"):
        _, choice, _ = choose([OV, OV_BF16], runtimes, {OV: 40.0, OV_BF16: 20.0}, tmp_path)
    assert choice.chosen == OV
    refused = next(t for t in choice.trials if t.candidate == OV_BF16)
    assert refused.agreement is not None and refused.agreement >= selection.MIN_AGREEMENT
    assert refused.problem is not None and "flips the mask of check image 'coffee, near-black'" in refused.problem
    assert "check image 'coffee, near-black' (agrees with fp32 on 90.0%" in caplog.text


def test_where_fp32_paints_one_class_the_check_says_it_cannot_judge_and_int8_is_not_tried(tmp_path: Path) -> None:
    """Random weights: every precision 'agrees' 100%, which means nothing. bf16 may still serve (it rounds the
    same computation), but ModelInfo must not claim an agreement; int8 is not even built."""
    settings = make_settings(runtime="openvino", cache_dir=str(tmp_path)).model_settings()
    loaded = load_model(settings.model, settings.weights)
    sha = weights_fingerprint(without_aux_head(loaded.module))
    int8 = Candidate("openvino", "int8")
    built: list[Candidate] = []

    def build(candidate: Candidate) -> Runtime:
        built.append(candidate)
        runtime = factory.build_runtime(settings, loaded, CPU, candidate, sha)
        runtime.description = str(candidate)
        return runtime

    ms = {OV: 40.0, OV_BF16: 20.0, int8: 10.0}
    _, choice = selection.choose(
        [OV, OV_BF16, int8],
        build,
        max_size=settings.max_size,
        cache_root=tmp_path,
        key={"model": "m"},
        time_once=lambda runtime, image: ms[Candidate(*runtime.description.split())] / 1000,
    )
    assert built == [OV, OV_BF16], "int8 is quantized only where the check can judge it"
    assert choice.chosen == OV_BF16
    summary = choice.summary()
    assert "agreement with fp32 not judged: fp32's masks are one class on every check image" in summary
    assert "pixel agreement" not in summary and "%" not in summary, summary
    not_tried = next(t for t in choice.trials if t.candidate == int8)
    assert not_tried.problem is not None and not_tried.problem.startswith("not tried: fp32's masks are one class")


def test_the_verdict_is_cached_and_measured_again_when_cpu_or_versions_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = [ORT, OV]
    timings = {ORT: 30.0, OV: 20.0}

    def key() -> dict[str, str]:
        return selection.cache_key(model="m", weights_sha256="w", max_size=32, threads=2, device=CPU, found=found)

    def fresh() -> dict[Candidate, Runtime]:
        return {c: Painted(c.precision) for c in found}

    _, first, built = choose(found, fresh(), timings, tmp_path, key())
    assert built == [ORT, OV] and not first.cached
    _, again, built = choose(found, fresh(), timings, tmp_path, key())
    assert again.cached and again.chosen == OV and built == [OV], "a warm start builds the winner only"
    monkeypatch.setattr(cpu_features, "flags_digest", lambda: "another cpu")
    _, moved, built = choose(found, fresh(), timings, tmp_path, key())
    assert not moved.cached and built == [ORT, OV]
    monkeypatch.setattr(selection, "library_version", lambda name: "99.0")
    _, upgraded, built = choose(found, fresh(), timings, tmp_path, key())
    assert not upgraded.cached and built == [ORT, OV]


def test_the_candidates_not_picked_are_let_go(tmp_path: Path) -> None:
    """Each holds a compiled graph (hundreds of megabytes for a resnet): nothing may keep the losers alive."""
    alive: dict[Candidate, weakref.ref[Painted]] = {}
    ms = {ORT: 30.0, OV: 20.0, TORCH: 50.0}

    def build(candidate: Candidate) -> Runtime:
        runtime = Painted(candidate.precision)
        runtime.description = str(candidate)
        alive[candidate] = weakref.ref(runtime)
        return runtime

    runtime, choice = selection.choose(
        [ORT, OV, TORCH],
        build,
        max_size=64,
        cache_root=tmp_path,
        key={"model": "m"},
        time_once=lambda runtime, image: ms[Candidate(*runtime.description.split())] / 1000,
    )
    gc.collect()
    assert choice.chosen == OV and alive[OV]() is runtime
    assert [c for c, ref in alive.items() if ref() is not None] == [OV]


def test_a_lower_precision_is_never_served_unchecked_when_fp32_fails_to_start(tmp_path: Path) -> None:
    def build(candidate: Candidate) -> Runtime:
        if candidate.precision == "fp32":
            raise ModelLoadError("fp32 broke")
        return Painted("bf16", wrong_share=0.5)

    with pytest.raises(ModelLoadError, match="no fp32 candidate started") as info:
        selection.choose([OV, OV_BF16], build, max_size=64, cache_root=tmp_path, key={"model": "m"})
    assert "openvino fp32: failed to start" in str(info.value) and "fp32 broke" in str(info.value)


def test_a_single_candidate_is_built_without_timing(tmp_path: Path) -> None:
    _, choice, built = choose([ORT], {ORT: Painted("fp32")}, {}, tmp_path)
    assert built == [ORT] and not choice.measured and choice.summary() == ""


def test_a_real_start_refuses_a_disagreeing_bf16_and_serves_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """create_runtime end to end, with a bf16 CPU pretended and openvino's bf16 answers spoiled."""
    from server.runtimes.openvino_runtime import OpenVinoRuntime

    monkeypatch.setattr(cpu_features, "native_bf16", lambda: True)
    monkeypatch.setattr(cpu_features, "native_int8", lambda: False)
    real_predict = OpenVinoRuntime.predict

    def spoiled(self: OpenVinoRuntime, images: list[np.ndarray]) -> list[np.ndarray]:
        labels = real_predict(self, images)
        if "bf16" in self.description:  # asked for bf16 (a CPU without bf16 units runs it as f32)
            for label_map in labels:
                label_map[: label_map.shape[0] // 10] = 7  # a tenth of every mask wrong
        return labels

    monkeypatch.setattr(OpenVinoRuntime, "predict", spoiled)
    settings = make_settings(runtime="openvino", cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="server.runtimes.selection"):
        runtime = create_runtime(settings.model_settings())
    assert runtime.precision == "fp32"
    assert "openvino bf16" in caplog.text and "not served: agrees with fp32 on" in caplog.text
    assert "auto: fastest of 2 measured" in runtime.description


# ---- the lower precisions on the known-answer model --------------------------------------------------------

SHAPES = [(128, 128), (96, 128), (128, 96)]
BOUNDS = {"bf16": selection.MIN_AGREEMENT, "int8": 0.97}


@pytest.fixture(scope="module")
def lowered(known_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Runtime]:
    cache = str(tmp_path_factory.mktemp("graphs"))
    made = {}
    for runtime, precision in [
        ("openvino", "fp32"),
        ("openvino", "bf16"),
        ("openvino", "int8"),
        ("onnxruntime", "int8"),
    ]:
        made[f"{runtime} {precision}"] = create_runtime(
            known_settings(known_weights, runtime=runtime, precision=precision, cache_dir=cache).model_settings()
        )
    return made


def pixel_agreement(got: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """The share of pixels with the same class, computed here rather than by the helper auto chooses with."""
    same = sum(int(np.count_nonzero(g == r)) for g, r in zip(got, reference, strict=True))
    return same / sum(r.size for r in reference)


def precision_that_runs(name: str) -> str:
    """What a runtime asked for `name` really computes in: bf16 only where the CPU has bf16 units (OpenVINO runs a
    bf16 hint as f32 elsewhere, and says so in its precision)."""
    asked = name.split()[1]
    return "fp32" if asked == "bf16" and not cpu_features.native_bf16() else asked


@pytest.mark.parametrize("name", ["openvino bf16", "openvino int8", "onnxruntime int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_lower_precisions_agree_with_fp32_above_their_bound(
    lowered: dict[str, Runtime], name: str, shape: tuple[int, int], batch_size: int
) -> None:
    """On a CPU without bf16 units, "openvino bf16" runs f32: then what is checked is that it says so and gives
    exactly fp32's answers; bf16's own 99.5% bound is checked only where bf16 really runs."""
    rng = np.random.default_rng(sum(shape) + batch_size)
    images = [render_scene(shape[1], shape[0], random_shapes(rng, 2), seed=k)[0] for k in range(batch_size)]
    runtime = lowered[name]
    ran = precision_that_runs(name)
    assert runtime.precision == ran, f"{name} reports {runtime.precision}, but {ran} runs on this CPU"
    assert lowered["openvino fp32"].precision == "fp32"
    reference = lowered["openvino fp32"].predict(images)
    got = runtime.predict(images)
    assert any(len(np.unique(r)) > 1 for r in reference), "one class everywhere would prove nothing"
    share = pixel_agreement(got, reference)
    bound = 1.0 if ran == "fp32" else BOUNDS[ran]
    assert share >= bound, f"{name} (running {ran}) agrees with fp32 on {share:.4%} of pixels (bound {bound:.1%})"


@pytest.fixture(scope="module")
def head_only_int8(known_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """NNCF int8 on the classifier head only, the backbone left in bf16: it agreed 99.7% with fp32 on the
    calibration photos and scenes (auto's old check set), and flips dark images."""
    from server.runtimes import int8
    from server.runtimes.openvino_runtime import OpenVinoRuntime

    tmp = tmp_path_factory.mktemp("head-only")
    settings = known_settings(known_weights, cache_dir=str(tmp)).model_settings()
    loaded = load_model(settings.model, settings.weights)
    graph = factory.exported_graph(
        settings, loaded, "openvino", "fp32", weights_fingerprint(without_aux_head(loaded.module))
    )
    packed = tmp / f"head-only{int8.PACKED_SUFFIX}"
    int8.quantize_openvino(graph, packed, settings.max_size, ignored_names=(".*/backbone/.*",))
    return OpenVinoRuntime(packed, factory.facts_of(settings, loaded), CPU, precision="int8", threads=0)


def test_auto_check_on_the_known_answer_model_refuses_every_int8_and_lets_bf16_serve(
    lowered: dict[str, Runtime], head_only_int8: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """The check a start runs (selection.measure), on weights whose masks depend on the image. The int8
    variants lose a near-black photo nearly wholesale; bf16 keeps every image. Red if the check goes back to
    pooling auto's first 8 images: the head-only int8 agrees 99.7% there."""
    head_only = Candidate("openvino head-only", "int8")
    runtimes = {
        OV: lowered["openvino fp32"],
        OV_BF16: lowered["openvino bf16"],
        Candidate("onnxruntime", "int8"): lowered["onnxruntime int8"],
        Candidate("openvino", "int8"): lowered["openvino int8"],
        head_only: head_only_int8,
    }
    with caplog.at_level(logging.INFO, logger="server.runtimes.selection"):
        trials, _ = selection.measure(list(runtimes), runtimes.__getitem__, max_size=KNOWN_MAX_SIZE, budget_s=0)
    verdict = {t.candidate: t for t in trials}
    assert all(t.judged for t in trials), "the known-answer model's masks depend on the image"
    assert verdict[OV_BF16].problem is None, verdict[OV_BF16]
    for candidate in (Candidate("onnxruntime", "int8"), Candidate("openvino", "int8"), head_only):
        assert verdict[candidate].problem is not None, f"{candidate} passed: {verdict[candidate]}"
        assert f"auto: {candidate} not served: " in caplog.text
    assert selection.pick(trials) in (OV, OV_BF16)


def test_a_bf16_batch_gives_each_image_what_it_gets_alone(lowered: dict[str, Runtime]) -> None:
    rng = np.random.default_rng(11)
    images = [render_scene(128, 96, random_shapes(rng, 2), seed=k)[0] for k in range(4)]
    runtime = lowered["openvino bf16"]
    assert runtime.precision == precision_that_runs("openvino bf16")
    together = runtime.predict(images)
    assert len({m.tobytes() for m in together}) == len(images), "masks should differ between these scenes"
    for image, batched in zip(images, together, strict=True):
        assert np.array_equal(runtime.predict([image])[0], batched)


def test_the_factory_plans_with_the_cpus_own_bf16_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_features, "native_bf16", lambda: False)
    assert "openvino bf16" not in names(factory.plan(make_settings().model_settings(), CPU))
    monkeypatch.setattr(cpu_features, "native_bf16", lambda: True)
    assert "openvino bf16" in names(factory.plan(make_settings().model_settings(), CPU))


def test_requests_that_run_while_auto_times_do_not_decide_its_choice() -> None:
    """A run-time load times its candidates while requests are served. Here bursts of requests land in most of
    one candidate's slots (every 2 of 3 rounds, as a caller's period can line up with the rounds): its slow
    samples are the requests' time, not its own. Each candidate's figure is its fastest round (interference
    only ever adds time), so the one that is faster when undisturbed still serves."""
    fast, slow = Candidate("onnxruntime", "fp32"), Candidate("torch", "fp32")
    runtimes = {fast: Painted("fp32"), slow: Painted("fp32")}
    own_ms = {fast: 10.0, slow: 13.0}
    by_runtime = {id(r): c for c, r in runtimes.items()}
    images_per_round = len(selection.timing_images(64))
    calls = {fast: 0, slow: 0}

    def time_once(runtime: Runtime, image: np.ndarray) -> float:
        candidate = by_runtime[id(runtime)]
        round_number = calls[candidate] // images_per_round
        calls[candidate] += 1
        disturbed = candidate == fast and round_number % 3 != 2
        return own_ms[candidate] * (3.0 if disturbed else 1.0) / 1000

    trials, _ = selection.measure([fast, slow], runtimes.__getitem__, max_size=64, time_once=time_once, budget_s=60)
    assert selection.pick(trials) == fast, [(str(t.candidate), t.ms_per_image) for t in trials]
