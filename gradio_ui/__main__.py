"""`python -m gradio_ui --target localhost:50051 --port 7860`: serve the page."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from gradio_ui.settings import ui_settings_from_args
from server.settings import validation_problems


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = ui_settings_from_args(argv)
    except ValidationError as exc:
        print(f"segserve page: invalid settings: {validation_problems(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gradio_ui.app import launch  # gradio is slow to import: only after the flags are known good

    print(f"segserve page on http://{settings.host}:{settings.port} (server {settings.target}); Ctrl-C stops it")
    launch(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
