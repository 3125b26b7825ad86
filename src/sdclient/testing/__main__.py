"""`python -m sdclient.testing`: serve the text-to-image protocol until SIGTERM/SIGINT.

Prints one line, `listening on http://127.0.0.1:PORT`, once the socket is listening.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from ..protocol import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from ._replies import Reply
from ._server import InferenceTestServer

__all__ = ["main"]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _side(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in pixels, got {text!r}") from None
    if not MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(
            f"expected a size between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} pixels, got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sdclient.testing`."""
    parser = argparse.ArgumentParser(
        prog="python -m sdclient.testing",
        description="A local server of the text-to-image protocol that answers every request "
        "with an image (after an optional cold start).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument(
        "--cold-start",
        type=_seconds,
        default=None,
        metavar="S",
        help="answer 503 'loading' for S seconds from the first request",
    )
    parser.add_argument("--delay", type=_seconds, default=0.0, metavar="S", help="seconds each image takes")
    parser.add_argument("--format", choices=("jpeg", "png", "webp"), default="jpeg", help="image format")
    parser.add_argument(
        "--size",
        type=_side,
        default=64,
        metavar="PX",
        help="image side when the request gives no width/height (default 64)",
    )
    parser.add_argument("--model-id", default="test/model", help="model served at / (default test/model)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT.

    Args:
        argv: Command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The exit code.
    """
    args = build_parser().parse_args(argv)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    server = InferenceTestServer(
        args.host,
        args.port,
        model_id=args.model_id,
        default=Reply.image(format=args.format, delay=args.delay),
        image_size=args.size,
        keep_records=False,  # nobody can read them from outside; `GET /stats` has the counters
    )
    try:
        server.start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.cold_start is not None:
            server.cold_start(args.cold_start)
        print(f"listening on {server.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
