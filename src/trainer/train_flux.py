"""DreamBooth LoRA on FLUX.1-dev-architecture bases: flow matching on the FluxTransformer2DModel.

The same run as :func:`trainer.train.train` (data order, checkpoints, resume, SIGINT/SIGTERM and
the saved adapter are shared with it); what differs is the model and its objective, following
diffusers' ``train_dreambooth_lora_flux.py``:

1. every prompt is encoded once with FluxPipeline's own ``encode_prompt`` (CLIP's pooled output and
   T5's hidden states, the very embeddings sampling uses); then both text encoders are freed;
2. every photo is encoded once by the 16-channel VAE at its training size (its aspect-ratio bucket;
   its posterior mean and std are cached); the latents are ``(sample - shift_factor) * scaling_factor``;
3. each step draws a noise level ``sigma`` per image (uniformly, or from ``weighting_scheme``), mixes
   ``noisy = (1 - sigma) * latents + sigma * noise`` and trains the transformer's LoRA to predict the
   flow ``noise - latents`` from the packed 2 x 2 latent patches, the prompt embeddings and the
   guidance value (FLUX.1-dev is guidance-distilled: the scale is an input);
4. the adapter is saved with ``FluxPipeline.save_lora_weights`` (``transformer.`` keys).

Only LoRA on the transformer is trained (see :func:`trainer.run.prepare_run`); with
``--quantize-base`` its frozen weights are held in nf4 or int8 (see :mod:`trainer.quantize`).
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

from trainer._console import console
from trainer._fs import disk_errors
from trainer.checkpoints import TrainingRNG, save_adapters_only, unwrap
from trainer.config import RunRecord
from trainer.lora_files import LORA_DIR, save_lora_weights
from trainer.quantize import load_quantized_transformer, prepare_quantized_for_training
from trainer.train import (
    ImageKey,
    TrainingData,
    TrainResult,
    _enable_xformers,
    _load_part,
    add_lora_adapters,
    micro_batch,
    optimizer_and_schedule,
    posterior_sample,
    resume_state,
    training_images,
    training_loop,
    vae_posteriors,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLUX_MAX_SEQUENCE_LENGTH",
    "flow_matching_pair",
    "flux_loss",
    "flux_prediction",
    "noise_levels",
    "train_flux",
]

# T5 tokens per prompt: FluxPipeline's default, so training sees the embeddings sampling makes.
FLUX_MAX_SEQUENCE_LENGTH = 512


def flow_matching_pair(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's input and target at noise levels ``sigmas`` (one per image, in [0, 1]).

    Rectified flow: ``noisy = (1 - sigma) * latents + sigma * noise`` walks the straight line from
    the image (sigma 0) to pure noise (sigma 1); the target is its velocity, ``noise - latents``.
    """
    sigma = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    noisy = (1.0 - sigma) * latents + sigma * noise
    return noisy, noise - latents


def noise_levels(noise_scheduler: Any, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)`` on the scheduler's training grid for draws ``u`` in [0, 1).

    ``u`` picks index ``floor(u * N)`` of the grid (N = ``num_train_timesteps``), which runs from
    sigma 1 (timestep 1000, pure noise) down to 1 / N. FLUX.1-dev shifts the grid only at inference
    (dynamic shifting), so training draws from it unshifted, as diffusers' FLUX script does.
    """
    import torch

    n = int(noise_scheduler.config.num_train_timesteps)
    indices = (u * n).long().clamp(0, n - 1).cpu()
    timesteps: torch.Tensor = noise_scheduler.timesteps[indices].to(u.device, dtype=torch.float32)
    sigmas: torch.Tensor = noise_scheduler.sigmas[indices].to(u.device, dtype=torch.float32)
    return timesteps, sigmas


def flux_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    weighting: torch.Tensor,
    *,
    prior_preservation: bool,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """The weighted flow-matching MSE (fp32); with prior preservation the batch is
    ``[instance examples, class examples]`` and the class half is weighted by ``prior_loss_weight``."""

    def mse(pred: torch.Tensor, tgt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        per_image = (weight.float() * (pred.float() - tgt.float()) ** 2).reshape(tgt.shape[0], -1)
        return per_image.mean(dim=1).mean()

    if not prior_preservation:
        return mse(model_pred, target, weighting)
    pred, pred_prior = model_pred.chunk(2, dim=0)
    tgt, tgt_prior = target.chunk(2, dim=0)
    weight, weight_prior = weighting.chunk(2, dim=0)
    return mse(pred, tgt, weight) + prior_loss_weight * mse(pred_prior, tgt_prior, weight_prior)


def flux_prediction(
    transformer: Any,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    guidance: torch.Tensor | None,
    vae_scale_factor: int,
) -> torch.Tensor:
    """The transformer's flow prediction for latents ``noisy`` (batch, channels, height, width).

    The transformer sees 2 x 2 latent patches as tokens, each with its (row, column) id; the
    prediction comes back unpacked to the latents' shape.
    """
    import torch
    from diffusers import FluxPipeline

    pipeline: Any = FluxPipeline  # its latent helpers are static and untyped
    bsz, channels, height, width = noisy.shape
    device, dtype = noisy.device, noisy.dtype
    packed = pipeline._pack_latents(noisy, bsz, channels, height, width)
    img_ids = pipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, device, dtype)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
    prediction = transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,  # the transformer multiplies it by 1000 again
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    unpacked: torch.Tensor = pipeline._unpack_latents(
        prediction, height * vae_scale_factor, width * vae_scale_factor, vae_scale_factor
    )
    return unpacked


def _weight_dtype(record: RunRecord) -> torch.dtype:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(record.mixed_precision, torch.float32)


def _prompt_embeddings(
    record: RunRecord, device: torch.device, dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every prompt of the run as ``(T5 hidden states, CLIP pooled embedding)``, computed once.

    The text encoders are loaded for this only and freed before the transformer is loaded.
    """
    import torch
    from diffusers import FluxPipeline

    from trainer.loading import ModelLoadError

    prompts = sorted({p for c in record.concepts for p in (c.instance_prompt, c.class_prompt) if p})
    loader: Any = FluxPipeline  # untyped
    try:
        text_pipe = loader.from_pretrained(record.base_model, transformer=None, vae=None, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the text encoders of {record.base_model}: {exc}") from exc
    text_pipe.to(device)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for prompt in prompts:
            prompt_embeds, pooled, _ = text_pipe.encode_prompt(
                prompt, prompt_2=prompt, device=device, max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH
            )
            cache[prompt] = (prompt_embeds, pooled)
    del text_pipe
    _free_memory()
    return cache


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_flux(
    record: RunRecord, data: TrainingData, *, resume: str = "auto", save_model: bool = True
) -> TrainResult:
    """Train a LoRA adapter of a FLUX base's transformer; see :func:`trainer.train.train`.

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM arrived; a checkpoint was saved first.
        TrainingError: the checkpoint to resume does not match the settings.
        trainer.loading.ModelLoadError: the base model cannot be loaded.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.training_utils import (
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )

    from trainer.loading import ModelLoadError, load_vae

    output_dir = record.output_dir
    accelerator = Accelerator(
        mixed_precision=record.mixed_precision,
        gradient_accumulation_steps=record.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    device = accelerator.device
    set_seed(record.seed)
    # Every frozen weight runs in the mixed-precision dtype (bf16 on GPUs); the adapters stay fp32.
    weight_dtype = _weight_dtype(record)
    base = record.base_model

    # -- 1. Prompt embeddings, once; the text encoders are gone before the transformer loads -------
    embeddings = _prompt_embeddings(record, device, weight_dtype)

    # -- 2. The VAE, the transformer with its adapter, the flow-matching schedule -------------------
    try:
        vae: Any = load_vae(record.vae) if record.vae else _load_part(AutoencoderKL, base, "vae")
        if record.quantize_base == "none":
            transformer: Any = _load_part(FluxTransformer2DModel, base, "transformer")
        else:  # QLoRA: the frozen weights quantized, the adapter trained on top (trainer.quantize)
            transformer = load_quantized_transformer(base, record.quantize_base, weight_dtype)
        noise_scheduler: Any = _load_part(FlowMatchEulerDiscreteScheduler, base, "scheduler")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the parts of {base} for training: {exc}") from exc
    vae.requires_grad_(False)
    vae.to(device, dtype=weight_dtype)
    if record.quantize_base == "none":
        transformer.requires_grad_(False)
        transformer.to(device, dtype=weight_dtype)
    else:
        prepare_quantized_for_training(transformer, record.quantize_base, device)
    add_lora_adapters(record, transformer, [])
    if record.attention == "xformers":
        _enable_xformers(transformer)
    if record.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    shift_factor = float(vae.config.shift_factor or 0.0)
    scaling_factor = float(vae.config.scaling_factor)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    guidance_embeds = bool(transformer.config.guidance_embeds)

    # -- 3. Optimizer, LR schedule, resume -------------------------------------------------------
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer, lr_scheduler = optimizer_and_schedule(record, params, accelerator.num_processes)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    save_adapters_only(accelerator)
    rng = TrainingRNG(record.seed + accelerator.process_index, device)
    resume_from, global_step = resume_state(accelerator, record, resume, rng)

    # -- 4. Latents: the VAE posterior of every photo, once (or per step without --cache-latents) ---
    # Keyed by image and training size: a class image may join batches of several buckets.
    latent_cache: dict[ImageKey, tuple[torch.Tensor, torch.Tensor, Any]] = {}
    if record.cache_latents and global_step < record.max_train_steps:
        with torch.no_grad():
            latent_cache = vae_posteriors(
                vae,
                training_images(data, record.resolution),
                max_megapixels=record.max_photo_megapixels,
                device=device,
                dtype=weight_dtype,
            )
    if record.cache_latents:
        vae.to("cpu")
        _free_memory()

    def encode_latents(keys: list[ImageKey]) -> torch.Tensor:
        """A posterior sample of each image's latents, shifted and scaled as the transformer expects."""
        posteriors = latent_cache
        if not posteriors:
            with torch.no_grad():
                posteriors = vae_posteriors(
                    vae,
                    keys,
                    max_megapixels=record.max_photo_megapixels,
                    device=device,
                    dtype=weight_dtype,
                    per_call=len(keys),
                )
        sample = posterior_sample(posteriors, keys, rng.generator)
        return ((sample - shift_factor) * scaling_factor).to(weight_dtype)

    def flux_step_loss(micro_step: int) -> torch.Tensor:
        """One micro-step of flow matching: noise the latents to a random sigma, predict the flow."""
        batch = micro_batch(record, data, micro_step, accelerator)
        model_input = encode_latents(batch.keys)
        bsz = model_input.shape[0]
        noise = torch.randn(
            model_input.shape, generator=rng.generator, device=device, dtype=model_input.dtype
        )
        # A noise level per image: u in [0, 1) from the weighting scheme, on the schedule's grid.
        u = compute_density_for_timestep_sampling(
            weighting_scheme=record.weighting_scheme,
            batch_size=bsz,
            logit_mean=record.logit_mean,
            logit_std=record.logit_std,
            mode_scale=record.mode_scale,
            device=device,
            generator=rng.generator,
        )
        timesteps, sigmas = noise_levels(noise_scheduler, u)
        noisy, target = flow_matching_pair(model_input, noise, sigmas)
        prompt_embeds = torch.cat([embeddings[p][0] for p in batch.prompts])
        pooled = torch.cat([embeddings[p][1] for p in batch.prompts])
        guidance = (
            torch.full((bsz,), record.flux_guidance, device=device, dtype=torch.float32)
            if guidance_embeds
            else None
        )
        model_pred = flux_prediction(
            transformer,
            noisy,
            timesteps,
            prompt_embeds=prompt_embeds,
            pooled=pooled,
            guidance=guidance,
            vae_scale_factor=vae_scale_factor,
        )
        weighting = compute_loss_weighting_for_sd3(
            weighting_scheme=record.weighting_scheme, sigmas=sigmas.reshape(-1, 1, 1, 1)
        )
        return flux_loss(
            model_pred,
            target,
            weighting,
            prior_preservation=record.with_prior_preservation,
            prior_loss_weight=record.prior_loss_weight,
        )

    # -- 5. The loop (shared with SD/SDXL) ------------------------------------------------------
    loop = training_loop(
        accelerator,
        record,
        [transformer],
        optimizer,
        lr_scheduler,
        flux_step_loss,
        global_step=global_step,
        rng=rng,
        num_instances=len(data.instance),
    )

    # -- 6. Save the adapter ----------------------------------------------------------------------
    peak = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    accelerator.wait_for_everyone()
    model_dir = None
    if save_model and accelerator.is_main_process:
        with disk_errors(
            output_dir,
            "the trained adapter",
            then="Once there is room, run the same command again: it continues from the newest checkpoint.",
        ):
            model_dir = save_lora_weights(
                output_dir / LORA_DIR, architecture="flux", transformer=unwrap(accelerator, transformer)
            )
        console.print(f"Saved the LoRA adapter in {model_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        loop.global_step, model_dir, resume_from, loop.last_loss, loop.step_times, peak, loop.trainable
    )
