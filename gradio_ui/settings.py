"""The page's settings: SEGSERVE_UI_* environment variables, overridable by flags of `python -m gradio_ui`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class UISettings(BaseSettings):
    """Each field is SEGSERVE_UI_<NAME> in the environment and --<name> on the command line."""

    model_config = SettingsConfigDict(env_prefix="SEGSERVE_UI_", extra="ignore")

    target: str = Field("localhost:50051", description="The segserve gRPC server the page talks to (HOST:PORT).")
    host: str = Field(
        "127.0.0.1", description="Address the page listens on; 0.0.0.0 opens it to the network (never shared publicly)."
    )
    port: int = Field(7860, ge=1, le=65535, description="HTTP port of the page.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds the page waits for one segmentation.")


def build_parser(
    prog: str = "python -m gradio_ui", description: str = "segserve's Gradio page."
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    for name, field in UISettings.model_fields.items():
        env = "SEGSERVE_UI_" + name.upper()
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar=name.upper(),
            help=f"{field.description} [env {env}, default: {field.default}]",
        )
    return parser


def ui_settings_from_args(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> UISettings:
    """Environment first; flags given on the command line win."""
    overrides: dict[str, Any] = vars((parser or build_parser()).parse_args(argv))
    return UISettings(**overrides)
