"""The model repository's configs, labels files and the one-line SEGSERVE_MODELS, read without a server: every
problem is one sentence naming the file and the field, and nothing a config names can lead out of the repository
or run code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import yaml

from server.errors import ModelLoadError, UnknownModel
from server.labels import VOC_CLASSES, voc_color
from server.models.repository import (
    CONFIG_FIELDS,
    BrokenModel,
    ModelConfig,
    ModelConfigError,
    ModelFile,
    check_name,
    configured_models,
    parse_models_line,
    read_labels_file,
    read_model,
)
from server.runtimes.weights import load_model
from server.settings import Settings
from tests.helpers.model_repository import write_config

MOBILENET = "deeplabv3_mobilenet_v3_large"


def test_with_neither_setting_the_one_model_is_served_as_before() -> None:
    (model,) = configured_models(Settings(weights="random"))
    assert isinstance(model, ModelConfig)
    assert (model.name, model.architecture, model.weights, model.source) == (MOBILENET, MOBILENET, "random", "")
    assert [label.name for label in model.labels] == list(VOC_CLASSES)
    assert model.settings_for(Settings()).max_size == Settings().max_size


def test_models_in_one_line() -> None:
    assert parse_models_line("fast=deeplabv3_mobilenet_v3_large, best=deeplabv3_resnet101") == [
        ("fast", MOBILENET),
        ("best", "deeplabv3_resnet101"),
    ]
    assert parse_models_line("deeplabv3_resnet50") == [("deeplabv3_resnet50", "deeplabv3_resnet50")]
    for line, problem in (
        ("fast=resnet18", "'resnet18' is none of"),
        ("a=deeplabv3_resnet50,a=deeplabv3_resnet101", "'a' is given twice"),
        ("../x=deeplabv3_resnet50", "not a model name"),
        (" , ", "names no model"),
    ):
        with pytest.raises(ModelLoadError, match=problem):
            parse_models_line(line)
    with pytest.raises(ValueError, match="set one of them"):
        Settings(models="a=deeplabv3_resnet50", model_repository="/tmp")


def test_labels_files_give_names_and_colours_and_the_rest_are_generated_distinct_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(["background", {"name": "leaf", "color": "#800000"}, "stem", "fruit"]))
    labels = read_labels_file(path)
    assert [label.name for label in labels] == ["background", "leaf", "stem", "fruit"]
    assert labels[1].color == (128, 0, 0)  # VOC's colour of class 1, given here to class 1
    colours = [label.color for label in labels]
    assert len(set(colours)) == 4 and colours == [label.color for label in read_labels_file(path)]
    # Generated colours follow VOC's map, skipping the one already given.
    assert colours[0] == voc_color(0) and colours[2:] == [voc_color(2), voc_color(3)]
    many = tmp_path / "many.yaml"
    many.write_text(yaml.safe_dump([f"class{i}" for i in range(256)]))
    assert len({label.color for label in read_labels_file(many)}) == 256


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (["only"], "labels: 1 classes; a model has 2 to 256"),
        ([f"c{i}" for i in range(257)], "labels: 257 classes"),
        (["a", {"name": "b", "color": "#12345"}], "labels[1].color: '#12345' is not"),
        (["a", {"name": "b", "colour": "#123456"}], "labels[1]: unknown field 'colour'"),
        (["a", "a"], "class name 'a' appears twice"),
        ([{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": "#010203"}], "is given to another class too"),
        ({"names": ["a", "b"]}, "labels: expected a list"),
    ],
)
def test_a_bad_labels_file_is_one_sentence_naming_it_and_the_field(
    tmp_path: Path, content: object, problem: str
) -> None:
    path = tmp_path / "labels.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ModelConfigError) as refused:
        read_labels_file(path)
    assert str(path) in refused.value.message and problem in refused.value.message
    assert "\n" not in refused.value.message


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"architecture": "deeplabv3_resnet18"}, "config.yaml: architecture: 'deeplabv3_resnet18' is none of"),
        ({"architecture": MOBILENET, "max_size": 4}, "config.yaml: max_size: expected a int of at least 16"),
        ({"architecture": MOBILENET, "batching": 4}, "config.yaml: batching: unknown field"),
        ({"architecture": MOBILENET, "instances": 0}, "config.yaml: instances: expected a int of at least 1"),
        ({"architecture": MOBILENET, "max_batch_size": 2.0}, "config.yaml: max_batch_size: expected a int of at"),
        ({"architecture": MOBILENET, "max_batch_delay_ms": True}, "max_batch_delay_ms: expected a float of at least 0"),
        ({"architecture": MOBILENET, "weights": 5}, "config.yaml: weights: expected auto, pretrained, random or a"),
        ({"architecture": MOBILENET, "labels": ["a"]}, "config.yaml: labels: name a JSON or YAML file"),
        ({"max_size": 4, "batching": 1}, "config.yaml: batching: unknown field"),  # unknown fields first
        ({"max_size": 4}, "config.yaml: architecture: None is none of"),  # then in CONFIG_FIELDS order
        ({"architecture": MOBILENET, "weights": "/etc/passwd"}, "config.yaml: weights: '/etc/passwd' is an absolute"),
        ({"architecture": MOBILENET, "weights": "missing.pt"}, "config.yaml: weights: no such file"),
        ({"architecture": MOBILENET, "weights": "../../outside.pt"}, "weights leads outside the model repository"),
        ({"architecture": MOBILENET, "labels": "four.yaml"}, "config.yaml: weights: the pretrained weights know 21"),
    ],
)
def test_a_broken_config_is_one_sentence_naming_the_file_and_the_field(
    tmp_path: Path, config: dict[str, object], problem: str
) -> None:
    repository = tmp_path / "repo"
    (tmp_path / "outside.pt").write_bytes(b"x")
    write_config(repository / "m", **config)
    (repository / "m" / "four.yaml").write_text(yaml.safe_dump(["a", "b", "c", "d"]))
    with pytest.raises(ModelConfigError) as refused:
        read_model(repository, "m")
    assert problem in refused.value.message and "\n" not in refused.value.message


def test_the_config_fields_are_the_pydantic_model_s_and_numbers_keep_their_kind(tmp_path: Path) -> None:
    assert tuple(ModelFile.model_fields) == CONFIG_FIELDS
    write_config(tmp_path / "m", architecture=MOBILENET, weights="random", max_batch_delay_ms=5, instances=2)
    config = read_model(tmp_path, "m")
    assert config.max_batch_delay_ms == 5.0 and config.instances == 2 and config.max_size is None


def test_a_broken_model_folder_is_listed_as_broken_beside_the_good_ones(tmp_path: Path) -> None:
    write_config(tmp_path / "good", architecture=MOBILENET, weights="random", max_batch_size=2, instances=2)
    write_config(tmp_path / "bad", architecture="nope")
    good, bad = sorted(configured_models(Settings(model_repository=str(tmp_path))), key=lambda m: m.name, reverse=True)
    assert isinstance(good, ModelConfig) and good.max_batch_size == 2
    assert good.settings_for(Settings()).model_instances == 2 and Settings().model_instances == 1
    assert isinstance(bad, BrokenModel) and bad.name == "bad" and "bad/config.yaml: architecture" in bad.reason


def test_a_model_s_settings_are_its_own_with_the_server_s_as_defaults(tmp_path: Path) -> None:
    """A model carries what its runtime and batcher read (the server's values unless its config overrides
    them), never the server's ports, certificates or queue."""
    write_config(tmp_path / "m", architecture="deeplabv3_resnet50", weights="random", max_size=200, instances=3)
    server = Settings(model_repository=str(tmp_path), max_batch_size=5, precision="fp32", http_port=8123)
    own = read_model(tmp_path, "m").settings_for(server)
    assert (own.model, own.weights, own.max_size, own.model_instances) == ("deeplabv3_resnet50", "random", 200, 3)
    assert (own.max_batch_size, own.precision, own.runtime) == (5, "fp32", server.runtime)
    for servers_own in ("http_port", "port", "tls_cert", "max_queue", "model_repository", "control_token"):
        assert not hasattr(own, servers_own), f"a model's settings carry the server's {servers_own}"


@pytest.mark.parametrize("name", ["..", "../etc", "/etc", ".hidden", "a/b", "a\\b", "", "x" * 65, "a..b"])
def test_names_are_names_never_paths(name: str) -> None:
    with pytest.raises(UnknownModel):
        check_name(name)


def test_symlinks_out_of_the_repository_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_config(outside, architecture=MOBILENET, weights="random")
    (outside / "weights.pt").write_bytes(b"not read")
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelConfigError, match="leads outside the model repository"):
        read_model(repository, "linked")
    write_config(repository / "inner", architecture=MOBILENET, weights="weights.pt")
    (repository / "inner" / "weights.pt").symlink_to(outside / "weights.pt")
    with pytest.raises(ModelConfigError, match="weights leads outside the model repository"):
        read_model(repository, "inner")


class _RunsCode:
    """Unpickling this calls os.system: what a weights file must never be able to do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "it-ran"
    weights = tmp_path / "repo" / "evil" / "weights.pt"
    write_config(weights.parent, architecture=MOBILENET, weights="weights.pt", labels="labels.yaml")
    (weights.parent / "labels.yaml").write_text(yaml.safe_dump(["a", "b"]))
    weights.write_bytes(pickle.dumps({"classifier.4.weight": _RunsCode(marker)}))
    config = read_model(tmp_path / "repo", "evil")
    with pytest.raises(ModelLoadError, match="is not a torch state_dict"):
        load_model(config.architecture, config.weights, len(config.labels))
    assert not marker.exists()
    pickle.loads(weights.read_bytes())  # the file does run code when unpickled plainly: the refusal is what saved us
    assert marker.exists()


def test_a_head_that_does_not_match_the_labels_names_both_numbers(known_weights: Path) -> None:
    with pytest.raises(ModelLoadError) as refused:
        load_model(MOBILENET, str(known_weights), 4)
    assert "its head has 21 classes, the labels name 4" in refused.value.message


def test_the_example_repository_reads_as_documented() -> None:
    root = Path(__file__).resolve().parents[2] / "deploy" / "model-repository"
    models = {m.name: m for m in configured_models(Settings(model_repository=str(root)))}
    assert sorted(models) == ["crops", "fast"]
    crops = models["crops"]
    assert isinstance(crops, ModelConfig) and crops.architecture == "deeplabv3_resnet50" and crops.max_size == 384
    assert [(label.name, label.hex_color) for label in crops.labels][:3] == [
        ("background", "#000000"),
        ("wheat", "#e0c050"),
        ("weed", "#c82828"),
    ]
