"""Call a dedicated Hugging Face Inference Endpoint that serves your fine-tuned model.

Since 2025 the serverless router serves a curated set of warm models only: a model you trained
yourself is served by a dedicated Endpoint (``https://xxxx.<region>.aws.endpoints.huggingface.cloud``),
or self-hosted with ``sdtrain serve``. Both are called with the model's full URL.

Cold starts: an Endpoint configured to *scale to zero* stops its replica after a quiet period, and
the next request wakes it. Starting a GPU replica and loading the weights takes from tens of
seconds to a few minutes; meanwhile the Endpoint answers ``503`` (a JSON "loading" body with
``estimated_time``, or an HTML page from the gateway). There are two ways to wait:

* the client waits: ``SDClient`` retries the 503s until ``--max-wait`` seconds have passed
  (concurrent requests share one wait), and reports each new ETA through ``on_event``;
* the Endpoint waits: ``X-Scale-Up-Timeout: <seconds>`` (``--scale-up-timeout``) asks the Endpoint
  to hold the request while the replica starts instead of answering 503.

Pick ``--max-wait`` longer than the slowest cold start you expect. The token (``HF_TOKEN`` or
``hf auth login``) is sent to ``*.huggingface.cloud`` hosts only; ``--send-token`` sends it to any
URL (for a self-hosted server behind your own authentication).

Examples::

    export HF_TOKEN=hf_...
    python examples/inference_endpoint.py \\
        --endpoint-url https://xxxx.us-east-1.aws.endpoints.huggingface.cloud \\
        --scale-up-timeout 120 "portrait of abraza man, studio lighting"
    SD_ENDPOINT_URL=http://127.0.0.1:7860 python examples/inference_endpoint.py --seed 7 "a lighthouse"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import get_token

from sdclient import GeneratedImage, GenerationEvent, ModelLoadingTimeout, SDClient, SDClientError


class ColdStartReporter:
    """Prints what the client knows about a cold start while it waits."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.waits = 0

    def __call__(self, event: GenerationEvent) -> None:
        elapsed = time.monotonic() - self.started
        if event.kind == "loading":
            self.waits += 1
            eta = f"ready in about {event.eta_s:.0f} s" if event.eta_s is not None else "no estimate given"
            print(f"[{elapsed:5.1f} s] the endpoint is starting up: {eta}", file=sys.stderr)
        elif event.kind == "retrying":
            reason = event.message or "transient error"
            print(f"[{elapsed:5.1f} s] retrying ({reason})", file=sys.stderr)
        elif event.kind == "done":
            print(f"[{elapsed:5.1f} s] image received", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate an image with a dedicated Inference Endpoint, waiting out cold starts.",
        epilog="Environment: SD_ENDPOINT_URL (default --endpoint-url), HF_TOKEN.",
    )
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument(
        "--endpoint-url",
        default=os.environ.get("SD_ENDPOINT_URL"),
        help="the Endpoint's URL, from its page on ui.endpoints.huggingface.co ($SD_ENDPOINT_URL)",
    )
    parser.add_argument(
        "--scale-up-timeout",
        type=int,
        help="ask the Endpoint to hold the request up to this many seconds while it scales up from zero",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=600.0,
        help="seconds the client waits for a cold start (default 600)",
    )
    parser.add_argument(
        "--send-token", action="store_true", help="send the token even to non-Hugging Face hosts"
    )
    parser.add_argument("--negative-prompt", help="what to avoid")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--guidance", type=float, help="guidance scale")
    parser.add_argument("--seed", type=int, help="seed (default: random, recorded in the PNG)")
    parser.add_argument(
        "--out", type=Path, default=Path("endpoint.png"), help="PNG to write (default endpoint.png)"
    )
    args = parser.parse_args(argv)
    if not args.endpoint_url:
        parser.error("no endpoint: pass --endpoint-url https://... or set SD_ENDPOINT_URL")
    parts = urlsplit(args.endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        parser.error(f"--endpoint-url must be a full http(s):// URL, not {args.endpoint_url!r}")
    if args.scale_up_timeout is not None and args.scale_up_timeout <= 0:
        parser.error("--scale-up-timeout must be a positive number of seconds")
    if args.out.suffix.lower() != ".png":
        parser.error(f"--out must end in .png (the metadata is stored as PNG text chunks), not {args.out}")
    return args


async def generate(args: argparse.Namespace, reporter: ColdStartReporter) -> GeneratedImage:
    headers = {}
    if args.scale_up_timeout is not None:
        headers["X-Scale-Up-Timeout"] = str(args.scale_up_timeout)
    # An explicit token is sent to any URL; a discovered one only to Hugging Face hosts.
    token = get_token() if args.send_token else None
    async with SDClient(
        args.endpoint_url,
        token=token,
        headers=headers,
        max_wait_for_model=args.max_wait,
        on_event=reporter,
    ) as client:
        return await client.generate(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reporter = ColdStartReporter()
    try:
        image = asyncio.run(generate(args, reporter))
    except ModelLoadingTimeout as exc:
        print(
            f"error: the endpoint was still starting after {exc.waited_s:.0f} s. Raise --max-wait, "
            "or check the Endpoint's logs for a failed start.",
            file=sys.stderr,
        )
        return 1
    except SDClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    args.out.parent.mkdir(parents=True, exist_ok=True)
    saved = image.save(args.out)
    waited = image.timings.cold_start_wait_s
    cold = f"after a {waited:.1f} s cold start" if waited else "from a warm endpoint"
    print(
        f"seed {image.request.seed}, {image.timings.total_s:.2f} s total {cold}, "
        f"{image.attempts} attempt(s), hardware {image.compute_type or 'unknown'}",
        file=sys.stderr,
    )
    print(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
