from __future__ import annotations

import logging
import urllib.error
from pathlib import Path

import pytest
import torch
from torchvision.models import segmentation as tvseg

from server.errors import ModelLoadError
from server.runtimes import weights as model_module
from server.runtimes.weights import load_model

MODEL = "deeplabv3_mobilenet_v3_large"
PRETRAINED = tvseg.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1


def go_offline(monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> list[str]:
    """Pretrained weights unreachable whatever this machine has: an empty torch cache, and downloads refused
    where torch.hub makes them (torchvision's loader imported load_state_dict_from_url early, so patching
    that name would miss it). Returns the URLs whose download was refused."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    refused: list[str] = []

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        refused.append(url)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return refused


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    return go_offline(monkeypatch, tmp_path / "empty-torch-home")


def test_auto_falls_back_to_random_with_a_warning(offline: list[str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        loaded = load_model(MODEL, "auto")
    assert offline == [PRETRAINED.url]  # the real download path was taken, and stopped there
    assert not loaded.trained and loaded.weights_description.startswith("random (fallback")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "RANDOM" in warning and "SEGSERVE_WEIGHTS" in warning and ".pth" in warning


def test_pretrained_is_a_clear_error_when_unavailable(offline: list[str]) -> None:
    with pytest.raises(ModelLoadError, match=r"pretrained weights .* unavailable"):
        load_model(MODEL, "pretrained")
    assert offline == [PRETRAINED.url]


def test_offline_holds_on_a_machine_with_the_weights_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A developer's machine may have the pretrained file in torch's cache: the offline tests must not use it."""
    machine_home = tmp_path / "machine-torch-home"
    monkeypatch.setenv("TORCH_HOME", str(machine_home))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(PRETRAINED.url).name
    cached.parent.mkdir(parents=True)
    torch.save(
        tvseg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True).state_dict(), cached
    )
    # As such a machine would: the cached file is loaded, nothing is downloaded.
    assert load_model(MODEL, "auto").weights_description == f"pretrained:{PRETRAINED.name}"
    refused = go_offline(monkeypatch, tmp_path / "empty-torch-home")
    assert load_model(MODEL, "auto").weights_description.startswith("random (fallback")
    assert refused == [PRETRAINED.url]


def test_state_dict_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = tvseg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = load_model("deeplabv3_mobilenet_v3_large", str(path))
    assert loaded.trained and loaded.weights_description == f"file:{path}"
    key = "classifier.4.weight"
    assert torch.equal(loaded.module.state_dict()[key], source.state_dict()[key])


def test_missing_and_mismatched_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("deeplabv3_mobilenet_v3_large", str(tmp_path / "nope.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(
        tvseg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).state_dict(), wrong
    )
    with pytest.raises(ModelLoadError, match="does not match") as info:
        load_model("deeplabv3_mobilenet_v3_large", str(wrong))
    assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="not a torch state_dict"):
        load_model("deeplabv3_mobilenet_v3_large", str(garbage))


def test_unknown_model_and_device() -> None:
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("deeplabv3_tiny", "random")
    with pytest.raises(ModelLoadError):
        model_module.resolve_device("tpu")


def test_random_weights_are_the_same_on_every_start() -> None:
    """So their fingerprint, and the exported graph cached under it, survive a restart."""
    from server.runtimes.weights import weights_fingerprint

    torch.manual_seed(123)
    first = weights_fingerprint(load_model("deeplabv3_mobilenet_v3_large", "random").module)
    torch.manual_seed(456)
    second = weights_fingerprint(load_model("deeplabv3_mobilenet_v3_large", "random").module)
    assert first == second


def test_the_weights_fingerprint_sees_one_changed_value(tmp_path: Path) -> None:
    from server.runtimes.weights import weights_fingerprint

    module = load_model("deeplabv3_mobilenet_v3_large", "random").module
    before = weights_fingerprint(module)
    with torch.no_grad():
        module.state_dict()["classifier.4.bias"][3] += 1e-6
    assert weights_fingerprint(module) != before
