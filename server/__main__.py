"""`python -m server`: run the segserve gRPC server."""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from server.app import serve
from server.operations.logs import configure_logging
from server.settings import settings_from_args, validation_problems

log = logging.getLogger("server.main")


def raise_open_file_limit() -> None:
    """Raises the soft limit on open files to the hard one, and logs the limit once. Every connection on every
    port is a descriptor, and many systems start a process with a soft limit of 1024 under a far higher hard
    one; at 1024 a few hundred idle HTTP sockets were enough to leave gRPC unable to accept. Raising the soft
    limit is what the hard limit is for (as nginx's worker_rlimit_nofile does); asyncio and gRPC poll with
    epoll, which has no 1024 ceiling."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("open files: limit %d", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # an unlimited hard limit some systems refuse as a soft one (macOS)
        log.warning("open files: limit %d; raising it to the hard limit %d failed: %s", soft, hard, exc)
        return
    log.info("open files: limit raised from %d to the hard limit %d", soft, hard)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"segserve: invalid settings: {validation_problems(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    raise_open_file_limit()
    if settings.reload:
        from server.reload import run_with_reload

        return run_with_reload(list(sys.argv[1:] if argv is None else argv), settings.grace_period_s)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
