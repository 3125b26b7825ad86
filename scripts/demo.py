"""The offline demo: photos in, a fine-tuned model behind a web page out, on a CPU, in minutes.

1. builds a tiny randomly initialised Stable Diffusion as the base model (`sdtrain tiny-model`),
2. draws a few photos of a cat (the "instance" photos),
3. runs the whole DreamBooth flow on them (`sdtrain run`: check, class images, train, samples,
   export),
4. serves the fine-tuned model over the Inference API protocol (`sdtrain serve`),
5. starts the proxy in front of it with the built React page (`sdproxy serve`),
6. prints the page's URL, or with `--check` generates one image through the page in headless
   Chromium, saves a screenshot and exits.

With `--provider fal-ai` step 4 is the route a published LoRA takes on Hugging Face instead: a fake
of the Hub (which lists the adapter as served by fal-ai), the router and fal-ai's queue
(`sdclient.testing.FakeRouter`) stands in for them, and the proxy finds the provider the way it
would online (`SDPROXY_PROVIDER=auto`). The fake draws placeholder images, not the model's.

Run it with `scripts/demo` (which installs what it needs first). Nothing is downloaded: the base
model is random, so the images are abstract colour fields; with a GPU and a real base model the same
commands train the real thing (see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WEB_DIST = ROOT / "examples" / "react-app" / "dist"
MODEL_ID = "demo/sks-cat"
INSTANCE_PROMPT = "a photo of sks cat"
CLASS_PROMPT = "a photo of a cat"
SAMPLE_PROMPT = "a photo of sks cat wearing a hat"


def log(message: str) -> None:
    print(f"==> {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def draw_cat_photos(folder: Path, count: int = 5, size: int = 128, seed: int = 7) -> list[Path]:
    """Draw `count` simple cat pictures (the demo's instance photos) as JPEG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        bg = tuple(rng.randint(150, 240) for _ in range(3))
        fur = (rng.randint(200, 240), rng.randint(110, 150), rng.randint(30, 70))
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        cx, cy = size // 2 + rng.randint(-12, 12), size // 2 + rng.randint(-6, 10)
        r = size // 4 + rng.randint(-4, 6)
        d.ellipse((cx - r, cy - r // 2, cx + r, cy + r + r // 2), fill=fur)  # body
        hr = int(r * 0.7)
        hx, hy = cx + rng.randint(-6, 6), cy - r
        d.polygon(
            [(hx - hr, hy - hr // 3), (hx - hr // 2, hy - hr - hr // 2), (hx - hr // 6, hy - hr)], fill=fur
        )
        d.polygon(
            [(hx + hr, hy - hr // 3), (hx + hr // 2, hy - hr - hr // 2), (hx + hr // 6, hy - hr)], fill=fur
        )
        d.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=fur)  # head
        for ex in (hx - hr // 3, hx + hr // 3):
            d.ellipse((ex - 4, hy - 4, ex + 4, hy + 4), fill=(30, 120, 40))
        d.polygon([(hx - 3, hy + 6), (hx + 3, hy + 6), (hx, hy + 10)], fill=(220, 90, 110))
        path = folder / f"cat-{i + 1}.jpg"
        img.save(path, quality=92)
        paths.append(path)
    return paths


def run(cmd: list[str], **kwargs: object) -> None:
    log(" ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)))
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


@contextmanager
def background(
    cmd: list[str], log_file: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server in the background; stop it (SIGTERM, then SIGKILL) on the way out."""
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def wait_http(url: str, proc: subprocess.Popen[bytes], log_file: Path, timeout: float = 120.0) -> None:
    """Wait until `url` answers (any status below 500), or fail with the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}); its log:\n{log_file.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    sys.exit(f"{url} did not answer within {timeout:.0f} s; log: {log_file}")


def check_in_browser(page_url: str, screenshot: Path, source: str) -> None:
    """Generate one image through the page in headless Chromium and save a screenshot."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        sys.exit(
            f"--check needs Chromium at {chromium}: `apt-get install -y chromium` (Debian) or set CHROMIUM."
        )
    log(f"checking the page in headless Chromium: {page_url}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(page_url)
        page.get_by_test_id("prompt").fill(SAMPLE_PROMPT)
        page.get_by_test_id("generate").click()
        image = page.get_by_test_id("gallery-image").first
        error = page.get_by_test_id("error-message")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Whichever comes first: the image, decoded, or an error message on the page.
            page.wait_for_function(
                "() => { const i = document.querySelector('[data-testid=gallery-image]');"
                " return (i && i.complete && i.naturalWidth > 0)"
                " || document.querySelector('[data-testid=error-message]'); }",
                timeout=180_000,
            )
        finally:
            page.screenshot(path=str(screenshot), full_page=True)
        message = error.inner_text() if error.count() else None
        width = None if message else image.evaluate("img => img.naturalWidth")
        browser.close()
    if message:
        sys.exit(f"the page showed an error: {message} (screenshot: {screenshot}; logs: {screenshot.parent})")
    log(f"the page showed a {width} px image from {source}; screenshot: {screenshot}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / ".demo", help="where everything is written")
    parser.add_argument("--port", type=int, default=8000, help="the web page's port (0: any free port)")
    parser.add_argument("--steps", type=int, default=60, help="training steps (the tiny model learns fast)")
    parser.add_argument(
        "--check", action="store_true", help="generate one image in headless Chromium and exit"
    )
    parser.add_argument(
        "--method",
        choices=["lora", "full"],
        default="lora",
        help="train a LoRA adapter (the default) or fine-tune the whole UNet",
    )
    parser.add_argument(
        "--provider",
        choices=["local", "fal-ai"],
        default="local",
        help="serve the run with `sdtrain serve` (local, the default) or through a fake of Hugging Face's "
        "router and fal-ai's queue (the route of a published LoRA)",
    )
    parser.add_argument("--fresh", action="store_true", help="start over instead of reusing an earlier run")
    args = parser.parse_args(argv)
    if args.provider != "local" and args.method != "lora":
        parser.error("Inference Providers serve LoRA adapters: use --method lora with --provider")

    work: Path = args.workdir.resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    base, photos, run_dir = work / "base", work / "photos", work / f"run-{args.method}"
    sdtrain, sdproxy = str(BIN / "sdtrain"), str(BIN / "sdproxy")

    if not (base / "model_index.json").exists():
        run([sdtrain, "tiny-model", str(base)])
    if not photos.exists():
        log(f"drawing instance photos in {photos}")
        draw_cat_photos(photos)
    trained = run_dir / ("lora/pytorch_lora_weights.safetensors" if args.method == "lora" else "model")
    if not trained.exists():
        run(
            [
                sdtrain, "run",
                "--method", args.method,
                "--base-model", str(base),
                "--instance-dir", str(photos),
                "--instance-prompt", INSTANCE_PROMPT,
                "--class-prompt", CLASS_PROMPT,
                "--num-class-images", "8",
                "--class-image-steps", "10",
                "--max-train-steps", str(args.steps),
                "--sample-prompt", SAMPLE_PROMPT,
                "--sample-steps", "20",
                "--output", str(run_dir),
            ]
        )  # fmt: skip
    if not (WEB_DIST / "index.html").exists():
        log("building the React page")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB_DIST.parent, check=True)
        subprocess.run(["npm", "run", "build"], cwd=WEB_DIST.parent, check=True)

    page_port = args.port or free_port()
    env = dict(os.environ)
    env.pop("HF_TOKEN", None)  # nothing here needs a token: never send one anywhere in the demo
    env.update(
        {
            "SDPROXY_STATIC_DIR": str(WEB_DIST),
            "SDPROXY_ALLOWED_ORIGINS": f'["http://127.0.0.1:{page_port}","http://localhost:{page_port}"]',
        }
    )
    with contextlib.ExitStack() as stack:
        if args.provider == "local":
            env["SDPROXY_MODEL"] = serve_locally(stack, sdtrain, run_dir, work / "serve.log")
        else:
            env.update(fake_fal_ai(stack))
        proxy_log = work / "proxy.log"
        proxy_cmd = [sdproxy, "serve", "--host", "127.0.0.1", "--port", str(page_port)]
        log(f"starting the proxy and the web page on 127.0.0.1:{page_port} (log: {proxy_log})")
        proxy = stack.enter_context(background(proxy_cmd, proxy_log, env=env))
        wait_http(f"http://127.0.0.1:{page_port}/healthz", proxy, proxy_log)
        page_url = f"http://127.0.0.1:{page_port}/app/"
        if args.check:
            source = "the fine-tuned model" if args.provider == "local" else f"the fake {args.provider}"
            check_in_browser(page_url, work / "screenshot.png", source)
            return
        print(f"\n  Open {page_url} and generate with a prompt such as '{SAMPLE_PROMPT}'.")
        print(f"  Samples from training: {run_dir / 'samples'}   Run folder: {run_dir}")
        print("  Press Ctrl-C to stop.\n", flush=True)
        try:
            while proxy.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print()
            log("stopping")


def serve_locally(stack: contextlib.ExitStack, sdtrain: str, run_dir: Path, serve_log: Path) -> str:
    """`sdtrain serve` the run folder (the base model with the adapter, or the whole model) in the
    background; the URL the proxy sends to."""
    serve_port = free_port()
    serve_cmd = [sdtrain, "serve", str(run_dir), "--port", str(serve_port), "--model-id", MODEL_ID]
    log(f"serving the fine-tuned model on 127.0.0.1:{serve_port} (log: {serve_log})")
    serve = stack.enter_context(background(serve_cmd, serve_log))
    wait_http(f"http://127.0.0.1:{serve_port}/health", serve, serve_log)
    return f"http://127.0.0.1:{serve_port}/models/{MODEL_ID}"


def fake_fal_ai(stack: contextlib.ExitStack) -> dict[str, str]:
    """A fake Hub that lists the run's adapter as served by fal-ai, with the router and fal-ai's
    queue (each job waits 2 s in it, then runs 1 s); the proxy's settings for it."""
    from sdclient.testing import FakeRouter, JobScript

    router = stack.enter_context(FakeRouter())
    # fal-ai serves SD/SDXL LoRAs through fal-ai/lora, with the adapter file of the Hub repo.
    router.add_model(MODEL_ID, "fal-ai", "fal-ai/lora", lora="pytorch_lora_weights.safetensors")
    router.script("fal-ai", *[JobScript(queue_s=2.0, run_s=1.0)] * 100)
    log(f"a fake Hugging Face Hub, router and fal-ai queue on {router.url} (placeholder images)")
    return {
        "SDPROXY_MODEL": MODEL_ID,
        "SDPROXY_PROVIDER": "auto",
        "SDPROXY_ROUTER_URL": router.url,
        "SDPROXY_HUB_URL": router.url,
        "HF_HUB_OFFLINE": "0",
    }


if __name__ == "__main__":
    main()
