"""Which models to serve, and how each is configured: the model repository folder (SEGSERVE_MODEL_REPOSITORY),
the one-line SEGSERVE_MODELS, or neither (the one model of SEGSERVE_MODEL and SEGSERVE_WEIGHTS, as always).

A repository holds one folder per model, named as callers name the model:

    models/
      fast/config.yaml        architecture: deeplabv3_mobilenet_v3_large
      crops/config.yaml       architecture: deeplabv3_resnet50, weights: crops.pt, labels: labels.yaml
      crops/crops.pt
      crops/labels.yaml

Names are checked before they touch the file system, and every file a config names must lie inside the
repository once symlinks are followed: a caller who may load models can name models, never paths.
Problems are one sentence naming the file and the field.

Configs and labels files are small and their reading is bounded before it starts: at most MAX_CONFIG_BYTES are
read, YAML aliases are refused (a few hundred bytes of nested aliases expand to gigabytes: "billion laughs"),
documents are held to MAX_CONFIG_NODES nodes nested at most MAX_CONFIG_DEPTH deep, and what a message quotes of a
file's content is cut short (reprlib), the message itself to MAX_MESSAGE_CHARS: a reason is listed in the
repository index, answered to a load's caller and logged.
"""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml  # type: ignore[import-untyped,unused-ignore]  # no stubs installed
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import ModelLoadError, UnknownModel
from server.labels import MAX_CLASSES, MIN_CLASSES, VOC_CLASSES, Label, labels_with_colors, make_labels, parse_color
from server.settings import MIN_MAX_SIZE, ModelName, ModelSettings, Settings

ARCHITECTURES: tuple[str, ...] = get_args(ModelName)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CONFIG_FILES = ("config.yaml", "config.yml", "config.json")
CONFIG_FIELDS = ("architecture", "weights", "labels", "max_size", "max_batch_size", "max_batch_delay_ms", "instances")
"""ModelFile's fields, in the order problems are reported."""
WEIGHTS_WORDS = ("auto", "pretrained", "random")
WEIGHTS_SUFFIXES = (".pt", ".pth", ".safetensors")
MAX_CONFIG_BYTES = 64 * 1024
"""A config or labels file's largest size: a labels file of MAX_CLASSES classes with colours is a few KiB."""
MAX_CONFIG_NODES = 5_000
"""Nodes (scalars, lists, mappings) a YAML config or labels file may hold: MAX_CLASSES labels with names and
[r, g, b] colours take about 2,600."""
MAX_CONFIG_DEPTH = 16
"""How deeply a YAML file's lists and mappings may nest (a labels file needs 3)."""
MAX_MESSAGE_CHARS = 500
"""The longest a config problem's message gets, whatever it quotes."""
# Bytes of each architecture's float32 weights at 21 classes (its state_dict, measured): what a pretrained or
# random model counts against SEGSERVE_MAX_MODEL_WEIGHTS_BYTES; a file counts its own size.
ARCHITECTURE_WEIGHTS_BYTES = {
    "deeplabv3_mobilenet_v3_large": 44_214_268,
    "deeplabv3_resnet50": 158_782_772,
    "deeplabv3_resnet101": 234_960_588,
}


class ModelConfigError(ModelLoadError):
    """A model's config, labels or weights file is unusable; the message names the file and the field, and is
    cut to MAX_MESSAGE_CHARS: whatever it quotes, a reason stays one short sentence."""

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(message)


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 2, 60, 60
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 4


def _quoted(value: object) -> str:
    """A value from a file as a message shows it: its repr, cut short without building the whole of it."""
    return _QUOTE.repr(value)


class _RefusedYaml(yaml.YAMLError):  # type: ignore[misc,unused-ignore]  # yaml is untyped
    """A YAML document over the bounds above; its message is one clause, with the line."""


# libyaml's parser and loader where PyYAML has them (its wheels do): the pure-Python ones take several times longer.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NODE_EVENTS = (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)


def _load_yaml(text: str) -> Any:
    """A YAML document, safely loaded once its events have been checked against the bounds: an alias is
    refused where it appears, so nothing is ever expanded and no document is bigger than its text, and one
    of more than MAX_CONFIG_NODES nodes or nested deeper than MAX_CONFIG_DEPTH stops there, before anything
    is constructed."""
    nodes = depth = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise _RefusedYaml(f"line {event.start_mark.line + 1}: YAML aliases (*name) are not accepted")
        if isinstance(event, _NODE_EVENTS):
            nodes += 1
            if nodes > MAX_CONFIG_NODES:
                raise _RefusedYaml(f"line {event.start_mark.line + 1}: more than {MAX_CONFIG_NODES} values")
        if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise _RefusedYaml(f"line {event.start_mark.line + 1}: nested more than {MAX_CONFIG_DEPTH} deep")
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            depth -= 1
    return yaml.load(text, Loader=_YAML_LOADER)  # a safe loader, checked above


@dataclass(frozen=True)
class ModelConfig:
    name: str
    """What callers name it by: the repository folder's name, or the name in SEGSERVE_MODELS."""
    architecture: str
    weights: str
    """auto, pretrained, random, or the path of a state_dict file."""
    labels: tuple[Label, ...]
    max_size: int | None = None
    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    instances: int | None = None
    """SEGSERVE_MODEL_INSTANCES for this model alone (Triton's instance_group count)."""
    source: str = ""
    """Where it was configured (a config file, SEGSERVE_MODELS); empty for the single model of SEGSERVE_MODEL."""

    def settings_for(self, settings: Settings) -> ModelSettings:
        """This model's settings: the server's, with what its config overrides."""
        update: dict[str, Any] = {"model": self.architecture, "weights": self.weights}
        for field in ("max_size", "max_batch_size", "max_batch_delay_ms"):
            if getattr(self, field) is not None:
                update[field] = getattr(self, field)
        if self.instances is not None:
            update["model_instances"] = self.instances
        return settings.model_settings(**update)

    @property
    def weights_bytes(self) -> int:
        """What its weights count against SEGSERVE_MAX_MODEL_WEIGHTS_BYTES, known before loading them."""
        path = Path(self.weights)
        if self.weights not in WEIGHTS_WORDS and path.is_file():
            return path.stat().st_size
        return ARCHITECTURE_WEIGHTS_BYTES.get(self.architecture, 0)

    def where(self, field: str) -> str:
        """'models/crops/config.yaml: weights' for messages; just the field without a source."""
        return f"{self.source}: {field}" if self.source else field


@dataclass(frozen=True)
class BrokenModel:
    """A model the repository lists whose config could not be read: the others are served without it."""

    name: str
    reason: str


def check_name(name: str) -> str:
    """A model name a caller may use: letters, digits, '_', '.', '-', never a path. NOT_FOUND otherwise."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise UnknownModel(f"{name!r} is not a model name (letters, digits, '_', '.', '-'; at most 64; never a path)")
    return name


def _inside(root: Path, path: Path, what: str) -> Path:
    """`path` with symlinks followed, refused unless it stays under `root` (itself resolved)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ModelConfigError(f"{what} leads outside the model repository ({path} -> {resolved}); refused")
    return resolved


def model_folder(repository: Path, name: str) -> Path:
    check_name(name)
    folder = repository / name
    if not folder.is_dir():
        raise UnknownModel(f"no model {name!r} in the repository {repository}")
    return _inside(repository, folder, f"model folder {name}")


def _config_file(folder: Path) -> Path:
    for file_name in CONFIG_FILES:
        if (folder / file_name).is_file():
            return folder / file_name
    raise ModelConfigError(f"{folder}: no config file ({', '.join(CONFIG_FILES)})")


def _read_data(path: Path, what: str) -> Any:
    """A small JSON or YAML file, by its suffix, within the bounds of this module's docstring; any problem is
    one sentence naming the file. Never more than MAX_CONFIG_BYTES are read, whatever the file's size."""
    kind = path.suffix.lstrip(".").upper()
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ModelConfigError(f"{path}: {what} is over {MAX_CONFIG_BYTES} bytes")
        text = raw.decode("utf-8")
        return json.loads(text) if path.suffix == ".json" else _load_yaml(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: {what} cannot be read: {exc}") from None
    except _RefusedYaml as exc:
        raise ModelConfigError(f"{path}: {what} is refused: {exc}") from None
    except RecursionError:
        raise ModelConfigError(f"{path}: {what} is nested too deeply") from None
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelConfigError(f"{path}: {what} is not valid {kind}: {first}") from None


def read_labels_file(path: Path) -> tuple[Label, ...]:
    """Class names and optional colours, in class-index order, from JSON or YAML: a list of names, a list of
    {name, color}, or either under a `labels` key. Colours are '#rrggbb' or [r, g, b]."""
    data = _read_data(path, "the labels file")
    if isinstance(data, dict) and "labels" in data:
        data = data["labels"]
    if not isinstance(data, list):
        raise ModelConfigError(f"{path}: labels: expected a list of class names (or of {{name, color}})")
    names: list[str] = []
    colors: list[tuple[int, int, int] | None] = []
    for index, entry in enumerate(data):
        raw_color: object = None
        if isinstance(entry, dict):
            unknown = set(entry) - {"name", "color"}
            if unknown:
                raise ModelConfigError(f"{path}: labels[{index}]: unknown field {_quoted(min(unknown, key=str))}")
            name, raw_color = entry.get("name"), entry.get("color")
        else:
            name = entry
        if not isinstance(name, str) or not name.strip():
            raise ModelConfigError(f"{path}: labels[{index}]: the name must be a non-empty string, got {_quoted(name)}")
        color = parse_color(raw_color) if raw_color is not None else None
        if raw_color is not None and color is None:
            raise ModelConfigError(f"{path}: labels[{index}].color: {_quoted(raw_color)} is not '#rrggbb' or [r, g, b]")
        names.append(name.strip())
        colors.append(color)
    if not MIN_CLASSES <= len(names) <= MAX_CLASSES:
        raise ModelConfigError(f"{path}: labels: {len(names)} classes; a model has {MIN_CLASSES} to {MAX_CLASSES}")
    try:
        return labels_with_colors(names, colors)
    except ValueError as exc:
        raise ModelConfigError(f"{path}: labels: {exc}") from None


class ModelFile(BaseModel):
    """A model's config file (config.yaml or config.json) as pydantic parses it: unknown fields refused, numbers
    of the right kind and range (a bool is no number, a float no int). Paths are checked afterwards, against the
    repository (read_model); problems become one sentence naming the file and the field (_problem)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    architecture: ModelName
    weights: str | None = None
    """auto, pretrained, random, or a file in the model's folder."""
    labels: str | None = None
    """A JSON or YAML file in the model's folder (read_labels_file); unset: the 21 VOC classes."""
    max_size: int | None = Field(None, ge=MIN_MAX_SIZE)
    max_batch_size: int | None = Field(None, ge=1)
    max_batch_delay_ms: float | None = Field(None, ge=0)
    instances: int | None = Field(None, ge=1)
    """SEGSERVE_MODEL_INSTANCES for this model alone (Triton's instance_group count)."""


_KINDS = {"max_size": "int", "max_batch_size": "int", "max_batch_delay_ms": "float", "instances": "int"}


def _problem(path: Path, config: dict[Any, Any], errors: list[Any]) -> str:
    """The first of pydantic's errors as the one sentence a caller reads: unknown fields first, then the
    fields in CONFIG_FIELDS order."""
    unknown = [e["loc"][0] for e in errors if e["type"] in ("extra_forbidden", "invalid_key")]
    if unknown:
        field = min(unknown, key=str)
        shown = field if isinstance(field, str) and len(field) <= 60 else _quoted(field)
        return f"{path}: {shown}: unknown field; the fields are {', '.join(CONFIG_FIELDS)}"
    by_field = {e["loc"][0]: e for e in errors if e["loc"]}
    field = min(by_field, key=lambda f: CONFIG_FIELDS.index(f) if f in CONFIG_FIELDS else len(CONFIG_FIELDS))
    value = config.get(field)
    if field == "architecture":
        return f"{path}: architecture: {_quoted(value)} is none of {', '.join(ARCHITECTURES)}"
    if field == "weights":
        return f"{path}: weights: expected {', '.join(WEIGHTS_WORDS)} or a file name, got {_quoted(value)}"
    if field == "labels":
        return f"{path}: labels: name a JSON or YAML file in the model's folder"
    minimum = ModelFile.model_fields[field].metadata[0].ge
    return f"{path}: {field}: expected a {_KINDS[field]} of at least {minimum:g}, got {_quoted(value)}"


def _weights(folder: Path, repository: Path, value: object, where: Path) -> str:
    if value is None:
        return "auto"
    if not isinstance(value, str) or not value:
        raise ModelConfigError(
            f"{where}: weights: expected {', '.join(WEIGHTS_WORDS)} or a file name, got {_quoted(value)}"
        )
    if value in WEIGHTS_WORDS:
        return value
    if Path(value).is_absolute():
        raise ModelConfigError(
            f"{where}: weights: {_quoted(value)} is an absolute path; name a file in the model's folder"
        )
    path = _inside(repository, folder / value, f"{where}: weights")
    if path.suffix not in WEIGHTS_SUFFIXES:
        raise ModelConfigError(f"{where}: weights: {_quoted(value)} is not a {', '.join(WEIGHTS_SUFFIXES)} file")
    if not path.is_file():
        raise ModelConfigError(f"{where}: weights: no such file {folder / value}")
    return str(path)


def read_model(repository: Path, name: str) -> ModelConfig:
    """The config of the model in `repository`/`name`. Raises UnknownModel (no such folder) or
    ModelConfigError (one sentence naming the file and field)."""
    folder = model_folder(repository, name)
    path = _config_file(folder)
    _inside(repository, path, f"{path}")
    config = _read_data(path, "the config")
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: expected a mapping of {', '.join(CONFIG_FIELDS)}")
    try:
        parsed = ModelFile.model_validate(config)
    except ValidationError as exc:
        raise ModelConfigError(_problem(path, config, exc.errors())) from None
    labels = make_labels(VOC_CLASSES)
    if parsed.labels is not None:
        if Path(parsed.labels).is_absolute():
            raise ModelConfigError(f"{path}: labels: name a JSON or YAML file in the model's folder")
        labels_path = _inside(repository, folder / parsed.labels, f"{path}: labels")
        if not labels_path.is_file():
            raise ModelConfigError(f"{path}: labels: no such file {folder / parsed.labels}")
        labels = read_labels_file(labels_path)
    weights = _weights(folder, repository, parsed.weights, path)
    if weights in ("pretrained", "auto") and len(labels) != len(VOC_CLASSES):
        raise ModelConfigError(
            f"{path}: weights: the pretrained weights know {len(VOC_CLASSES)} classes and the labels name "
            f"{len(labels)}; give a state_dict file (or random)"
        )
    return ModelConfig(
        name=name,
        architecture=parsed.architecture,
        weights=weights,
        labels=labels,
        max_size=parsed.max_size,
        max_batch_size=parsed.max_batch_size,
        max_batch_delay_ms=parsed.max_batch_delay_ms,
        instances=parsed.instances,
        source=str(path),
    )


def repository_names(repository: Path) -> list[str]:
    """The model folders of a repository, sorted; entries that are no model name are left out."""
    if not repository.is_dir():
        raise ModelLoadError(f"SEGSERVE_MODEL_REPOSITORY: no such folder {repository}")
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name))


def parse_models_line(line: str) -> list[tuple[str, str]]:
    """'fast=deeplabv3_mobilenet_v3_large,best=deeplabv3_resnet101' (or a bare architecture, named after
    itself) to [(name, architecture)]."""
    pairs: list[tuple[str, str]] = []
    for item in (part.strip() for part in line.split(",")):
        if not item:
            continue
        name, _, architecture = item.rpartition("=")
        name = name.strip() or architecture.strip()
        architecture = architecture.strip()
        if architecture not in ARCHITECTURES:
            raise ModelLoadError(f"SEGSERVE_MODELS: {item!r}: {architecture!r} is none of {', '.join(ARCHITECTURES)}")
        try:
            check_name(name)
        except UnknownModel as exc:
            raise ModelLoadError(f"SEGSERVE_MODELS: {exc.message}") from None
        if name in (n for n, _ in pairs):
            raise ModelLoadError(f"SEGSERVE_MODELS: the name {name!r} is given twice")
        pairs.append((name, architecture))
    if not pairs:
        raise ModelLoadError("SEGSERVE_MODELS names no model: write NAME=ARCHITECTURE[,NAME=ARCHITECTURE...]")
    return pairs


def configured_models(settings: Settings) -> list[ModelConfig | BrokenModel]:
    """Every model the settings ask for, in order; a repository model whose config is broken becomes a
    BrokenModel (the others still load). A problem with the settings themselves raises ModelLoadError."""
    voc = make_labels(VOC_CLASSES)
    if settings.model_repository:
        repository = Path(settings.model_repository).expanduser()
        names = repository_names(repository)
        if not names:
            raise ModelLoadError(f"SEGSERVE_MODEL_REPOSITORY: {repository} holds no model folder")
        models: list[ModelConfig | BrokenModel] = []
        for name in names:
            try:
                models.append(read_model(repository, name))
            except (ModelConfigError, UnknownModel) as exc:
                models.append(BrokenModel(name, exc.message))
        return models
    if settings.models:
        return [
            ModelConfig(name, architecture, settings.weights, voc, source="SEGSERVE_MODELS")
            for name, architecture in parse_models_line(settings.models)
        ]
    return [ModelConfig(settings.model, settings.model, settings.weights, voc)]


def default_model_name(settings: Settings, models: list[ModelConfig | BrokenModel]) -> str:
    """SEGSERVE_DEFAULT_MODEL, or the first model listed."""
    names = [model.name for model in models]
    if settings.default_model:
        if settings.default_model not in names:
            raise ModelLoadError(
                f"SEGSERVE_DEFAULT_MODEL: {settings.default_model!r} is not configured; the models are "
                f"{', '.join(names)}"
            )
        return settings.default_model
    return names[0]
