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

GPU, FLUX.1-dev (``--gpu --only FLUX`` for these alone): the real transformer architecture
(``trainer.tiny.flux_transformer_config``: 19 double and 38 single blocks, 3072 wide, 24 heads,
guidance embedding) with random bf16 weights built on the GPU, nothing saved. The text encoders and
the VAE are left out: the trainer caches their outputs, so random T5 (512 x 4096) and CLIP pooled
(768) embeddings and random latents stand in. LoRA rank 16 on the attention projections of both
streams, batch 1 (no prior preservation), bf16 at 512 and 1024 px with and without gradient
checkpointing, then each installed quantized base (``--quantize-base`` nf4, int8) at 1024 px with
checkpointing and 8-bit AdamW. The step uses the trainer's LoRA setup, optimizer, noise levels,
flow-matching pair and loss (``flux_gpu_child``); the table is followed by the targets: >= 1.5 it/s
at 512 px, <= 24 GB peak with a quantized base and checkpointing. Estimated at 4-5 minutes for the
FLUX settings (not yet timed).

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
# A FLUX.1-dev GPU setting builds (and maybe quantizes) 12B random weights before its first step.
FLUX_GPU_TIMEOUT = 150.0
# The FLUX.1-dev targets on an H100/H200-class GPU.
FLUX_TARGET_IT_S_512 = 1.5  # bf16 LoRA at 512 px
FLUX_TARGET_PEAK_GB_QUANTIZED = 24.0  # quantized base + gradient checkpointing


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
    return settings + _flux_gpu_settings(eight_bit)


def _flux_gpu_settings(eight_bit: bool) -> list[dict[str, Any]]:
    """FLUX.1-dev LoRA in bf16 at 512 and 1024 px, with and without gradient checkpointing, then the
    quantized bases (each back-end that is installed) at 1024 px with checkpointing and 8-bit AdamW
    (when bitsandbytes is installed)."""
    import importlib.util

    from trainer.quantize import QUANTIZE_BACKENDS

    settings = []
    for resolution in (512, 1024):
        for checkpointing in (False, True):
            name = f"FLUX.1-dev LoRA bf16 {resolution}" + (" + grad ckpt" if checkpointing else "")
            settings.append(
                _setting(name, "flux", "lora", resolution=resolution, gradient_checkpointing=checkpointing)
            )
    for kind, package in QUANTIZE_BACKENDS.items():
        if importlib.util.find_spec(package) is None:
            print(f"{package} is not installed: the FLUX {kind} settings are skipped "
                  f"(`pip install 'sdclient[gpu]'` to include them)", file=sys.stderr)  # fmt: skip
            continue
        adam = " + 8-bit AdamW" if eight_bit else ""
        settings.append(
            _setting(
                f"FLUX.1-dev LoRA {kind} 1024 + grad ckpt{adam}",
                "flux",
                "lora",
                resolution=1024,
                gradient_checkpointing=True,
                quantize_base=kind,
                use_8bit_adam=eight_bit,
            )
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
    if spec["gpu"] and spec["options"]["variant"] == "flux":
        return flux_gpu_child(spec)
    options = {k: v for k, v in spec["options"].items() if k not in ("name", "variant")}
    config = build_config(
        base_model=spec["base"],
        instance_dir=Path(spec["photos"]),
        instance_prompt="a photo of sks toy",
        class_prompt="a photo of a toy",
        class_dir=Path(spec["class_dir"]),
        with_prior_preservation=True,  # every setting alike (FLUX's default is off)
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


def flux_gpu_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Time LoRA steps of a random FLUX.1-dev transformer (no text encoders, no VAE: their outputs
    are cached by the trainer, so random embeddings and latents of the right shapes stand in).

    The model is built directly on the GPU in bf16 (and quantized there, into the layers the trainer
    loads); the LoRA, optimizer, noise levels, flow-matching pair, prediction and loss are the
    trainer's own.
    Peak memory is counted from the first step, so the bf16 weights a quantized setting starts
    from (never held by the trainer, which quantizes while loading) are not in it.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from trainer.config import FLUX_ATTENTION_EXTRA, LORA_TARGET_PRESETS, RunRecord
    from trainer.quantize import prepare_quantized_for_training, quantize_in_memory
    from trainer.tiny import flux_transformer_config
    from trainer.train import add_lora_adapters, optimizer_and_schedule
    from trainer.train_flux import (
        FLUX_MAX_SEQUENCE_LENGTH,
        flow_matching_pair,
        flux_loss,
        flux_prediction,
        noise_levels,
    )

    options = spec["options"]
    record = RunRecord.model_validate(
        {
            "base_model": "black-forest-labs/FLUX.1-dev",
            "concepts": [{"instance_dir": spec["out"], "instance_prompt": "a photo of sks toy"}],
            "output_dir": spec["out"],
            "resolution": options["resolution"],
            "max_train_steps": spec["steps"],
            "mixed_precision": "bf16",
            "sample_prompt": "a photo of sks toy",
            "sample_seed": 0,
            "architecture": "flux",
            "with_prior_preservation": False,
            "learning_rate": 1e-4,
            "lora_rank": 16,
            "lora_target_modules": LORA_TARGET_PRESETS["attention"] + FLUX_ATTENTION_EXTRA,
            "gradient_checkpointing": options.get("gradient_checkpointing", False),
            "use_8bit_adam": options.get("use_8bit_adam", False),
            "quantize_base": options.get("quantize_base", "none"),
        }
    )
    # "cpu" and "tiny" only to try this code without a GPU; the benchmark runs on CUDA, full size.
    device, dtype = torch.device(spec.get("device", "cuda")), torch.bfloat16
    cuda = device.type == "cuda"
    config = flux_transformer_config(spec.get("size", "full"))
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        transformer: Any = FluxTransformer2DModel(**config)
    torch.set_default_dtype(torch.float32)
    if record.quantize_base == "none":
        transformer.requires_grad_(False)
    else:
        quantize_in_memory(transformer, record.quantize_base, dtype)
        prepare_quantized_for_training(transformer, record.quantize_base, device)
    add_lora_adapters(record, transformer, [])
    if record.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer, _ = optimizer_and_schedule(record, params, 1)
    scheduler: Any = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)

    side = record.resolution // 8  # the VAE's latents, 16 channels
    latents = torch.randn(1, 16, side, side, device=device, dtype=dtype)
    text_dim, pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]  # T5, CLIP
    prompt_embeds = torch.randn(1, FLUX_MAX_SEQUENCE_LENGTH, text_dim, device=device, dtype=dtype)
    pooled = torch.randn(1, pooled_dim, device=device, dtype=dtype)
    guidance = torch.full((1,), record.flux_guidance, device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, last_loss = [], float("nan")
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=1, device=device)
        timesteps, sigmas = noise_levels(scheduler, u)
        noisy, target = flow_matching_pair(latents, torch.randn_like(latents), sigmas)
        with torch.autocast(device.type, dtype=dtype):
            pred = flux_prediction(
                transformer,
                noisy,
                timesteps,
                prompt_embeds=prompt_embeds,
                pooled=pooled,
                guidance=guidance,
                vae_scale_factor=8,
            )
        loss = flux_loss(pred, target, torch.ones_like(sigmas), prior_preservation=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, record.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        last_loss = float(loss.detach())
    measured = times[WARMUP_STEPS:] or times
    return {
        "name": options["name"],
        "median_step_s": statistics.median(measured),
        "steps_measured": len(measured),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "resolution": record.resolution,
        "last_loss": last_loss,
        "flux_setting": {
            "quantize_base": record.quantize_base,
            "checkpointing": record.gradient_checkpointing,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="SD 1.5 (512 px), SDXL (1024 px) and FLUX.1-dev (512, 1024 px) architectures on CUDA",
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
        if args.gpu and variant == "flux":
            continue  # built on the GPU by each setting (flux_gpu_child), never saved
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
        base, photos, class_dir = data.get(options["variant"], (work, work, work))
        flux_gpu = args.gpu and options["variant"] == "flux"
        spec = {
            "gpu": args.gpu,
            "base": str(base),
            "photos": str(photos),
            "class_dir": str(class_dir),
            "num_class_images": 4,
            "out": str(work / f"out-{i}"),
            "steps": steps,
            "threads": 0 if args.gpu else args.threads,
            "options": {"resolution": RESOLUTION.get((options["variant"], args.gpu)), **options},
        }
        started = time.perf_counter()
        command = [sys.executable, __file__, "--child", json.dumps(spec)]
        limit = max(timeout, FLUX_GPU_TIMEOUT) if flux_gpu and not args.setting_timeout else timeout
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=limit)
        except subprocess.TimeoutExpired:
            print(f"{options['name']}: over its {limit:.0f} s limit, skipped", file=sys.stderr)
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
    if args.gpu:
        for line in _flux_targets(results):
            print(line)
    comparisons = _comparisons(results, args.gpu)
    if comparisons:
        print("\n| comparison | A | B | A / B |\n| --- | ---: | ---: | ---: |")
        for label, a, b, ratio in comparisons:
            print(f"| {label} | {a} | {b} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": results}, indent=2))
    return 0 if results else 1


def _flux_targets(results: list[dict[str, Any]]) -> list[str]:
    """The FLUX.1-dev targets beside what each setting they concern measured."""
    rows = []
    for r in results:
        if "flux_setting" not in r:
            continue
        quantized = r["flux_setting"]["quantize_base"] != "none"
        it_s, peak_gb = 1 / r["median_step_s"], r["peak_gpu_mb"] * 2**20 / 1e9
        if r["resolution"] == 512 and not quantized:
            met = "met" if it_s >= FLUX_TARGET_IT_S_512 else "missed"
            rows.append(f"| {r['name']} | >= {FLUX_TARGET_IT_S_512} it/s | {it_s:.2f} it/s | {met} |")
        if quantized and r["flux_setting"]["checkpointing"]:
            met = "met" if peak_gb <= FLUX_TARGET_PEAK_GB_QUANTIZED else "missed"
            target = f"<= {FLUX_TARGET_PEAK_GB_QUANTIZED:.0f} GB peak"
            rows.append(f"| {r['name']} | {target} | {peak_gb:.1f} GB | {met} |")
    header = ["\n| FLUX.1-dev target (H100/H200 class) | target | measured | |", "| --- | --- | ---: | --- |"]
    return header + rows if rows else []


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
