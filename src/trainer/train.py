"""The DreamBooth training loop: fine-tune the UNet (and optionally the text encoder) on a few photos.

The loop is written out step by step, in the manner of diffusers' ``train_dreambooth.py``:

1. load the base model's parts; freeze the VAE (and the text encoder unless it is trained);
2. optionally encode every photo to latents and every prompt to embeddings once (``cache_latents``,
   frozen text encoder): each step then only runs the UNet;
3. each step: pick a batch (the order is a pure function of the seed and the step number; with
   aspect-ratio buckets every batch holds photos of one bucket, see :func:`batch_positions`), add noise
   at random timesteps, predict it, and compare with the target the scheduler's ``prediction_type``
   asks for (the noise for epsilon models such as SD 1.5, the velocity for v-prediction models such
   as SD 2.1 768); with prior preservation the loss is instance MSE + ``prior_loss_weight`` x class MSE;
4. every ``checkpointing_steps`` save the full state (weights, optimizer, LR scheduler, every RNG)
   atomically, keeping the newest ``checkpoints_total_limit``; SIGINT/SIGTERM save one and stop;
5. at the end save the pipeline in diffusers layout at ``OUT/model`` (atomically).

SDXL (``architecture == "sdxl"``) has two text encoders: the UNet attends to both encoders'
penultimate hidden states side by side and also takes the second encoder's pooled, projected
embedding plus six "time ids" per image: the photo's original height and width, the top-left corner
of its crop and the target size (taken from each photo's own resize and crop, see
:class:`trainer.photos.CropGeometry`). Its VAE overflows in fp16, so it stays in fp32 unless its
config says otherwise (``force_upcast: false``, as an "fp16-fix" VAE given with ``--vae`` has).

Because the data order and all randomness are restored from a checkpoint, a resumed run ends with
the same weights as one that was never interrupted (same seed, same machine, within float tolerance).

Multi-GPU: ``accelerate launch -m trainer.cli train --config run.toml`` runs one process per GPU;
each takes its own slice of every batch and accelerate averages the gradients.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import shutil
import signal
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from trainer._console import StepProgress, console
from trainer._fs import disk_errors, publish_dir, remove_stale_temp, temp_sibling
from trainer.buckets import Size
from trainer.checkpoints import (
    CHECKPOINT_PREFIX,
    StopSignal,
    TrainingRNG,
    check_fingerprint,
    delete_checkpoints,
    resolve_resume,
    save_adapters_only,
    save_checkpoint,
    stop_requested,
    unwrap,
)
from trainer.config import TEXT_ENCODER_LORA_TARGETS, RunRecord
from trainer.errors import MissingDependency, TrainingError, TrainingInterrupted
from trainer.lora_files import LORA_DIR, TEXT_ENCODER_NAMES, pipeline_class, save_lora_weights
from trainer.photos import CropGeometry, load_photo_with_geometry

if TYPE_CHECKING:
    import torch

__all__ = [
    "ImageKey",
    "MicroBatch",
    "TrainResult",
    "TrainingData",
    "add_lora_adapters",
    "batch_positions",
    "dreambooth_loss",
    "encode_prompt",
    "micro_batch",
    "posterior_sample",
    "preflight",
    "train",
    "training_images",
    "training_target",
    "vae_posteriors",
]

_LATENT_BATCH = 8  # photos encoded per VAE call when caching latents


@dataclass(frozen=True)
class TrainingData:
    """What to train on.

    Attributes:
        instance: ``(photo, concept index)`` for every instance photo of every concept.
        class_images: Per concept, its class images (empty without prior preservation).
        sizes: ``(height, width)`` each instance photo trains at (its aspect-ratio bucket), in the
            order of ``instance``; empty: every photo at the run's ``resolution`` square.
        class_sizes: Per concept, the bucket (``(height, width)``) of each class image, in the order
            of ``class_images``: the size it was generated at, or the bucket nearest a user's own
            image's shape; empty: unknown (every class image joins every batch of its concept).
    """

    instance: list[tuple[Path, int]]
    class_images: list[list[Path]]
    sizes: list[Size] = field(default_factory=list)
    class_sizes: list[list[Size]] = field(default_factory=list)

    def size_of(self, example: int, resolution: int) -> Size:
        """The size instance photo ``example`` trains at."""
        return self.sizes[example] if self.sizes else (resolution, resolution)

    def class_images_at(self, concept: int, size: Size) -> list[Path]:
        """The class images of ``concept`` that join its batches of ``size``.

        Those whose bucket is ``size`` (generated at it, so nothing is enlarged or cut); when the
        concept has none of that size (a cache of square images made before, a user's own images of
        other shapes), all of them, resized to cover ``size`` and centre-cropped.
        """
        images = self.class_images[concept]
        if self.class_sizes:
            own = [p for p, s in zip(images, self.class_sizes[concept], strict=True) if s == size]
            if own:
                return own
        return images


ImageKey = tuple[Path, Size]
"""An image at one training size: latents and crops are kept per ``(path, (height, width))``."""


class MicroBatch(NamedTuple):
    """The images of one micro-step: instance photos first, then their class images (with prior
    preservation), all at one size."""

    paths: list[Path]
    prompts: list[str]
    size: Size

    @property
    def keys(self) -> list[ImageKey]:
        """Each image with the batch's size."""
        return [(path, self.size) for path in self.paths]


@dataclass
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
        global_step: Optimizer steps done in total (including those before a resume).
        model_dir: What was saved: ``OUT/lora`` (the adapter) or ``OUT/model`` (the whole pipeline).
        resumed_from: The checkpoint training continued from, if any.
        last_loss: The loss of the last step run (``None`` if no step ran).
        step_times: Seconds per optimizer step run by this call (for benchmarks).
        peak_gpu_memory: ``torch.cuda.max_memory_allocated()`` in bytes, on CUDA.
        trainable_parameters: Parameters the optimizer updated (the adapters only, with LoRA).
    """

    global_step: int
    model_dir: Path | None
    resumed_from: Path | None
    last_loss: float | None
    step_times: list[float] = field(default_factory=list)
    peak_gpu_memory: int | None = None
    trainable_parameters: int = 0


def training_target(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict, from the scheduler's ``prediction_type``.

    ``noise_scheduler`` is a diffusers scheduler with ``get_velocity`` (``DDPMScheduler``).

    ``epsilon`` (SD 1.x, SD 2.x base 512): the added noise. ``v_prediction`` (SD 2.x 768):
    the velocity ``alpha_t * noise - sigma_t * latents``.

    Raises:
        TrainingError: any other prediction type.
    """
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        velocity: torch.Tensor = noise_scheduler.get_velocity(latents, noise, timesteps)
        return velocity
    raise TrainingError(
        f"The base model's scheduler predicts {prediction_type!r}; only 'epsilon' and 'v_prediction' "
        "models can be fine-tuned here."
    )


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    prior_preservation: bool,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """The DreamBooth loss, computed in fp32.

    Without prior preservation: the MSE between prediction and target. With it, the batch is
    ``[instance examples, class examples]`` and the loss is
    ``MSE(instance half) + prior_loss_weight * MSE(class half)``.
    """
    import torch.nn.functional as F

    if not prior_preservation:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    pred_instance, pred_prior = model_pred.float().chunk(2, dim=0)
    target_instance, target_prior = target.float().chunk(2, dim=0)
    instance_loss = F.mse_loss(pred_instance, target_instance, reduction="mean")
    prior_loss = F.mse_loss(pred_prior, target_prior, reduction="mean")
    return instance_loss + prior_loss_weight * prior_loss


def batch_positions(
    micro_step: int,
    *,
    seed: int,
    num_examples: int,
    batch_size: int,
    num_processes: int = 1,
    process_index: int = 0,
    buckets: Sequence[Hashable] | None = None,
) -> list[tuple[int, int, int]]:
    """Which examples a process trains on at a given micro-step: ``(epoch, position, example)``.

    Every epoch visits the examples in a fresh order drawn from ``(seed, epoch)``; ``position`` is an
    example's place in it. ``buckets`` (one key per example, e.g. its training size) splits that
    order by bucket, keeping it within each bucket; the batches of all processes together (the
    global batch) tile each bucket's part, its last batch wrapping around to its start, so every
    global batch holds examples of one bucket only. The batches run in the order of their first
    example's position. Without buckets (or with one) this is the whole order tiled in turn.

    The result depends on nothing else, so a resumed run sees exactly the batches the interrupted
    one would have.
    """
    global_batch = batch_size * num_processes
    keys: Sequence[Hashable] = buckets if buckets is not None else [0] * num_examples
    counts: dict[Hashable, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    steps_per_epoch = sum(math.ceil(n / global_batch) for n in counts.values())
    epoch, slot = divmod(micro_step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    # The positions of each bucket's examples, in the epoch's order.
    groups: dict[Hashable, list[int]] = {}
    for pos, example in enumerate(order):
        groups.setdefault(keys[int(example)], []).append(pos)
    batches = [
        [members[(start + j) % len(members)] for j in range(global_batch)]
        for members in groups.values()
        for start in range(0, len(members), global_batch)
    ]
    batches.sort(key=lambda batch: batch[0])
    positions = batches[slot][process_index * batch_size : (process_index + 1) * batch_size]
    return [(epoch, pos, int(order[pos])) for pos in positions]


def _load_part(cls: Any, base_model: str, subfolder: str) -> Any:
    """One component of the base model (diffusers and transformers loaders are untyped)."""
    return cls.from_pretrained(base_model, subfolder=subfolder)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def preflight(record: RunRecord) -> None:
    """Check, before any slow work, that the requested features can run on this machine.

    Raises:
        MissingDependency: 8-bit Adam without bitsandbytes, xformers missing or without CUDA, the
            ``--quantize-base`` back-end missing (or nf4 without CUDA).
        TrainingError: fp16 mixed precision without a CUDA GPU.
    """
    from trainer.quantize import check_quantize_base

    cuda = _cuda_available()
    check_quantize_base(record.quantize_base, cuda=cuda)
    if record.mixed_precision == "fp16" and not cuda:
        raise TrainingError(
            "fp16 mixed precision needs a CUDA GPU and none is available: use --mixed-precision no "
            "(or bf16 on a CPU that supports it)."
        )
    if record.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependency(
            "--use-8bit-adam needs the bitsandbytes package (CUDA GPUs): `pip install bitsandbytes`, "
            "or leave the option off to use the standard AdamW."
        )
    if record.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise MissingDependency(
                "--attention xformers needs the xformers package: `pip install xformers` matching your "
                "torch and CUDA, or use the default --attention sdpa (PyTorch's own fast attention)."
            )
        if not cuda:
            raise MissingDependency(
                "xformers only runs on CUDA GPUs and this machine has none: "
                "use --attention sdpa (the default)."
            )


def _pixels(
    paths: Sequence[Path], size: Size, max_megapixels: float
) -> tuple[torch.Tensor, list[CropGeometry]]:
    """Photos as a float tensor in [-1, 1], shape (n, 3, height, width) for ``size`` ``(height,
    width)``, and how each was resized and cropped."""
    import torch

    loaded = [load_photo_with_geometry(p, size, max_megapixels=max_megapixels) for p in paths]
    arrays = [np.asarray(image, dtype=np.float32) for image, _ in loaded]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0, [geometry for _, geometry in loaded]


def training_images(data: TrainingData, resolution: int) -> list[ImageKey]:
    """Every image a run may train on, at every size it may train at (what latent caching encodes).

    Each instance photo at its own size; for each size its concept's photos train at, the class
    images that join batches of that size (:meth:`TrainingData.class_images_at`: those of that size,
    else all of them, cropped to it).
    """
    keys: dict[ImageKey, None] = {}
    for example, (path, _) in enumerate(data.instance):
        keys[(path, data.size_of(example, resolution))] = None
    for concept in range(len(data.class_images)):
        sizes = {data.size_of(i, resolution): None for i, (_, c) in enumerate(data.instance) if c == concept}
        for size in sizes:
            for path in data.class_images_at(concept, size):
                keys[(path, size)] = None
    return list(keys)


def vae_posteriors(
    vae: Any,
    keys: Sequence[ImageKey],
    *,
    max_megapixels: float,
    device: Any,
    dtype: torch.dtype,
    per_call: int = _LATENT_BATCH,
) -> dict[ImageKey, tuple[torch.Tensor, torch.Tensor, CropGeometry]]:
    """The VAE posterior ``(mean, std)`` of each image at its size, and how it was cropped.

    Images of one size are encoded together, ``per_call`` per VAE call.
    """
    by_size: dict[Size, list[Path]] = {}
    for path, size in dict.fromkeys(keys):
        by_size.setdefault(size, []).append(path)
    out: dict[ImageKey, tuple[torch.Tensor, torch.Tensor, CropGeometry]] = {}
    for size, paths in by_size.items():
        for i in range(0, len(paths), per_call):
            chunk = paths[i : i + per_call]
            pixels, geometry = _pixels(chunk, size, max_megapixels)
            dist = vae.encode(pixels.to(device, dtype=dtype)).latent_dist
            for j, path in enumerate(chunk):
                out[(path, size)] = (dist.mean[j], dist.std[j], geometry[j])
    return out


def posterior_sample(
    posteriors: dict[ImageKey, tuple[torch.Tensor, torch.Tensor, CropGeometry]],
    keys: Sequence[ImageKey],
    generator: torch.Generator,
) -> torch.Tensor:
    """A sample of each image's VAE posterior (``mean + std * noise``), stacked in ``keys`` order."""
    import torch

    mean = torch.stack([posteriors[k][0] for k in keys])
    std = torch.stack([posteriors[k][1] for k in keys])
    return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def encode_prompt(
    text_encoders: Sequence[Any], token_ids: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's text conditioning: ``(encoder_hidden_states, pooled embedding or None)``.

    One encoder (SD 1.x / 2.x): its last hidden state, no pooled embedding. Two (SDXL): the
    penultimate hidden states of both, concatenated on the feature axis, and the second encoder's
    projected pooled output (``CLIPTextModelWithProjection``'s ``text_embeds``).
    """
    import torch

    if len(text_encoders) == 1:
        hidden: torch.Tensor = text_encoders[0](token_ids[0])[0]
        return hidden, None
    states = []
    pooled: torch.Tensor | None = None
    for encoder, ids in zip(text_encoders, token_ids, strict=True):
        output = encoder(ids, output_hidden_states=True)
        pooled = output[0]  # the last encoder's wins: SDXL's UNet takes bigG's projection
        states.append(output.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


def _tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    ids: torch.Tensor = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids


def optimizer_and_schedule(record: RunRecord, params: list[Any], num_processes: int) -> tuple[Any, Any]:
    """The run's optimizer over ``params`` and its learning-rate schedule (not yet prepared)."""
    from diffusers.optimization import get_scheduler

    optimizer = _select_optimizer(record)(
        params,
        lr=record.learning_rate,
        betas=(record.adam_beta1, record.adam_beta2),
        weight_decay=record.adam_weight_decay,
        eps=record.adam_epsilon,
    )
    # The prepared scheduler steps once per process per optimizer step, hence the multiplication.
    lr_scheduler = get_scheduler(
        record.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=record.lr_warmup_steps * num_processes,
        num_training_steps=record.max_train_steps * num_processes,
    )
    return optimizer, lr_scheduler


def _select_optimizer(record: RunRecord) -> Any:
    import torch

    if not record.use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MissingDependency(
            "--use-8bit-adam needs the bitsandbytes package (CUDA GPUs): `pip install bitsandbytes`, "
            "or leave the option off."
        ) from exc
    return bnb.optim.AdamW8bit


def _enable_xformers(unet: Any) -> None:
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # xformers raises many kinds of errors when its kernels cannot run
        raise MissingDependency(
            f"xformers is installed but cannot run here ({exc}). Use --attention sdpa (the default), or "
            "install the xformers build that matches your torch and CUDA versions."
        ) from exc


def _load_vae(record: RunRecord) -> Any:
    """The base model's VAE, or ``--vae``'s (a VAE folder/repo, or a pipeline with a ``vae/``)."""
    from diffusers import AutoencoderKL

    from trainer.loading import load_vae

    if record.vae is None:
        return _load_part(AutoencoderKL, record.base_model, "vae")
    return load_vae(record.vae)


def _save_pipeline(record: RunRecord, unet: Any, text_encoders: Sequence[Any], out: Path) -> Path:
    """Save the fine-tuned pipeline in diffusers layout at ``out`` (atomically).

    ``text_encoders`` are the trained ones (none, or all of the model's); a ``--vae`` replaces the
    base model's VAE in the saved pipeline too.
    """
    components: dict[str, Any] = {"unet": unet}
    components.update(zip(TEXT_ENCODER_NAMES, text_encoders, strict=False))
    if record.vae is not None:
        components["vae"] = _load_vae(record)
    if record.architecture != "sdxl":
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline = pipeline_class(record.architecture).from_pretrained(record.base_model, **components)
    tmp = temp_sibling(out)
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if (tmp / name).is_dir():
                _copy_missing_tokenizer_files(record.base_model, tmp / name)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_missing_tokenizer_files(base_model: str, tokenizer_dir: Path) -> None:
    """Keep the classic ``vocab.json``/``merges.txt`` beside ``tokenizer.json`` (older loaders need them)."""
    name = tokenizer_dir.name
    source = Path(base_model) / name
    if not source.is_dir():
        try:
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(base_model, allow_patterns=[f"{name}/*"], local_files_only=True))
            source = source / name
        except Exception:  # not in the local cache: the saved tokenizer.json is enough
            return
    for item in source.iterdir():
        if item.is_file() and not (tokenizer_dir / item.name).exists():
            shutil.copy2(item, tokenizer_dir / item.name)


def train(
    record: RunRecord, data: TrainingData, *, resume: str = "auto", save_model: bool = True
) -> TrainResult:
    """Fine-tune the base model on ``data`` as ``record`` says; crash-safe and resumable.

    Args:
        record: The resolved run configuration (see :func:`trainer.run.prepare_run`).
        data: The checked instance photos and the class images of every concept.
        resume: ``auto`` (continue from the newest checkpoint if there is one), ``latest`` (must
            continue), ``never`` (start over, deleting old checkpoints) or a checkpoint folder.
        save_model: Save the pipeline to ``OUT/model`` at the end.

    Returns:
        The steps done, where the model is, and timings.

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM arrived; a checkpoint was saved first.
        TrainingError: the checkpoint to resume does not match the settings, or no checkpoint exists
            with ``resume="latest"``.
        MissingDependency: 8-bit Adam or xformers asked for and not usable.
        trainer.loading.ModelLoadError: the base model cannot be loaded.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from trainer.loading import ModelLoadError

    preflight(record)
    if not data.instance:
        raise TrainingError("No instance photos to train on.")
    if record.with_prior_preservation and any(not images for images in data.class_images):
        raise TrainingError("Prior preservation is on but a concept has no class images.")
    if record.architecture == "flux":
        from trainer.train_flux import train_flux

        return train_flux(record, data, resume=resume, save_model=save_model)

    output_dir = record.output_dir
    accelerator = Accelerator(
        mixed_precision=record.mixed_precision,
        gradient_accumulation_steps=record.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    device = accelerator.device
    # Python, NumPy and torch's global generators; the loop itself draws from its own `rng`.
    set_seed(record.seed)

    # -- 1. Load the base model's parts --------------------------------------------------------
    base = record.base_model
    sdxl = record.architecture == "sdxl"
    try:
        # SDXL: CLIP ViT-L and OpenCLIP bigG (with the projection of its pooled output), each with
        # its own tokenizer; SD 1.x / 2.x: one CLIP encoder.
        tokenizers = [_load_part(CLIPTokenizer, base, "tokenizer")]
        text_encoders = [_load_part(CLIPTextModel, base, "text_encoder")]
        if sdxl:
            tokenizers.append(_load_part(CLIPTokenizer, base, "tokenizer_2"))
            text_encoders.append(_load_part(CLIPTextModelWithProjection, base, "text_encoder_2"))
        vae = _load_vae(record)
        unet = _load_part(UNet2DConditionModel, base, "unet")
        # DDPM's noise schedule is the one every SD model was trained with; the base model's own
        # scheduler config supplies the betas and, above all, the prediction type.
        noise_scheduler = _load_part(DDPMScheduler, base, "scheduler")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the parts of {base} for training: {exc}") from exc
    if noise_scheduler.config.prediction_type != record.prediction_type:
        raise TrainingError(
            f"{base}'s scheduler predicts {noise_scheduler.config.prediction_type!r} but run.json says "
            f"{record.prediction_type!r}: start a new --output for this base model."
        )

    # Frozen parts run in the mixed-precision dtype to save memory; trained weights stay in fp32
    # (accelerate autocasts the forward pass and keeps an fp32 master copy of what is trained).
    # With LoRA every base weight is frozen and only the adapters train (in fp32).
    lora = record.method == "lora"
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(record.mixed_precision, torch.float32)
    # SDXL's VAE overflows in fp16 (NaN latents, black images): it stays in fp32 unless its config
    # says it is safe in half precision (an "fp16-fix" VAE given with --vae).
    vae_dtype = torch.float32 if sdxl and vae.config.get("force_upcast", True) else weight_dtype
    vae.requires_grad_(False)
    vae.to(device, dtype=vae_dtype)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(record.train_text_encoder and not lora)
        text_encoder.to(device)
        if weight_dtype != torch.float32 and (lora or not record.train_text_encoder):
            text_encoder.to(dtype=weight_dtype)
    if lora:
        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        add_lora_adapters(record, unet, text_encoders if record.train_text_encoder else [])

    if record.attention == "xformers":
        _enable_xformers(unet)
    if record.gradient_checkpointing:
        # Recompute activations in the backward pass: ~30% slower, a fraction of the memory.
        unet.enable_gradient_checkpointing()
        if record.train_text_encoder:
            for text_encoder in text_encoders:
                # transformers 5 renamed it; 4.x only has the old name.
                enable = getattr(text_encoder, "activation_checkpointing_enable", None)
                (enable or text_encoder.gradient_checkpointing_enable)()

    # -- 2. Optimizer and learning-rate schedule ----------------------------------------------------
    trained = [unet, *text_encoders] if record.train_text_encoder else [unet]
    params_to_optimize = [p for model in trained for p in model.parameters() if p.requires_grad]
    optimizer, lr_scheduler = optimizer_and_schedule(record, params_to_optimize, accelerator.num_processes)
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*trained, optimizer, lr_scheduler)
    trained_models: tuple[Any, ...] = tuple(prepared)
    unet = trained_models[0]
    if record.train_text_encoder:
        text_encoders = list(trained_models[1:])
    if lora:
        save_adapters_only(accelerator)  # checkpoints of megabytes, not of the whole UNet
    rng = TrainingRNG(record.seed + accelerator.process_index, device)

    # -- 3. Resume: weights, optimizer, LR schedule and every RNG state ----------------------------
    resume_from, global_step = resume_state(accelerator, record, resume, rng)

    # -- 4. Caches: prompts to embeddings, photos to latent distributions ---------------------------
    prompts = sorted({p for c in record.concepts for p in (c.instance_prompt, c.class_prompt) if p})
    # Per prompt, its token ids for each tokenizer.
    token_ids = {p: [_tokenize(t, [p]).to(device) for t in tokenizers] for p in prompts}
    cached_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if not record.train_text_encoder:
        with torch.no_grad():
            for p in prompts:
                cached_embeddings[p] = encode_prompt(text_encoders, token_ids[p])

    # Keyed by image and training size: a class image may join batches of several buckets.
    latent_cache: dict[ImageKey, tuple[torch.Tensor, torch.Tensor, CropGeometry]] = {}
    geometries: dict[ImageKey, CropGeometry] = {}  # how each image was resized and cropped (time ids)
    if record.cache_latents and global_step < record.max_train_steps:
        with torch.no_grad():
            latent_cache = vae_posteriors(
                vae,
                training_images(data, record.resolution),
                max_megapixels=record.max_photo_megapixels,
                device=device,
                dtype=vae_dtype,
            )
        geometries.update((key, geometry) for key, (_, _, geometry) in latent_cache.items())
    if record.cache_latents and not record.train_text_encoder:
        # Nothing else needs the encoders: give their memory back to the UNet.
        for text_encoder in text_encoders:
            text_encoder.to("cpu")
        vae.to("cpu")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    scaling_factor = float(vae.config.scaling_factor)

    def encode_latents(keys: list[ImageKey]) -> torch.Tensor:
        """Sample latents of the images from the VAE's posterior (cached mean/std, or the VAE now)."""
        posteriors = latent_cache
        if not posteriors:
            with torch.no_grad():
                posteriors = vae_posteriors(
                    vae,
                    keys,
                    max_megapixels=record.max_photo_megapixels,
                    device=device,
                    dtype=vae_dtype,
                    per_call=len(keys),
                )
            geometries.update((key, geometry) for key, (_, _, geometry) in posteriors.items())
        return posterior_sample(posteriors, keys, rng.generator) * scaling_factor

    def encode_prompts(batch_prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompts' hidden states (and pooled embeddings for SDXL), cached or encoded now."""
        if cached_embeddings:
            hidden = torch.cat([cached_embeddings[p][0] for p in batch_prompts])
            pooled = [e for p in batch_prompts if (e := cached_embeddings[p][1]) is not None]
            return hidden, torch.cat(pooled) if pooled else None
        ids = [torch.cat([token_ids[p][k] for p in batch_prompts]) for k in range(len(tokenizers))]
        return encode_prompt(text_encoders, ids)

    def time_ids(keys: list[ImageKey]) -> torch.Tensor:
        """SDXL's size and crop conditioning of each image: (orig h, orig w, top, left, h, w)."""
        return torch.tensor([geometries[k].time_ids for k in keys], device=device, dtype=torch.float32)

    def unet_loss(micro_step: int) -> torch.Tensor:
        """One micro-step of the SD/SDXL objective: noise the latents, predict, compare."""
        batch = micro_batch(record, data, micro_step, accelerator)
        # Latents of the photos (VAE posterior sample, scaled as the UNet expects).
        model_input = encode_latents(batch.keys)
        # Sample the noise to add; an offset shifts whole channels (darker/brighter images).
        noise = torch.randn(
            model_input.shape, generator=rng.generator, device=device, dtype=model_input.dtype
        )
        if record.noise_offset:
            noise = noise + record.noise_offset * torch.randn(
                (model_input.shape[0], model_input.shape[1], 1, 1),
                generator=rng.generator,
                device=device,
                dtype=model_input.dtype,
            )
        bsz = model_input.shape[0]
        # A random timestep for each image.
        timesteps = torch.randint(
            0,
            noise_scheduler.config.num_train_timesteps,
            (bsz,),
            generator=rng.generator,
            device=device,
        ).long()
        # Add noise to the latents according to the noise magnitude at each timestep.
        noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
        # The text conditioning (SDXL: plus the pooled embedding and the size/crop ids).
        encoder_hidden_states, pooled = encode_prompts(batch.prompts)
        added_cond = {"text_embeds": pooled, "time_ids": time_ids(batch.keys)} if sdxl else None
        # Predict the noise (or velocity) residual.
        model_pred = unet(
            noisy_model_input,
            timesteps,
            encoder_hidden_states,
            added_cond_kwargs=added_cond,
            return_dict=False,
        )[0]
        # The target depends on the prediction type (noise for epsilon, velocity for v).
        target = training_target(noise_scheduler, model_input, noise, timesteps)

        # MSE on the instance half (+ weighted MSE on the class half with prior preservation).
        return dreambooth_loss(
            model_pred,
            target,
            prior_preservation=record.with_prior_preservation,
            prior_loss_weight=record.prior_loss_weight,
        )

    # -- 5. The loop ---------------------------------------------------------------------------
    loop = training_loop(
        accelerator,
        record,
        trained_models,
        optimizer,
        lr_scheduler,
        unet_loss,
        global_step=global_step,
        rng=rng,
        num_instances=len(data.instance),
    )

    # -- 6. Save the fine-tuned pipeline ---------------------------------------------------------
    peak = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    accelerator.wait_for_everyone()
    model_dir = None
    trained_te = [unwrap(accelerator, te) for te in text_encoders] if record.train_text_encoder else []
    # A full disk here loses only the steps since the newest checkpoint: a rerun continues from it.
    saving = disk_errors(
        output_dir,
        f"the trained {'adapter' if lora else 'model'}",
        then="Once there is room, run the same command again: it continues from the newest checkpoint.",
    )
    if save_model and accelerator.is_main_process and lora:
        with saving:
            model_dir = save_lora_weights(
                output_dir / LORA_DIR,
                architecture=record.architecture,
                unet=unwrap(accelerator, unet),
                text_encoders=trained_te,
            )
        console.print(f"Saved the LoRA adapter in {model_dir}")
    elif save_model and accelerator.is_main_process:
        with saving:
            model_dir = _save_pipeline(record, unwrap(accelerator, unet), trained_te, output_dir / "model")
        console.print(f"Saved the fine-tuned model in {model_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        loop.global_step, model_dir, resume_from, loop.last_loss, loop.step_times, peak, loop.trainable
    )


def micro_batch(record: RunRecord, data: TrainingData, micro_step: int, accelerator: Any) -> MicroBatch:
    """The photos and prompts of a micro-step: instance examples first, then their class images.

    All are at one size: the photos share a bucket (see :func:`batch_positions`) and the class
    images are those of that size (cropped to it when the concept has none, see
    :meth:`TrainingData.class_images_at`).
    """
    num_instances = len(data.instance)
    sizes = [data.size_of(i, record.resolution) for i in range(num_instances)]
    picks = batch_positions(
        micro_step,
        seed=record.seed,
        num_examples=num_instances,
        batch_size=record.train_batch_size,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        buckets=sizes,
    )
    paths, batch_prompts = [], []
    for _, _, example in picks:
        path, concept = data.instance[example]
        paths.append(path)
        batch_prompts.append(record.concepts[concept].instance_prompt)
    size = sizes[picks[0][2]]
    if record.with_prior_preservation:
        for epoch, pos, example in picks:
            concept = data.instance[example][1]
            images = data.class_images_at(concept, size)
            # Walk through the class images across epochs so every one of them gets used.
            paths.append(images[(epoch * num_instances + pos) % len(images)])
            batch_prompts.append(record.concepts[concept].class_prompt or "")
    return MicroBatch(paths, batch_prompts, size)


def resume_state(
    accelerator: Any, record: RunRecord, resume: str, rng: TrainingRNG
) -> tuple[Path | None, int]:
    """Restore the newest (or the named) checkpoint: ``(checkpoint or None, steps already done)``.

    Weights, optimizer, LR schedule and every RNG state come back, so the run continues exactly.
    """
    checkpoints_dir = record.output_dir / "checkpoints"
    if accelerator.is_main_process:
        remove_stale_temp(checkpoints_dir)  # half-written checkpoints of a killed run
        if resume == "never":
            delete_checkpoints(checkpoints_dir)
    accelerator.wait_for_everyone()
    resume_from = resolve_resume(resume, checkpoints_dir)
    global_step = 0
    if resume_from is not None:
        state = check_fingerprint(resume_from, record)
        accelerator.load_state(str(resume_from))
        rng.load(resume_from / f"training_rng_{accelerator.process_index}.pt")
        global_step = int(state["global_step"])
        console.print(f"Resuming from {resume_from} (step {global_step} of {record.max_train_steps})")
    return resume_from, global_step


@dataclass
class LoopResult:
    """What :func:`training_loop` did: the step reached, the last loss, the time of each step."""

    global_step: int
    last_loss: float | None
    step_times: list[float]
    trainable: int


def training_loop(
    accelerator: Any,
    record: RunRecord,
    trained_models: Sequence[Any],
    optimizer: Any,
    lr_scheduler: Any,
    loss_of: Callable[[int], torch.Tensor],
    *,
    global_step: int,
    rng: TrainingRNG,
    num_instances: int,
) -> LoopResult:
    """Run optimizer steps until ``max_train_steps``: ``loss_of(micro_step)`` is one forward pass.

    Shared by every architecture: gradient accumulation and clipping, the progress bar, a checkpoint
    every ``checkpointing_steps`` and on SIGINT/SIGTERM (then :class:`TrainingInterrupted`).
    """
    import torch

    checkpoints_dir = record.output_dir / "checkpoints"
    for model in trained_models:
        model.train()
    params_to_clip = [p for m in trained_models for p in m.parameters() if p.requires_grad]
    step_times: list[float] = []
    last_loss: float | None = None
    micro_step = global_step * record.gradient_accumulation_steps
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    buckets = " in aspect-ratio buckets" if record.aspect_buckets else ""
    with (
        StopSignal() as stop,  # from here on SIGINT/SIGTERM mean "checkpoint, then stop"
        StepProgress("Training", record.max_train_steps, completed=global_step) as bar,
    ):
        console.print(
            f"Training {record.max_train_steps} steps on {num_instances} photo(s) at {record.resolution} "
            f"px{buckets} ({accelerator.device}, mixed precision: {record.mixed_precision}, batch "
            f"{record.train_batch_size} x {accelerator.num_processes} process(es) x "
            f"{record.gradient_accumulation_steps} accumulation)"
        )
        step_started = time.perf_counter()
        while global_step < record.max_train_steps:
            with accelerator.accumulate(*trained_models):
                loss = loss_of(micro_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params_to_clip, record.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1

            if not accelerator.sync_gradients:
                continue  # still accumulating gradients for this optimizer step
            global_step += 1
            last_loss = float(loss.detach().item())
            now = time.perf_counter()
            step_times.append(now - step_started)
            step_started = now
            bar.advance(last_loss)

            saved_now = False
            if global_step % record.checkpointing_steps == 0 and global_step < record.max_train_steps:
                save_checkpoint(accelerator, checkpoints_dir, global_step, record, rng)
                saved_now = True
            if global_step < record.max_train_steps and stop_requested(accelerator, stop):
                checkpoint = checkpoints_dir / f"{CHECKPOINT_PREFIX}{global_step}"
                if not saved_now:
                    checkpoint = save_checkpoint(accelerator, checkpoints_dir, global_step, record, rng)
                raise TrainingInterrupted(global_step, checkpoint, stop.signum or signal.SIGTERM)
            step_started = time.perf_counter()
    return LoopResult(global_step, last_loss, step_times, sum(p.numel() for p in params_to_clip))


def add_lora_adapters(record: RunRecord, unet: Any, text_encoders: list[Any]) -> None:
    """Add the run's LoRA adapters (PEFT ``LoraConfig``) to the UNet and the given text encoders.

    Only the adapters are trainable afterwards, and they are fp32 even when the frozen base weights
    are fp16/bf16 (mixed-precision training needs fp32 master weights).

    Raises:
        TrainingError: no UNet module matches ``lora_target_modules``.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    def config(targets: list[str]) -> Any:
        return LoraConfig(
            r=record.lora_rank,
            lora_alpha=record.lora_alpha,
            lora_dropout=record.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    try:
        unet.add_adapter(config(record.lora_target_modules))
    except ValueError as exc:
        raise TrainingError(
            f"--lora-target-modules {','.join(record.lora_target_modules)}: {exc} Use the preset "
            "'attention' or names of the UNet's linear/conv layers such as to_q, proj_in, ff.net.2."
        ) from exc
    for text_encoder in text_encoders:
        # PEFT's own injection (transformers 5's `add_adapter` asks for peft >= 0.22).
        inject_adapter_in_model(config(TEXT_ENCODER_LORA_TARGETS), text_encoder)
    for model in (unet, *text_encoders):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
