"""The whole DreamBooth flow: check -> class images -> train -> samples -> export -> (publish).

``prepare_run`` turns the user's :class:`~trainer.config.RunConfig` into a
:class:`~trainer.config.RunRecord` (reading the base model's configs for the resolution and the
prediction type, counting photos for the default number of steps) and checks every photo before
anything slow happens. ``run`` then does each step in order; each step is also a command of
``sdtrain``.

Under ``accelerate launch`` (several GPUs) every process checks the photos and trains; only the main
process writes ``run.json``, generates class images, samples, exports and publishes.
"""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trainer._console import console, warning
from trainer.buckets import BUCKET_STEP, Size, describe_counts, run_buckets
from trainer.config import (
    FLUX_ATTENTION_EXTRA,
    FLUX_GUIDANCE_SCALE,
    FLUX_SAMPLE_STEPS,
    LORA_TARGET_PRESETS,
    SD_GUIDANCE_SCALE,
    SD_SAMPLE_STEPS,
    STEPS_WARNING_THRESHOLD,
    Architecture,
    RunConfig,
    RunRecord,
    default_max_train_steps,
)
from trainer.errors import ConfigError
from trainer.loading import ModelLoadError
from trainer.photos import PhotoCheck, check_photos

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from trainer.class_images import ClassImagesResult
    from trainer.sample import SampleResult
    from trainer.train import TrainingData, TrainResult

__all__ = [
    "BaseModelInfo",
    "detect_architecture",
    "PreparedRun",
    "RunResult",
    "base_model_license",
    "inspect_base_model",
    "make_class_images",
    "prepare_run",
    "resolve_mixed_precision",
    "run",
    "training_data",
]

Stage = Literal["train", "sample", "export", "publish"]


@dataclass(frozen=True)
class BaseModelInfo:
    """What a run needs to know about its base model before loading any weights.

    Attributes:
        resolution: Native image size: ``unet.sample_size * vae_scale_factor`` (512 for SD 1.5,
            768 for SD 2.1, 64 for the tiny test model); for FLUX, FluxPipeline's default size
            (``default_sample_size`` 128 latent pixels x the VAE's scale: 1024 for FLUX.1-dev).
        prediction_type: ``epsilon`` or ``v_prediction`` (from the scheduler config);
            ``flow_matching`` for FLUX.
        license: The model card's ``license`` (e.g. ``creativeml-openrail-m``), if known.
        architecture: ``sd1``, ``sd2``, ``sdxl`` (see :func:`detect_architecture`) or ``flux``.
    """

    resolution: int
    prediction_type: str
    license: str | None
    architecture: Architecture = "sd1"

    def describe(self) -> str:
        """``"SD 2.x (v_prediction, 768 px)"``: what the console says was found."""
        name = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "FLUX.1"}[self.architecture]
        return f"{name} ({self.prediction_type}, {self.resolution} px)"


def detect_architecture(unet_config: dict[str, Any]) -> Architecture:
    """SD 1.x, SD 2.x or SDXL, from the UNet's config.

    SDXL's UNet takes the pooled text embedding and the size/crop ids (``addition_embed_type
    "text_time"``); SD 2.x's uses linear projections in its transformer blocks (and OpenCLIP's
    1024-wide embeddings); SD 1.x's does neither.
    """
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


@dataclass
class PreparedRun:
    """A validated run, its photos checked.

    Attributes:
        record: Every option decided (what ``run.json`` holds).
        checks: The photo check of each concept's folder, in concept order.
    """

    record: RunRecord
    checks: list[PhotoCheck]


@dataclass
class RunResult:
    """What :func:`run` produced.

    Attributes:
        record: The run's configuration (``OUT/run.json``).
        train: The training outcome.
        samples: The sample images, if any were made.
        export_path: The single-file checkpoint, if exported.
        hub_url: The Hub repo's URL, if published.
    """

    record: RunRecord
    train: TrainResult | None = None
    samples: SampleResult | None = None
    export_path: Path | None = None
    hub_url: str | None = None
    class_images: list[ClassImagesResult] = field(default_factory=list)


# FluxPipeline draws at ``default_sample_size`` latent pixels per side unless told otherwise.
FLUX_DEFAULT_SAMPLE_SIZE = 128


def _load_config(base_model: str, subfolder: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, FluxTransformer2DModel, UNet2DConditionModel

    reader: Any = {
        "unet": UNet2DConditionModel,
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "scheduler": DDPMScheduler,
    }[subfolder]
    config: dict[str, Any] = reader.load_config(base_model, subfolder=subfolder)
    return config


def inspect_base_model(base_model: str) -> BaseModelInfo:
    """Read the base model's UNet, VAE and scheduler configs (no weights are loaded).

    Args:
        base_model: A diffusers folder or a Hub id (downloaded configs are cached).

    Returns:
        The native resolution, the prediction type and the license.

    Raises:
        ModelLoadError: the folder is not a diffusers pipeline, or the Hub id cannot be reached.
    """
    path = Path(base_model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{base_model} is not a diffusers pipeline folder (no model_index.json). Give a folder saved "
            "with save_pretrained (e.g. `sdtrain tiny-model` or a Hub snapshot) or a Hub id."
        )
    if not path.exists() and base_model.count("/") != 1:
        raise ModelLoadError(
            f"{base_model} is neither an existing folder nor a Hub id (owner/name), e.g. "
            "stable-diffusion-v1-5/stable-diffusion-v1-5."
        )
    from trainer.loading import pipeline_class_name

    flux = pipeline_class_name(base_model) == "FluxPipeline"
    try:
        unet = _load_config(base_model, "transformer" if flux else "unet")
        vae = _load_config(base_model, "vae")
        scheduler = _load_config(base_model, "scheduler")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not read the configuration of {base_model}: {exc}. Check the id or path; a gated "
            "model needs `hf auth login` and accepted terms; offline, the model must be in the cache."
        ) from exc
    vae_scale_factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if flux:
        return BaseModelInfo(
            resolution=FLUX_DEFAULT_SAMPLE_SIZE * vae_scale_factor,
            prediction_type="flow_matching",
            license=base_model_license(base_model),
            architecture="flux",
        )
    sample_size = unet.get("sample_size")
    if not isinstance(sample_size, int):  # some configs give [h, w]
        sample_size = int(sample_size[0]) if sample_size else 64
    return BaseModelInfo(
        resolution=sample_size * vae_scale_factor,
        prediction_type=str(scheduler.get("prediction_type", "epsilon")),
        license=base_model_license(base_model),
        architecture=detect_architecture(unet),
    )


def base_model_license(base_model: str) -> str | None:
    """The base model's license from its model card (``None`` when unknown or offline).

    A local folder's ``README.md`` front matter is read; for a Hub id the Hub is asked (unless
    ``HF_HUB_OFFLINE`` is set).
    """
    path = Path(base_model)
    if path.exists():
        readme = path / "README.md"
        if not readme.is_file():
            return None
        from huggingface_hub import metadata_load

        try:
            metadata = metadata_load(readme) or {}
        except Exception:  # a malformed front matter is not worth failing a run over
            return None
        value = metadata.get("license")
        return str(value) if value else None
    from huggingface_hub import constants, model_info

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        card = model_info(base_model, timeout=10).card_data
    except Exception:  # offline, gated, rate-limited: the license is nice to have
        return None
    value = getattr(card, "license", None) if card is not None else None
    return str(value) if value else None


def resolve_mixed_precision(choice: str) -> Literal["no", "fp16", "bf16"]:
    """``auto`` becomes bf16 on CUDA GPUs that support it, else fp16 on CUDA, else ``no``."""
    if choice in ("no", "fp16", "bf16"):
        return choice  # type: ignore[return-value]
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdclient")
    except PackageNotFoundError:
        return "unknown"


def prepare_run(config: RunConfig, *, info: BaseModelInfo | None = None) -> PreparedRun:
    """Decide every option and check every photo; nothing slow happens before this succeeds.

    Args:
        config: The user's options.
        info: The base model's facts, if already known (default: :func:`inspect_base_model`).

    Returns:
        The run record and the photo checks.

    Raises:
        ModelLoadError: the base model cannot be found.
        PhotoError: some photos are unusable (all listed).
        ConfigError: the prediction type is not supported, ``quantize_base`` is set for an SD base,
            or prior preservation is on and a concept has no class prompt.
    """
    info = info or inspect_base_model(config.base_model)
    flux = info.architecture == "flux"
    if flux:
        _check_flux_options(config)
    elif config.quantize_base != "none":
        raise ConfigError(
            f"--quantize-base {config.quantize_base} is for FLUX bases; {config.base_model} is "
            f"{info.describe()}, whose LoRA trains on the unquantized base: leave the option off."
        )
    elif info.prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(
            f"{config.base_model} predicts {info.prediction_type!r}; only epsilon and v_prediction "
            "models (SD 1.x, SD 2.x, SDXL) can be fine-tuned."
        )
    what = "a LoRA adapter" if config.method == "lora" else "a full fine-tune"
    console.print(f"Base model: {info.describe()}; training {what}")
    resolution = config.resolution or info.resolution
    step = BUCKET_STEP["flux"]
    if flux and resolution % step:
        raise ConfigError(
            f"FLUX trains at multiples of {step} px (latents are packed 2 x 2): use --resolution "
            f"{resolution - resolution % step}."
        )
    buckets = run_buckets(info.architecture, resolution, config.aspect_buckets)
    if config.with_prior_preservation is None:
        # FLUX trainers skip class images by default: on FLUX.1-dev, 200 of them at 1024 px cost
        # about as much GPU time as the training itself.
        config = config.model_copy(update={"with_prior_preservation": not flux})
        if flux:
            console.print("Prior preservation: off (FLUX's default; --prior-preservation to turn it on)")
        elif problem := config.missing_class_prompt():
            raise ConfigError(problem)
    concepts = config.resolved_concepts()
    checks = check_photos(
        [c.instance_dir for c in concepts],
        resolution=resolution,
        max_megapixels=config.max_photo_megapixels,
        buckets=buckets,
    )
    for check in checks:
        for message in check.warnings:
            warning(message)
    if buckets is not None:
        counts = Counter(photo.target for check in checks for photo in check.photos)
        console.print(f"Aspect-ratio buckets: {describe_counts(dict(counts.most_common()))}")
    num_photos = sum(len(c.photos) for c in checks)
    max_steps = config.max_train_steps or default_max_train_steps(num_photos, info.architecture)
    if max_steps > STEPS_WARNING_THRESHOLD:
        warning(
            f"{max_steps} training steps is a lot: above {STEPS_WARNING_THRESHOLD} "
            "DreamBooth tends to over-fit (every image looks like the training photos). Consider "
            "fewer --max-train-steps or a lower --learning-rate."
        )
    data = config.model_dump()
    targets = config.lora_target_modules
    if flux and targets == LORA_TARGET_PRESETS["attention"]:
        targets = targets + FLUX_ATTENTION_EXTRA
    data.update(
        lora_target_modules=targets,
        sample_steps=config.sample_steps or (FLUX_SAMPLE_STEPS if flux else SD_SAMPLE_STEPS),
        class_image_steps=config.class_image_steps or (FLUX_SAMPLE_STEPS if flux else SD_SAMPLE_STEPS),
        sample_guidance_scale=(
            config.sample_guidance_scale
            if config.sample_guidance_scale is not None
            else (FLUX_GUIDANCE_SCALE if flux else SD_GUIDANCE_SCALE)
        ),
        concepts=[c.model_dump() for c in concepts],
        resolution=resolution,
        aspect_buckets=buckets is not None,
        max_train_steps=max_steps,
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        sample_prompt=config.sample_prompt or concepts[0].instance_prompt,
        sample_seed=config.sample_seed if config.sample_seed is not None else config.seed,
        base_model_license=info.license,
        prediction_type=info.prediction_type,
        architecture=info.architecture,
        num_instance_images=num_photos,
        sdtrain_version=_version(),
    )
    return PreparedRun(RunRecord.model_validate(data), checks)


def _check_flux_options(config: RunConfig) -> None:
    """Refuse the options a FLUX run cannot honour (before anything slow happens).

    Raises:
        ConfigError: a full fine-tune, a trained text encoder or a noise offset.
    """
    if config.method == "full" or config.train_text_encoder:
        raise ConfigError(
            "FLUX: LoRA on the transformer only (--method lora, without --train-text-encoder). A full "
            "fine-tune of its 12B-parameter transformer does not fit the GPUs sdtrain targets."
        )
    if config.noise_offset:
        raise ConfigError("FLUX: --noise-offset is for SD/SDXL noise prediction; flow matching has none.")


def make_class_images(record: RunRecord, checks: list[PhotoCheck] | None = None) -> list[ClassImagesResult]:
    """Generate the missing class images of every concept (nothing when prior preservation is off).

    With ``checks`` (the photo check of each concept, in concept order) a concept's class images are
    generated at its photos' training sizes (their buckets; the square without buckets), shared in
    proportion to the photos (see :func:`trainer.class_images.class_image_plan`); without, square.
    """
    from trainer.class_images import ensure_class_images

    if not record.with_prior_preservation:
        return []
    jobs: list[tuple[str, Path]] = []
    photo_sizes: list[list[Size]] = []
    for i, c in enumerate(record.concepts):
        if c.class_prompt and c.class_dir:
            jobs.append((c.class_prompt, c.class_dir))
            photo_sizes.append([p.target for p in checks[i].photos] if checks is not None else [])
    return ensure_class_images(
        jobs,
        base_model=record.base_model,
        num_images=record.num_class_images,
        resolution=record.resolution,
        batch_size=record.class_batch_size,
        num_inference_steps=record.class_image_steps,
        seed=record.seed,
        vae=record.vae,
        quantize_base=record.quantize_base,
        photo_sizes=photo_sizes,
    )


def training_data(record: RunRecord, checks: list[PhotoCheck]) -> TrainingData:
    """The instance photos and class images of every concept, as the training loop takes them.

    Each photo trains at the size its check gave it (its bucket, or the square); each class image's
    bucket is kept too, so that it joins batches of that size (see
    :meth:`trainer.train.TrainingData.class_images_at`). Class images are checked like photos, with
    the run's buckets (a damaged cached image is reported, not trained on).

    Raises:
        PhotoError: a class image is unusable.
    """
    from trainer.class_images import existing_class_images
    from trainer.train import TrainingData

    instance = [(photo.path, i) for i, check in enumerate(checks) for photo in check.photos]
    sizes = [photo.target for check in checks for photo in check.photos]
    buckets = run_buckets(record.architecture, record.resolution, True) if record.aspect_buckets else None
    class_images: list[list[Path]] = []
    class_sizes: list[list[Size]] = []
    for concept in record.concepts:
        if record.with_prior_preservation and concept.class_dir is not None:
            wanted = set(existing_class_images(concept.class_dir)[: record.num_class_images])
            (check,) = check_photos(
                [concept.class_dir],
                resolution=record.resolution,
                max_megapixels=record.max_photo_megapixels,
                buckets=buckets,
            )
            used = [p for p in check.photos if p.path in wanted]
            class_images.append([p.path for p in used])
            class_sizes.append([p.target for p in used])
        else:
            class_images.append([])
            class_sizes.append([])
    return TrainingData(instance=instance, class_images=class_images, sizes=sizes, class_sizes=class_sizes)


def _check_publish_token(record: RunRecord) -> None:
    if record.hub_repo is None:
        return
    from huggingface_hub import get_token

    if not get_token():
        raise ConfigError(
            f"Publishing to {record.hub_repo} needs a Hugging Face write token and none was found: set "
            "HF_TOKEN in the environment or run `hf auth login` before training (sdtrain never takes a "
            "token as a flag and never writes it anywhere)."
        )


def run(
    config: RunConfig,
    *,
    resume: str = "auto",
    until: Stage = "publish",
    hub_api: HfApi | None = None,
) -> RunResult:
    """Run the DreamBooth flow, from photo check to export (and publishing with ``hub_repo``).

    Args:
        config: The options.
        resume: ``auto``, ``latest``, ``never`` or a checkpoint folder (see :func:`trainer.train.train`).
        until: Last stage to run: ``train`` (the ``sdtrain train`` command), ``sample``, ``export`` or
            ``publish`` (everything; publishing happens only when ``config.hub_repo`` is set).
        hub_api: A ``huggingface_hub.HfApi`` to publish with (tests pass a fake one).

    Returns:
        What was made.

    Raises:
        trainer.errors.TrainerError: bad options or photos, interrupted or failed training, ...
        ModelLoadError: the base model cannot be loaded.
    """
    from accelerate import PartialState

    from trainer.train import preflight, train

    state = PartialState()
    main = state.is_main_process
    order: list[Stage] = ["train", "sample", "export", "publish"]
    wanted = set(order[: order.index(until) + 1])

    # 1. check: options, base model, photos, optional features, token (before anything slow).
    prepared = prepare_run(config)
    record = prepared.record
    preflight(record)
    if "publish" in wanted:
        _check_publish_token(record)
    out = record.output_dir
    result = RunResult(record)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        record.write(out / "run.json")
        # 2. class images, generated once and cached in each concept's class folder.
        result.class_images = make_class_images(record, prepared.checks)
        gc.collect()
    state.wait_for_everyone()

    # 3. train.
    data = training_data(record, prepared.checks)
    result.train = train(record, data, resume=resume)
    _free_memory()
    if not main:
        return result

    # 4. samples from the fine-tuned model (the base model with the adapter, for LoRA).
    if "sample" in wanted and record.num_samples:
        from trainer.loading import load_run_pipeline
        from trainer.sample import generate_samples

        # A quantized run samples with its transformer quantized the same way (the full bf16
        # FLUX.1-dev transformer alone needs 24 GB); the adapter is the same either way.
        result.samples = generate_samples(
            load_run_pipeline(out, quantize_base=record.quantize_base),
            out / "samples",
            prompt=record.sample_prompt,
            negative_prompt=record.sample_negative_prompt,
            num_images=record.num_samples,
            num_inference_steps=record.sample_steps,
            guidance_scale=record.sample_guidance_scale,
            seed=record.sample_seed,
            resolution=record.resolution,
        )
        _free_memory()

    # 5. export: the adapter in kohya's format (LoRA), or one original-layout checkpoint file (full).
    if "export" in wanted and record.method == "lora":
        from trainer.lora_files import LORA_DIR, write_kohya_file

        result.export_path = write_kohya_file(out / LORA_DIR, architecture=record.architecture)
        console.print(f"Wrote the kohya/A1111/ComfyUI file {result.export_path}")
    elif "export" in wanted:
        from trainer.export import export_single_file

        target = out / "export" / f"model.{record.export_format}"
        result.export_path = export_single_file(out / "model", target, half=record.export_half, verify=True)
        console.print(f"Exported {result.export_path}")

    # 6. publish.
    if "publish" in wanted and record.hub_repo:
        from trainer.publish import publish_run

        result.hub_url = publish_run(out, record.hub_repo, private=record.hub_private, api=hub_api)
        console.print(f"Published {result.hub_url}")
    return result


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
