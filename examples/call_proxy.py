"""Call the sdproxy service's ``POST /generate`` from Python with plain httpx.

The proxy holds the Hugging Face token, so its callers (a web page, a script on another machine)
never see it. It answers in one of two ways:

* bytes mode (default ``Accept``): the image bytes, with the seed and timings in the ``X-Seed``,
  ``X-Compute-Time``, ``X-Total-Time``, ``X-Cold-Start-Wait`` and ``X-Request-ID`` headers;
* JSON mode (``Accept: application/json``): ``{"image": "<base64>", "content_type", "seed",
  "timings": {...}, "request_id"}``.

Errors are ``{"error": {"code", "message", "retry_after"?}}``; a 429 also carries ``Retry-After``.
This script saves the image as the proxy sent it (PNG or JPEG) and its metadata next to it
(``<name>.json``: prompt, parameters, seed, timings, request id).

Examples::

    SDPROXY_MODEL=user/sd-raza sdproxy serve --port 8000 &    # docs/proxy.md has its settings
    python examples/call_proxy.py --proxy-url http://127.0.0.1:8000 "a watercolor fox"
    python examples/call_proxy.py --mode json --seed 1234 --steps 20 "a watercolor fox"
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

import httpx


class ProxyError(Exception):
    """An error answered by the proxy, with its code, message and retry hint."""

    def __init__(self, status_code: int, code: str, message: str, retry_after: float | None) -> None:
        hint = f" Try again in {retry_after:.0f} s." if retry_after is not None else ""
        super().__init__(f"{message} ({code}, HTTP {status_code}).{hint}")
        self.status_code = status_code
        self.code = code
        self.retry_after = retry_after


def slugify(text: str, max_length: int = 48) -> str:
    """Lower-case ASCII words of ``text`` joined by "-" ("Portrait of Ábraza" -> "portrait-of-abraza")."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        if len(slug) + len(word) + 1 > max_length:
            break
        slug = f"{slug}-{word}" if slug else word
    return slug or "image"


def error_from(response: httpx.Response) -> ProxyError:
    """Read the proxy's error body; fall back to the status line for anything else."""
    code, message, retry_after = f"http_{response.status_code}", response.reason_phrase, None
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
        retry_after = error.get("retry_after")
    except (ValueError, KeyError, TypeError):
        pass
    if retry_after is None and response.headers.get("retry-after", "").isdigit():
        retry_after = float(response.headers["retry-after"])
    return ProxyError(response.status_code, code, message, retry_after)


def float_header(response: httpx.Response, name: str) -> float | None:
    value = response.headers.get(name)
    return float(value) if value not in (None, "") else None


def generate(client: httpx.Client, body: dict[str, Any], mode: str) -> tuple[bytes, str, dict[str, Any]]:
    """POST /generate; returns (image bytes, content type, metadata)."""
    accept = "application/json" if mode == "json" else "image/png, image/jpeg;q=0.9"
    response = client.post("/generate", json=body, headers={"Accept": accept})
    if response.is_error:
        raise error_from(response)
    if mode == "json":
        answer = response.json()
        data = base64.b64decode(answer["image"])
        meta = {"seed": answer["seed"], "timings": answer["timings"], "request_id": answer.get("request_id")}
        return data, answer["content_type"], meta
    meta = {
        "seed": int(response.headers["x-seed"]),
        "timings": {
            "total_s": float_header(response, "x-total-time"),
            "compute_s": float_header(response, "x-compute-time"),
            "cold_start_wait_s": float_header(response, "x-cold-start-wait"),
        },
        "request_id": response.headers.get("x-request-id"),
    }
    return response.content, response.headers.get("content-type", "application/octet-stream"), meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Ask the sdproxy service for one image and save it with its metadata.",
        epilog="Environment: SDPROXY_URL (default --proxy-url).",
    )
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument(
        "--proxy-url",
        default=os.environ.get("SDPROXY_URL", "http://127.0.0.1:8000"),
        help="the proxy's base URL (default: $SDPROXY_URL, else http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--mode", choices=("bytes", "json"), default="bytes", help="answer format (default bytes)"
    )
    parser.add_argument("--negative-prompt", help="what to avoid")
    parser.add_argument("--width", type=int, help="image width, a multiple of 8")
    parser.add_argument("--height", type=int, help="image height, a multiple of 8")
    parser.add_argument("--steps", type=int, help="denoising steps (1-150)")
    parser.add_argument("--guidance", type=float, help="guidance scale (0-30)")
    parser.add_argument("--seed", type=int, help="seed (default: the proxy picks one and returns it)")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where to save (default: here)")
    parser.add_argument("--timeout", type=float, default=360.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    if not args.proxy_url.startswith(("http://", "https://")):
        parser.error(f"--proxy-url must start with http:// or https://, not {args.proxy_url!r}")
    if not args.prompt.strip():
        parser.error("the prompt is empty: say what to draw")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    body: dict[str, Any] = {"prompt": args.prompt}
    optional = {
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
    }
    body.update({key: value for key, value in optional.items() if value is not None})

    # Generation can take minutes on a cold model: a long read timeout, a short connect timeout.
    timeout = httpx.Timeout(args.timeout, connect=5.0)
    try:
        with httpx.Client(base_url=args.proxy_url, timeout=timeout) as client:
            data, content_type, meta = generate(client, body, args.mode)
    except ProxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: could not reach the proxy at {args.proxy_url}: {exc}", file=sys.stderr)
        return 1

    media_type = content_type.split(";")[0].strip().lower()
    extension = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(media_type, "bin")
    path = args.out_dir / f"{slugify(args.prompt)}-{meta['seed']}.{extension}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    metadata = {"prompt": args.prompt, "parameters": body, "content_type": content_type, **meta}
    path.with_suffix(".json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    print(f"seed {meta['seed']}, {meta['timings']['total_s']} s total ({args.mode} mode)", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
