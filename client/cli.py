"""`python -m client`: segment images and videos, show model info, check health. Errors: one line, no traceback."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from tqdm import tqdm

from client.channel import DEFAULT_TARGET
from client.errors import SegmentError
from client.results import SegmentationResult
from client.security import tls_credentials
from client.sync import SegmentClient
from client.tracing import command_span
from client.video_command import add_parser as add_video_parser
from client.video_command import cmd_segment_video

DEFAULT_TIMEOUT_S = 120.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="segserve command-line client.")
    parser.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"server address, HOST:PORT or a gRPC target (env SEGSERVE_TARGET, default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds per call (default {DEFAULT_TIMEOUT_S:g}); for load, the longest to wait for the outcome "
        "(default: as long as the load takes; a load the wait gives up on goes on in the server)",
    )
    tls = parser.add_argument_group("TLS (plaintext unless --ca-file or --tls is given)")
    tls.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA certificates")
    tls.add_argument("--ca-file", type=Path, default=None, help="PEM CA file that signed the server's certificate")
    tls.add_argument("--cert", type=Path, default=None, help="PEM client certificate (servers that require one)")
    tls.add_argument("--key", type=Path, default=None, help="PEM private key of --cert")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment images; writes NAME.mask.png (and NAME.overlay.png)")
    segment.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    segment.add_argument("--out", type=Path, default=Path("."), help="output folder (default: current folder)")
    segment.add_argument("--overlay", action="store_true", help="also write NAME.overlay.png")
    segment.add_argument("--opacity", type=float, default=None, help="overlay colour weight, 0-1 (default 0.5)")
    segment.add_argument("--max-size", type=int, default=0, help="longest side fed to the model (0: server default)")
    segment.add_argument("--model", default="", help="the model to use, by name (default: the server's default)")
    for name in ("--target", "--timeout"):  # also accepted after the subcommand
        segment.add_argument(
            name,
            dest=name[2:],
            default=argparse.SUPPRESS,
            type=float if name == "--timeout" else str,
            help=argparse.SUPPRESS,
        )

    add_video_parser(commands)

    for name, help_text in (
        ("load", "load (or reload) a model of the server's repository (needs SEGSERVE_MODEL_CONTROL)"),
        ("unload", "unload a model once its requests are answered (needs SEGSERVE_MODEL_CONTROL)"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("model", metavar="MODEL", help="the model's name (its folder in the repository)")
        sub.add_argument("--target", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    for name, help_text in (
        ("info", "print a model being served and its labels"),
        ("models", "list the server's models and their state"),
        ("health", "print the serving status; exit 1 unless SERVING"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--target", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name in ("info", "health"):
            what = "whose info to print" if name == "info" else "whose health to check (model/NAME)"
            sub.add_argument("--model", default="", help=f"the model {what} (default: the server's default)")
    return parser


def _write_outputs(result: SegmentationResult, source: Path, out: Path) -> list[Path]:
    stem = source.stem if source.name == result.id else Path(result.id).stem
    written = [out / f"{stem}.mask.png"]
    written[0].write_bytes(result.mask_png)
    if result.overlay_png:
        written.append(out / f"{stem}.overlay.png")
        written[1].write_bytes(result.overlay_png)
    return written


def _describe(result: SegmentationResult, written: list[Path]) -> str:
    t = result.timing
    return (
        f"{result.id}: {result.width}x{result.height} -> {written[0]}"
        f" | {result.summary()} | {t.total_ms:.0f} ms (batch {t.batch_size})"
    )


def cmd_segment(client: SegmentClient, args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    names = [p.name for p in args.images]
    if len(set(names)) != len(names):
        print("error: two images share a file name; their masks would overwrite each other", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    options = {"max_size": args.max_size, "overlay": args.overlay, "overlay_opacity": args.opacity, "model": args.model}
    by_name = {p.name: p for p in args.images}
    failures = 0
    if len(args.images) == 1:
        results = iter([client.segment(args.images[0], **options)])
    else:
        results = client.segment_many(args.images, **options)
    progress = tqdm(total=len(args.images), unit="img", disable=len(args.images) == 1, file=sys.stderr)
    with progress:
        for result in results:
            progress.update(1)
            if result.error is not None:
                failures += 1
                progress.write(f"error: {result.id}: {result.error}", file=sys.stderr)
                continue
            written = _write_outputs(result, by_name.get(result.id, Path(result.id)), args.out)
            progress.write(_describe(result, written))
    return 1 if failures else 0


def cmd_info(client: SegmentClient, args: argparse.Namespace) -> int:
    info = client.model_info(model=args.model)
    print(f"name:           {info.name}{' (default)' if info.is_default else ''}")
    print(f"model:          {info.model}")
    print(f"weights:        {info.weights}")
    print(f"device:         {info.device}")
    print(f"runtime:        {info.runtime}")
    print(f"max size:       {info.max_size}")
    print(f"max batch size: {info.max_batch_size} (delay {info.max_batch_delay_ms:g} ms, queue {info.max_queue})")
    served = ", ".join(f"{i + 1}x{n}" for i, n in enumerate(info.batch_sizes) if n)
    print(f"batches served: {served or 'none yet'}")
    print(f"memory:         {info.resident_bytes / 2**20:.0f} MiB resident (measured at load)")
    print("labels:         " + ", ".join(f"{label.index} {label.name} {label.color}" for label in info.labels))
    if not info.weights_are_trained:
        print("warning: the server runs on RANDOM weights; its masks are meaningless (see README: weights offline)")
    return 0


def cmd_models(client: SegmentClient, args: argparse.Namespace) -> int:
    for model in client.list_models():
        default = f" (default: {model.default_reason or 'yes'})" if model.is_default else ""
        reason = f": {model.reason}" if model.reason else ""
        print(f"{model.name}{default}  {model.architecture or '?'}  {model.state}{reason}")
    return 0


def cmd_load(client: SegmentClient, args: argparse.Namespace) -> int:
    """Waits for the outcome as long as the load takes (or --timeout), printing each phase on stderr."""
    started = time.monotonic()

    def show(phase: str) -> None:
        print(f"{args.model}: {phase} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    try:
        client.load_model(args.model, timeout=args.timeout or math.inf, on_progress=show)
    except SegmentError as exc:
        if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED or args.timeout is None:
            raise
        print(
            f"{args.model}: still loading after {args.timeout:g} s (--timeout); the server goes on with it: "
            f"`python -m client models` shows how it ends",
            file=sys.stderr,
        )
        return 3
    print(f"{args.model}: loaded")
    return 0


def cmd_unload(client: SegmentClient, args: argparse.Namespace) -> int:
    client.unload_model(args.model)
    print(f"{args.model}: unloaded")
    return 0


def cmd_health(client: SegmentClient, args: argparse.Namespace) -> int:
    status = client.health(f"model/{args.model}" if args.model else "")
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {
        "segment": cmd_segment,
        "segment-video": cmd_segment_video,
        "info": cmd_info,
        "models": cmd_models,
        "load": cmd_load,
        "unload": cmd_unload,
        "health": cmd_health,
    }[args.command]
    try:
        credentials = None
        if args.tls or args.ca_file or args.cert:
            credentials = tls_credentials(args.ca_file, args.cert, args.key)
        timeout = args.timeout or DEFAULT_TIMEOUT_S
        with command_span(args.command), SegmentClient(args.target, timeout=timeout, credentials=credentials) as client:
            return command(client, args)
    except SegmentError as exc:
        where = f" ({exc.image_id})" if exc.image_id else ""
        print(f"error{where}: {exc} [target {args.target}]", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
