"""auto, decided by measurement: which runtime and precision serve, on this machine, with these weights.

The candidates are every installed runtime at every precision auto allows here (fp32 always; bf16 where
the CPU computes it natively; openvino int8 where it has int8 units; fp16 and bf16 on CUDA). Each is built,
warmed and timed on the warm-up shapes, in interleaved rounds within a fixed budget (so a machine that
slows down mid-way does not favour one side), and its figure is its fastest round: a load at run time times
while requests are served (on the load worker, at a lower priority), and what they take only ever adds to a
round, most to the rounds they happen to share.

A lower precision serves only if its labels agree with fp32's on the check images
(server/runtimes/calibration.py): MIN_AGREEMENT of all their pixels, and MIN_IMAGE_AGREEMENT of each
image's, so that one image flipped wholesale is enough to refuse it. Where fp32's masks are one class
everywhere (random weights) nothing can be judged: the log and ModelInfo say so, and int8 is not tried.
The fastest candidate left wins; the log shows the table. The verdict is cached in the graph cache, keyed
by everything that could change it, so a warm start builds only the winner.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.errors import ModelLoadError
from server.runtimes import calibration, cpu_features, progress
from server.runtimes.base import Runtime
from server.runtimes.calibration import check_images
from server.runtimes.export_cache import source_sha256

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.995
"""Share of pixels, over all check images, whose label must equal fp32's before a lower precision may serve."""
MIN_IMAGE_AGREEMENT = 0.95
"""The same share on each check image alone: a precision that flips one image's mask wholesale (a dark photo
painted background) is refused, however well the others agree."""
MIN_JUDGED_SHARE = 0.001
"""The check can judge only weights whose fp32 masks depend on the image: when all but this share of the
check pixels are one class (untrained or random weights paint one class everywhere), every precision
'agrees' and the figure means nothing."""
JUDGED_ONLY = ("int8",)
"""Lower precisions auto serves only when the check could judge them (bf16 and fp16 round the same
computation; int8 computes another one)."""
TIMING_BUDGET_S = 4.0
"""Timed rounds stop once they have taken this long (after each candidate's untimed first calls). One round
always runs: for a heavy model (a resnet50 on a small CPU takes over a second an image) one round is already
many seconds of steady compute, and a second would add as much again to the first start."""
MAX_ROUNDS = 12

# What each runtime offers on each device type. auto tries int8 only with openvino (NNCF's graph), and only
# where the CPU has int8 units (AMX or VNNI): ONNX Runtime's QDQ graph never beat bf16 on any CPU measured,
# and without those units int8 is slower than fp32 (docs/performance.md).
OFFERED = {
    ("cpu", "onnxruntime"): ("fp32", "int8"),
    ("cpu", "openvino"): ("fp32", "bf16", "int8"),
    ("cpu", "torch"): ("fp32",),
    ("cuda", "onnxruntime"): ("fp32",),
    ("cuda", "torch"): ("fp32", "fp16", "bf16"),
}
AUTO_INT8 = ("openvino",)
CPU_RUNTIMES = ("onnxruntime", "openvino", "torch")
"""auto's candidates on the CPU, in the order ties go."""


@dataclass(frozen=True)
class Candidate:
    runtime: str
    precision: str

    def __str__(self) -> str:
        return f"{self.runtime} {self.precision}"


@dataclass
class Trial:
    candidate: Candidate
    ms_per_image: float | None = None
    agreement: float | None = None
    """Pixel agreement of the labels with fp32's over the check images; None for fp32, or when not checked."""
    least: str | None = None
    """The check image it agreed least on, with that image's share ("coffee, near-black 3.1%")."""
    judged: bool = True
    """False when fp32's masks were one class everywhere, so that agreement could not tell anything."""
    problem: str | None = None
    """Why this candidate may not serve (it failed to build, or disagreed); None if it may."""


@dataclass
class Choice:
    chosen: Candidate
    trials: list[Trial]
    measured: bool
    """False when there was one candidate only (nothing to compare)."""
    cached: bool = False

    @property
    def trial(self) -> Trial | None:
        return next((t for t in self.trials if t.candidate == self.chosen), None)

    def summary(self) -> str:
        """What ModelInfo.runtime adds to the runtime's own description."""
        if not self.measured:
            return ""
        trial = self.trial
        if trial is None or trial.candidate.precision == "fp32":
            agreement = ""
        elif not trial.judged:
            agreement = f", agreement with fp32 not judged: {NOT_JUDGED}"
        elif trial.agreement is not None:
            agreement = (
                f", {trial.agreement:.2%} pixel agreement with fp32 over the check images (least: {trial.least})"
            )
        else:
            agreement = ""
        return f"; auto: fastest of {len(self.trials)} measured{agreement}"


NOT_JUDGED = "fp32's masks are one class on every check image (untrained weights?)"


def auto_precisions(device: torch.device, native_bf16: bool, native_int8: bool = False) -> tuple[str, ...]:
    """`native_bf16`: the device computes bf16 in hardware (elsewhere OpenVINO runs f32 for it anyway);
    `native_int8`: it has int8 dot-product units (AMX, VNNI)."""
    bf16 = ("bf16",) if native_bf16 else ()
    if device.type == "cuda":
        return ("fp32", "fp16", *bf16)
    return ("fp32", *bf16, *(("int8",) if native_int8 else ()))


def candidates(
    runtime: str,
    precision: str,
    device: torch.device,
    *,
    installed: Callable[[str], bool],
    native_bf16: bool,
    native_int8: bool = False,
) -> list[Candidate]:
    """The (runtime, precision) pairs auto compares; a single one when both are named."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if runtime != "auto":
        runtimes: tuple[str, ...] = (runtime,)
    elif kind == "cuda":
        runtimes = ("torch",)  # until a GPU run measures the graph runtimes there
    else:
        runtimes = tuple(r for r in CPU_RUNTIMES if r == "torch" or installed(r))
    wanted = auto_precisions(device, native_bf16, native_int8) if precision == "auto" else (precision,)
    found = [
        Candidate(r, p)
        for r in runtimes
        for p in wanted
        if (p in OFFERED.get((kind, r), ()) and (p != "int8" or precision == "int8" or r in AUTO_INT8))
        or (runtime != "auto" and precision != "auto")
    ]
    if not found:
        offering = sorted(r for (k, r), offered in OFFERED.items() if k == kind and precision in offered)
        raise ModelLoadError(
            f"precision {precision} is not offered by {'any runtime' if runtime == 'auto' else runtime} on {kind}"
            + (f"; it is by {', '.join(offering)}" if offering else "")
        )
    return found


def timing_images(max_size: int) -> list[np.ndarray]:
    """One image per warm-up shape: 4:3 landscape, portrait, square (the pipeline warms the same ones)."""
    rng = np.random.default_rng(0)
    short = max_size * 3 // 4
    shapes = dict.fromkeys([(short, max_size), (max_size, short), (max_size, max_size)])
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]


def _time_once(runtime: Runtime, image: np.ndarray) -> float:
    started = time.perf_counter()
    runtime.predict([image])
    return time.perf_counter() - started


def agreement(labels: list[np.ndarray], reference: list[np.ndarray]) -> float:
    same = sum(int((a == b).sum()) for a, b in zip(labels, reference, strict=True))
    return same / sum(a.size for a in reference)


def can_judge(reference: list[np.ndarray]) -> bool:
    """Whether fp32's labels depend on the image at all (MIN_JUDGED_SHARE)."""
    counts = np.bincount(np.concatenate([labels.ravel() for labels in reference]), minlength=1)
    return bool(counts.sum() - counts.max() >= MIN_JUDGED_SHARE * counts.sum())


def check(
    trial: Trial, labels: list[np.ndarray], reference: list[np.ndarray], names: list[str], *, judged: bool
) -> None:
    """Fills in the trial's agreement and, when it may not serve, its problem: pooled over the check images
    and on each one (MIN_AGREEMENT, MIN_IMAGE_AGREEMENT). `judged` False: fp32's masks cannot judge (the
    trial says so), which lets nothing through that would otherwise be refused."""
    per_image = [agreement([a], [b]) for a, b in zip(labels, reference, strict=True)]
    least = int(np.argmin(per_image))
    trial.agreement = agreement(labels, reference)
    trial.least = f"{names[least]} {per_image[least]:.1%}"
    trial.judged = judged
    # Where fp32's masks cannot judge, agreement proves nothing, but disagreement still shows a precision
    # that computes something else: it is refused all the same.
    if trial.agreement < MIN_AGREEMENT:
        trial.problem = f"agrees with fp32 on {trial.agreement:.2%} of pixels, under {MIN_AGREEMENT:.1%}"
    elif per_image[least] < MIN_IMAGE_AGREEMENT:
        trial.problem = (
            f"flips the mask of check image '{names[least]}' (agrees with fp32 on {per_image[least]:.1%} "
            f"of its pixels, under {MIN_IMAGE_AGREEMENT:.0%})"
        )


def _labels(runtime: Runtime, images: list[np.ndarray]) -> list[np.ndarray]:
    return [runtime.predict([image])[0] for image in images]


def _build(
    candidate: Candidate, build: Callable[[Candidate], Runtime], trial: Trial, number: int, total: int
) -> Runtime | None:
    progress.report(f"measuring runtimes: building {candidate} ({number} of {total})")
    try:
        return build(candidate)
    except Exception as exc:
        trial.problem = f"failed to start: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        return None


def measure(
    found: list[Candidate],
    build: Callable[[Candidate], Runtime],
    *,
    max_size: int,
    time_once: Callable[[Runtime, np.ndarray], float] = _time_once,
    budget_s: float = TIMING_BUDGET_S,
) -> tuple[list[Trial], dict[Candidate, Runtime]]:
    """Builds each candidate, checks lower precisions against fp32, times the rest; returns the trials and
    the runtimes built (the caller keeps the winner). fp32 is built first: a lower precision that needs a
    judged check (JUDGED_ONLY) is not even built where fp32's masks cannot judge it (int8 spends tens of
    seconds quantizing)."""
    trials = {c: Trial(c) for c in found}
    built: dict[Candidate, Runtime] = {}
    order = sorted(found, key=lambda c: c.precision != "fp32")  # stable: fp32 first, else as found
    reference: list[np.ndarray] | None = None
    judged = True
    named = check_images(max_size) if any(c.precision != "fp32" for c in found) else []
    for number, candidate in enumerate(order, start=1):
        trial = trials[candidate]
        if candidate.precision != "fp32" and any(c.precision == "fp32" for c in found):
            if reference is None:  # auto offered fp32 too, but none started: nothing to check against
                trial.problem = "not checked against fp32: no fp32 candidate started"
                continue
            if not judged and candidate.precision in JUDGED_ONLY:
                trial.problem = f"not tried: {NOT_JUDGED}, so its agreement with fp32 could not be judged"
                continue
        runtime = _build(candidate, build, trial, number, len(order))
        if runtime is None:
            continue
        if candidate.precision == "fp32" and reference is None and named:
            reference = _labels(runtime, [image for _, image in named])
            judged = can_judge(reference)
            if not judged:
                log.warning("auto: agreement with fp32 cannot be judged: %s", NOT_JUDGED)
        elif candidate.precision != "fp32" and reference is not None:
            check(
                trial, _labels(runtime, [image for _, image in named]), reference, [n for n, _ in named], judged=judged
            )
            if trial.problem is not None:
                log.warning("auto: %s not served: %s", candidate, trial.problem)
                continue
        built[candidate] = runtime
    progress.report(f"measuring runtimes: timing {len(built)} candidates")
    images = timing_images(max_size)
    for runtime in built.values():
        for image in images:
            runtime.predict([image])  # first calls of a shape pay one-off set-up: never timed
    seconds: dict[Candidate, list[float]] = {c: [] for c in built}
    started = time.monotonic()
    rounds = 0
    while built and rounds < MAX_ROUNDS and (rounds == 0 or time.monotonic() - started < budget_s):
        for candidate, runtime in built.items():
            seconds[candidate].append(sum(time_once(runtime, image) for image in images) / len(images))
        rounds += 1
    for candidate, values in seconds.items():
        # Its fastest round: whatever else runs meanwhile (requests, during a load at run time) only ever adds
        # time, so the fastest round is the least disturbed one; a median let requests that lined up with one
        # candidate's slots in most rounds decide the choice (test_requests_that_run_while_auto_times_...).
        trials[candidate].ms_per_image = min(values) * 1000
    return list(trials.values()), built


def pick(trials: list[Trial]) -> Candidate:
    """The fastest candidate that may serve; ties go to the earlier one."""
    usable = [t for t in trials if t.problem is None and t.ms_per_image is not None]
    if not usable:
        raise ModelLoadError(
            "no runtime could serve: " + "; ".join(f"{t.candidate}: {t.problem}" for t in trials if t.problem)
        )
    return min(usable, key=lambda t: t.ms_per_image or 0.0).candidate


def table(trials: list[Trial], chosen: Candidate) -> str:
    rows = []
    for t in trials:
        speed = f"{t.ms_per_image:7.1f} ms/image" if t.ms_per_image is not None else "       -        "
        agreed = ""
        if t.agreement is not None:
            agreed = f"  agreement {t.agreement:.2%}, least {t.least}" + ("" if t.judged else " (not judged)")
        verdict = "  <- serving" if t.candidate == chosen else (f"  not served: {t.problem}" if t.problem else "")
        rows.append(f"  {t.candidate!s:<18} {speed}{agreed}{verdict}")
    return "\n".join(rows)


# ---- the cache ----------------------------------------------------------------------------------------


# The distributions each runtime module may come from (onnxruntime has GPU and OpenVINO builds).
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "openvino": ("openvino",),
    "onnx": ("onnx",),
}


def library_version(name: str) -> str:
    """The installed version, read from the package's metadata: a warm start then never imports a runtime it
    will not serve (importing openvino alone is a noticeable share of a warm start)."""
    for distribution in _DISTRIBUTIONS.get(name, (name,)):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(distribution)
    return "absent"


def installed(name: str) -> bool:
    """Whether `name` is there to try, without importing it; a broken install fails its trial instead."""
    return name == "torch" or importlib.util.find_spec(name) is not None


def cache_key(
    *,
    model: str,
    weights_sha256: str,
    max_size: int,
    threads: int,
    device: torch.device,
    found: list[Candidate],
    instances: int = 1,
) -> dict[str, str]:
    """Everything the verdict depends on: a change of any misses the cache and measures again."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "selection_code_sha256": source_sha256(__file__),
        "check_images_code_sha256": source_sha256(calibration.__file__),
        "cpu": cpu_features.cpu_model(),
        "cpu_flags_sha256": cpu_features.flags_digest(),
        "device": device_name,
        "threads": str(threads),
        "instances": str(instances),
        "versions": " ".join(f"{n} {library_version(n)}" for n in ("torch", "onnxruntime", "openvino", "nncf")),
        "model": model,
        "weights_sha256": weights_sha256,
        "max_size": str(max_size),
        "candidates": ", ".join(map(str, found)),
    }


def _cache_path(root: Path, key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / f"auto-choice-{key['model']}-{digest}.json"


def read_cached(root: Path, key: dict[str, str]) -> Choice | None:
    try:
        record = json.loads(_cache_path(root, key).read_text())
        if record["key"] != key:
            return None
        trials = [Trial(**{**t, "candidate": Candidate(**t["candidate"])}) for t in record["trials"]]
        return Choice(Candidate(**record["chosen"]), trials, measured=True, cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(root: Path, key: dict[str, str], choice: Choice) -> None:
    path = _cache_path(root, key)
    record: dict[str, Any] = {"key": key, "chosen": asdict(choice.chosen), "trials": [asdict(t) for t in choice.trials]}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
    except OSError as exc:  # a cache that cannot be written costs the next start its timing, nothing more
        log.warning("could not cache auto's choice in %s: %s", path, exc)


def choose(
    found: list[Candidate],
    build: Callable[[Candidate], Runtime],
    *,
    max_size: int,
    cache_root: Path,
    key: dict[str, str],
    time_once: Callable[[Runtime, np.ndarray], float] = _time_once,
) -> tuple[Runtime, Choice]:
    """The runtime to serve and how it was chosen: cached verdict, single candidate, or measured now."""
    if len(found) == 1:
        return build(found[0]), Choice(found[0], [Trial(found[0])], measured=False)
    cached = read_cached(cache_root, key)
    if cached is not None:
        try:
            runtime = build(cached.chosen)
        except Exception as exc:
            log.warning("auto's cached choice %s failed to start (%s); measuring again", cached.chosen, exc)
        else:
            log.info(
                "auto: serving %s, measured at an earlier start:\n%s",
                cached.chosen,
                table(cached.trials, cached.chosen),
            )
            return runtime, cached
    started = time.monotonic()
    trials, built = measure(found, build, max_size=max_size, time_once=time_once)
    chosen = pick(trials)
    choice = Choice(chosen, trials, measured=True)
    log.info(
        "auto: measured %d candidates in %.1f s, serving %s:\n%s",
        len(found),
        time.monotonic() - started,
        chosen,
        table(trials, chosen),
    )
    write_cached(cache_root, key, choice)
    return built[chosen], choice
