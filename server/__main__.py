"""`python -m server`: run the segserve gRPC server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from server.app import serve
from server.settings import Settings, settings_from_args, validation_problems


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"segserve: invalid settings: {validation_problems(exc)}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    if settings.reload:
        from server.reload import run_with_reload

        return run_with_reload(list(sys.argv[1:] if argv is None else argv), settings.grace_period_s)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
