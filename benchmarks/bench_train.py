"""Benchmark of the DreamBooth training loop: time per step, peak memory and trainable parameters.

CPU (default): the tiny models (``trainer.tiny``) at 64 px, batch 1 with prior preservation. On the
tiny SD 1 model: LoRA with and without cached latents and gradient checkpointing, and a full
fine-tune; on the tiny SDXL model: LoRA; on the tiny FLUX.1-dev-architecture model: LoRA on the
transformer (flow matching, cached prompt embeddings and latents). Reports the median step time, the
process's peak RSS and the number of trained parameters, then LoRA beside full and SDXL and FLUX
beside SD 1 with their ratios.

GPU (``--gpu``): the SD 1.5 and SDXL base architectures with random weights
(``build_random_pipeline(size="full")``), LoRA at 512 px (SD 1.5) and 1024 px (SDXL), fp16 and bf16
mixed precision, with and without gradient checkpointing, plus 8-bit AdamW when bitsandbytes is
installed (skipped with a message otherwise), and one SD 1.5 full fine-tune for the LoRA/full ratio.
Reports it/s and ``torch.cuda.max_memory_allocated``. Needs a CUDA GPU and ~20 GB of disk for the
two random models. Sized to finish in under 8 minutes on an H100/H200 with the default 15 steps
(estimated, not yet timed; every setting has a time limit, ``--setting-timeout``).

Every setting runs in a fresh process (``--child``), so peak memory is that setting's alone. The
class images are synthetic pictures like the photos (what they show does not change a step's cost).

    .venv/bin/python benchmarks/bench_train.py                 # CPU, about a minute
    .venv/bin/python benchmarks/bench_train.py --gpu
    .venv/bin/python benchmarks/bench_train.py --repeat 3 --json results.json   # noisy machines
    .venv/bin/python benchmarks/bench_train.py --only FLUX     # the settings whose name has "FLUX"
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


def _photos(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
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


# The base models and the training size of each on the CPU (tiny) and on a GPU (full size).
RESOLUTION = {
    ("sd1", False): 64,
    ("sdxl", False): 64,
    ("flux", False): 64,
    ("sd1", True): 512,
    ("sdxl", True): 1024,
}
ARCHITECTURE_NAME = {"sd1": "SD 1.5", "sdxl": "SDXL", "flux": "FLUX.1"}


def _setting(name: str, variant: str, method: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "variant": variant, "method": method, **options}


def _settings(gpu: bool) -> list[dict[str, Any]]:
    if not gpu:
        return [
            _setting("SD 1 LoRA, cached latents", "sd1", "lora", cache_latents=True),
            _setting("SD 1 LoRA, no latent cache", "sd1", "lora", cache_latents=False),
            _setting(
                "SD 1 LoRA, cached latents + gradient checkpointing",
                "sd1",
                "lora",
                cache_latents=True,
                gradient_checkpointing=True,
            ),
            _setting(
                "SD 1 LoRA, no cache + gradient checkpointing",
                "sd1",
                "lora",
                cache_latents=False,
                gradient_checkpointing=True,
            ),
            _setting("SD 1 full, cached latents", "sd1", "full", cache_latents=True),
            _setting("SDXL LoRA, cached latents", "sdxl", "lora", cache_latents=True),
            _setting("FLUX LoRA, cached latents", "flux", "lora", cache_latents=True),
        ]
    import importlib.util

    eight_bit = importlib.util.find_spec("bitsandbytes") is not None
    if not eight_bit:
        print("bitsandbytes is not installed: the 8-bit AdamW settings are skipped "
              "(`pip install bitsandbytes` to include them)", file=sys.stderr)  # fmt: skip
    settings = []
    for variant in ("sd1", "sdxl"):
        arch = ARCHITECTURE_NAME[variant]
        for precision in ("fp16", "bf16"):
            for checkpointing in (False, True):
                name = f"{arch} LoRA {precision}" + (" + grad ckpt" if checkpointing else "")
                settings.append(
                    _setting(
                        name, variant, "lora", mixed_precision=precision, gradient_checkpointing=checkpointing
                    )
                )
        if eight_bit:
            settings.append(
                _setting(
                    f"{arch} LoRA fp16 + grad ckpt + 8-bit AdamW",
                    variant,
                    "lora",
                    mixed_precision="fp16",
                    gradient_checkpointing=True,
                    use_8bit_adam=True,
                )
            )
    settings.append(_setting("SD 1.5 full fp16", "sd1", "full", mixed_precision="fp16"))
    return settings


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec["steps"]`` steps with one setting and measure it (runs in its own process)."""
    import torch

    from trainer.config import build_config
    from trainer.run import prepare_run, training_data
    from trainer.train import train

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    options = {k: v for k, v in spec["options"].items() if k not in ("name", "variant")}
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
        "trainable_parameters": result.trainable_parameters,
        "resolution": prepared.record.resolution,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gpu", action="store_true", help="SD 1.5 (512 px) and SDXL (1024 px) architectures on CUDA"
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per setting (CPU 12, GPU 15)")
    parser.add_argument(
        "--setting-timeout", type=float, default=None, help="seconds allowed per setting (CPU 600, GPU 100)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and photos here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the settings N times, interleaved; keep each one's best"
    )
    parser.add_argument("--only", default=None, help="run only the settings whose name contains this")
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
    from trainer.tiny import build_random_pipeline

    steps = args.steps or (15 if args.gpu else 12)
    timeout = args.setting_timeout or (100.0 if args.gpu else 600.0)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    size = "full" if args.gpu else "tiny"
    settings = [s for s in _settings(args.gpu) if args.only is None or args.only in s["name"]]
    started_all = time.perf_counter()
    data: dict[str, tuple[Path, Path, Path]] = {}  # variant: base model, photos, class images
    for variant in dict.fromkeys(s["variant"] for s in settings):
        base = work / f"base-{variant}-{size}"
        if not (base / "model_index.json").exists():
            print(f"building a random {variant} pipeline ({size}) in {base}", file=sys.stderr)
            build_random_pipeline(base, variant=variant, size=size)  # type: ignore[arg-type]
        resolution = RESOLUTION[variant, args.gpu]
        photos = _photos(work / f"photos-{resolution}", 4, resolution)
        class_dir = _photos(work / f"class-{resolution}", 4, resolution, seed=1)
        data[variant] = (base, photos, class_dir)

    device = (
        torch.cuda.get_device_name()
        if args.gpu
        else f"CPU, {args.threads or torch.get_num_threads()} thread(s)"
    )
    print(f"{device}; batch 1 + prior preservation, {steps} steps per setting "
          f"(median of the last {steps - WARMUP_STEPS})", file=sys.stderr)  # fmt: skip
    runs: list[dict[str, Any]] = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    if not args.gpu and args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    # Interleaved repeats: on a shared machine a burst of load then hits every setting alike.
    for i, options in [(i, o) for _ in range(args.repeat) for i, o in enumerate(settings)]:
        base, photos, class_dir = data[options["variant"]]
        spec = {
            "base": str(base),
            "photos": str(photos),
            "class_dir": str(class_dir),
            "num_class_images": 4,
            "out": str(work / f"out-{i}"),
            "steps": steps,
            "threads": 0 if args.gpu else args.threads,
            "options": {**options, "resolution": RESOLUTION[options["variant"], args.gpu]},
        }
        started = time.perf_counter()
        command = [sys.executable, __file__, "--child", json.dumps(spec)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{options['name']}: over its {timeout:.0f} s limit, skipped", file=sys.stderr)
            continue
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{options['name']}: failed ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(line.removeprefix("RESULT "))
        result["wall_s"] = time.perf_counter() - started
        runs.append(result)
        print(f"  {result['name']}: {result['median_step_s'] * 1000:.0f} ms/step "
              f"({result['wall_s']:.0f} s)", file=sys.stderr)  # fmt: skip
    results = []
    for options in settings:
        mine = [r for r in runs if r["name"] == options["name"]]
        if mine:
            best = min(mine, key=lambda r: r["median_step_s"])
            results.append({**best, "runs": len(mine), "peak_rss_mb": max(r["peak_rss_mb"] for r in mine)})

    best = f", best of {args.repeat} interleaved runs" if args.repeat > 1 else ""
    print(f"\n{device}, batch 1 with prior preservation (2 images per step){best}, "
          f"{time.perf_counter() - started_all:.0f} s in all\n")  # fmt: skip
    memory = "peak GPU memory" if args.gpu else "peak RSS"
    print(f"| setting | px | ms/step (median) | it/s | {memory} | trained parameters |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['name']} | {r['resolution']} | {r['median_step_s'] * 1000:.0f} | "
              f"{1 / r['median_step_s']:.2f} | {_memory(r, args.gpu)} | "
              f"{r['trainable_parameters']:,} |")  # fmt: skip
    comparisons = _comparisons(results, args.gpu)
    if comparisons:
        print("\n| comparison | A | B | A / B |\n| --- | ---: | ---: | ---: |")
        for label, a, b, ratio in comparisons:
            print(f"| {label} | {a} | {b} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": results}, indent=2))
    return 0 if results else 1


def _memory(result: dict[str, Any], gpu: bool) -> str:
    if gpu:
        return f"{result['peak_gpu_mb'] / 1024:.1f} GiB" if result["peak_gpu_mb"] else "-"
    return f"{result['peak_rss_mb']:.0f} MB"


def _comparisons(results: list[dict[str, Any]], gpu: bool) -> list[tuple[str, str, str, str]]:
    """LoRA beside a full fine-tune (SD 1), and SDXL LoRA beside SD 1 LoRA, with their ratios."""
    by_name = {r["name"]: r for r in results}
    if gpu:
        lora, full = by_name.get("SD 1.5 LoRA fp16"), by_name.get("SD 1.5 full fp16")
        sdxl = by_name.get("SDXL LoRA fp16")
        flux = None
        memory_key, memory_label = "peak_gpu_mb", "peak GPU memory (MiB)"
    else:
        lora, full = by_name.get("SD 1 LoRA, cached latents"), by_name.get("SD 1 full, cached latents")
        sdxl = by_name.get("SDXL LoRA, cached latents")
        flux = by_name.get("FLUX LoRA, cached latents")
        memory_key, memory_label = "peak_rss_mb", "peak RSS (MB)"
    rows = []
    if lora and full:
        rows.append(
            (
                "step time (ms): full / LoRA",
                f"{full['median_step_s'] * 1000:.0f}",
                f"{lora['median_step_s'] * 1000:.0f}",
                f"{full['median_step_s'] / lora['median_step_s']:.2f}x",
            )
        )
        if full[memory_key] and lora[memory_key]:
            rows.append(
                (
                    f"{memory_label}: full / LoRA",
                    f"{full[memory_key]:.0f}",
                    f"{lora[memory_key]:.0f}",
                    f"{full[memory_key] / lora[memory_key]:.2f}x",
                )
            )
        rows.append(
            (
                "trained parameters: full / LoRA",
                f"{full['trainable_parameters']:,}",
                f"{lora['trainable_parameters']:,}",
                f"{full['trainable_parameters'] / lora['trainable_parameters']:.0f}x",
            )
        )
    if lora and sdxl:
        rows.append(
            (
                "step time (ms): SDXL LoRA / SD 1 LoRA",
                f"{sdxl['median_step_s'] * 1000:.0f}",
                f"{lora['median_step_s'] * 1000:.0f}",
                f"{sdxl['median_step_s'] / lora['median_step_s']:.2f}x",
            )
        )
    if lora and flux:
        rows.append(
            (
                "step time (ms): FLUX LoRA / SD 1 LoRA",
                f"{flux['median_step_s'] * 1000:.0f}",
                f"{lora['median_step_s'] * 1000:.0f}",
                f"{flux['median_step_s'] / lora['median_step_s']:.2f}x",
            )
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
