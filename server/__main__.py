"""`python -m server`: run the segserve gRPC server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from server.app import serve
from server.operations.logs import configure_logging
from server.settings import settings_from_args, validation_problems


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"segserve: invalid settings: {validation_problems(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if settings.reload:
        from server.reload import run_with_reload

        return run_with_reload(list(sys.argv[1:] if argv is None else argv), settings.grace_period_s)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
