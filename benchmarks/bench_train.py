"""Benchmark of the DreamBooth training loop: time per step and peak memory, per setting.

CPU (default): the tiny model (``trainer.tiny``) at 64 px, batch 1 with prior preservation, with and
without cached latents and gradient checkpointing. Reports the median step time and the process's
peak RSS.

GPU (``--gpu``): the SD 1.5 architecture with random weights (``build_random_pipeline(size="full")``)
at 512 px, fp16 and bf16 mixed precision, with and without gradient checkpointing and text-encoder
training, plus 8-bit AdamW when bitsandbytes is installed. Reports it/s and
``torch.cuda.max_memory_allocated``. Needs a CUDA GPU (and ~6 GB of disk for the random model).

Every setting runs in a fresh process (``--child``), so peak memory is that setting's alone.

    .venv/bin/python benchmarks/bench_train.py                 # CPU, about a minute
    .venv/bin/python benchmarks/bench_train.py --gpu --steps 30
    .venv/bin/python benchmarks/bench_train.py --repeat 3 --json results.json   # noisy machines
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 2  # the first steps pay for lazy initialisation: left out of the median


def _photos(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(60, 200, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = (int(v) for v in rng.integers(0, size // 2, 2))
            draw.ellipse(
                (x, y, x + size // 3, y + size // 3), fill=tuple(int(v) for v in rng.integers(0, 255, 3))
            )
        image.save(folder / f"photo-{i}.png")
    return folder


def _settings(gpu: bool) -> list[dict[str, Any]]:
    if not gpu:
        return [
            {"name": "cached latents", "cache_latents": True, "gradient_checkpointing": False},
            {"name": "no latent cache", "cache_latents": False, "gradient_checkpointing": False},
            {
                "name": "cached latents + gradient checkpointing",
                "cache_latents": True,
                "gradient_checkpointing": True,
            },
            {
                "name": "no cache + gradient checkpointing",
                "cache_latents": False,
                "gradient_checkpointing": True,
            },
        ]
    settings = []
    for precision in ("fp16", "bf16"):
        for checkpointing in (False, True):
            for text_encoder in (False, True):
                name = precision + (" + grad ckpt" if checkpointing else "")
                name += " + text encoder" if text_encoder else ""
                settings.append(
                    {
                        "name": name,
                        "mixed_precision": precision,
                        "gradient_checkpointing": checkpointing,
                        "train_text_encoder": text_encoder,
                    }
                )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        name = "fp16 + grad ckpt + 8-bit Adam"
        settings.append(
            {"name": name, "mixed_precision": "fp16", "gradient_checkpointing": True, "use_8bit_adam": True}
        )
    return settings


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec["steps"]`` steps with one setting and measure it (runs in its own process)."""
    import torch

    from trainer.config import build_config
    from trainer.run import prepare_run, training_data
    from trainer.train import train

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    options = {k: v for k, v in spec["options"].items() if k != "name"}
    config = build_config(
        base_model=spec["base"],
        instance_dir=Path(spec["photos"]),
        instance_prompt="a photo of sks toy",
        class_prompt="a photo of a toy",
        class_dir=Path(spec["class_dir"]),
        output_dir=Path(spec["out"]),
        num_class_images=spec["num_class_images"],
        max_train_steps=spec["steps"],
        checkpointing_steps=10**6,
        train_batch_size=1,
        learning_rate=1e-5,
        **options,
    )
    prepared = prepare_run(config)
    result = train(
        prepared.record, training_data(prepared.record, prepared.checks), resume="never", save_model=False
    )
    times = result.step_times[WARMUP_STEPS:] or result.step_times
    return {
        "name": spec["options"]["name"],
        "median_step_s": statistics.median(times),
        "steps_measured": len(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": result.peak_gpu_memory / 2**20 if result.peak_gpu_memory else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="SD 1.5 architecture at 512 px on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="steps per setting (CPU 12, GPU 30)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and photos here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the settings N times, interleaved; keep each one's best"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    import torch

    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs a CUDA GPU and torch.cuda.is_available() is False here; run without --gpu for "
              "the CPU benchmark.", file=sys.stderr)  # fmt: skip
        return 2
    from trainer.class_images import ensure_class_images
    from trainer.tiny import build_random_pipeline

    steps = args.steps or (30 if args.gpu else 12)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    size = "full" if args.gpu else "tiny"
    base = work / f"base-sd1-{size}"
    if not (base / "model_index.json").exists():
        print(f"building a random SD 1.5-architecture pipeline ({size}) in {base}", file=sys.stderr)
        build_random_pipeline(base, variant="sd1", size=size)
    resolution = 512 if args.gpu else 64
    photos = _photos(work / f"photos-{resolution}", 4, resolution)
    class_dir = work / f"class-{resolution}"
    num_class_images = 4
    ensure_class_images(
        [("a photo of a toy", class_dir)],
        base_model=str(base),
        num_images=num_class_images,
        resolution=resolution,
        batch_size=2,
        num_inference_steps=2,
    )

    device = (
        torch.cuda.get_device_name()
        if args.gpu
        else f"CPU, {args.threads or torch.get_num_threads()} thread(s)"
    )
    print(f"{device}; {resolution} px, batch 1 + prior preservation, {steps} steps per setting "
          f"(median of the last {steps - WARMUP_STEPS})", file=sys.stderr)  # fmt: skip
    runs: list[dict[str, Any]] = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    if not args.gpu and args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    settings = _settings(args.gpu)
    # Interleaved repeats: on a shared machine a burst of load then hits every setting alike.
    for i, options in [(i, o) for _ in range(args.repeat) for i, o in enumerate(settings)]:
        spec = {
            "base": str(base),
            "photos": str(photos),
            "class_dir": str(class_dir),
            "num_class_images": num_class_images,
            "out": str(work / f"out-{i}"),
            "steps": steps,
            "threads": 0 if args.gpu else args.threads,
            "options": options,
        }
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{options['name']}: failed ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(line.removeprefix("RESULT "))
        result["wall_s"] = time.perf_counter() - started
        runs.append(result)
        print(f"  {result['name']}: {result['median_step_s'] * 1000:.0f} ms/step", file=sys.stderr)
    results = []
    for options in settings:
        mine = [r for r in runs if r["name"] == options["name"]]
        if mine:
            best = min(mine, key=lambda r: r["median_step_s"])
            results.append({**best, "runs": len(mine), "peak_rss_mb": max(r["peak_rss_mb"] for r in mine)})

    best = f", best of {args.repeat} interleaved runs" if args.repeat > 1 else ""
    print(f"\n{device}, {resolution} px, batch 1 with prior preservation (2 images per step){best}\n")
    if args.gpu:
        print(
            "| setting | it/s | ms/step | peak GPU memory (max_memory_allocated) |\n| --- | --- | --- | --- |"
        )
        for r in results:
            print(f"| {r['name']} | {1 / r['median_step_s']:.2f} | {r['median_step_s'] * 1000:.0f} | "
                  f"{r['peak_gpu_mb'] / 1024:.1f} GiB |")  # fmt: skip
    else:
        print("| setting | ms/step (median) | it/s | peak RSS |\n| --- | --- | --- | --- |")
        for r in results:
            print(f"| {r['name']} | {r['median_step_s'] * 1000:.0f} | {1 / r['median_step_s']:.2f} | "
                  f"{r['peak_rss_mb']:.0f} MB |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": results}, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
