"""The configuration of a DreamBooth run: options from flags and/or a TOML/YAML file, validated once.

``RunConfig`` is what the user chose (``None`` = "work it out": the resolution from the base model,
the number of steps from the number of photos, ...). ``RunRecord`` is the same with every choice made
plus what was learnt about the base model; it is written to ``OUT/run.json``, which the publisher
reads and which a resumed run is checked against.

Precedence: flags > config file > defaults. Relative paths in a config file are relative to the file.
"""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdclient.protocol import HUB_ID
from trainer.errors import ConfigError

__all__ = [
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_LORA_LEARNING_RATE",
    "FLUX_ATTENTION_EXTRA",
    "FLUX_GUIDANCE_SCALE",
    "LORA_TARGET_PRESETS",
    "TEXT_ENCODER_LORA_TARGETS",
    "STEPS_WARNING_THRESHOLD",
    "Concept",
    "ResolvedConcept",
    "RunConfig",
    "RunRecord",
    "build_config",
    "default_max_train_steps",
    "expand_lora_targets",
    "format_validation_error",
    "load_config_file",
    "slugify",
]

MixedPrecision = Literal["no", "fp16", "bf16"]
# FLUX models learn a flow (the velocity from image to noise) rather than a noise prediction.
PredictionType = Literal["epsilon", "v_prediction", "flow_matching"]

# diffusers' DreamBooth guide trains SD 1.x at 5e-6 with prior preservation; the Colab notebook
# this project follows used 1e-6 to 2e-6 at 512 px for ~1000+ steps. 5e-6 learns a face in the
# default 100 steps per photo; lower it (2e-6) for long runs or when samples look over-baked.
DEFAULT_LEARNING_RATE = 5e-6
# diffusers' LoRA DreamBooth scripts and guides train adapters at 1e-4.
DEFAULT_LORA_LEARNING_RATE = 1e-4
Method = Literal["lora", "full"]
Architecture = Literal["sd1", "sd2", "sdxl", "flux"]
# How FLUX runs sample training timesteps (and weight the loss), as in diffusers' FLUX/SD3 scripts.
WeightingScheme = Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"]
# How a FLUX run holds its frozen transformer: as it is, or quantized (see trainer.quantize).
QuantizeBase = Literal["none", "nf4", "int8"]
# The UNet modules that get a LoRA adapter, by preset name (diffusers' scripts default to "attention").
LORA_TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention-ff": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
}
# On FLUX the "attention" preset also covers the text stream's projections of the double blocks
# (diffusers' FLUX LoRA script adapts both streams).
FLUX_ATTENTION_EXTRA = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# FLUX.1-dev is guidance-distilled: the guidance scale is an input of the transformer, and 3.5 is
# both the value diffusers' FLUX LoRA script trains with and FluxPipeline's default.
FLUX_GUIDANCE_SCALE = 3.5
FLUX_SAMPLE_STEPS = 28  # FluxPipeline's default number of inference steps
SD_GUIDANCE_SCALE = 7.5
SD_SAMPLE_STEPS = 50
# The CLIP text-encoder modules of a text-encoder adapter (as diffusers' LoRA scripts choose them).
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
STEPS_PER_PHOTO = 100
SMALL_SET_PHOTOS = 10  # fewer photos than this get STEPS_PER_PHOTO extra steps
# A FLUX LoRA's steps whatever the number of photos: the default of the hosted FLUX.1-dev LoRA
# trainers (fal's and Replicate's), which ask for 10-20 photos.
FLUX_TRAIN_STEPS = 1000
STEPS_WARNING_THRESHOLD = 2000  # above this DreamBooth tends to over-fit (every image looks the same)
# Keys whose values are paths: resolved against the config file's folder.
_PATH_KEYS = ("output_dir",)
_CONCEPT_PATH_KEYS = ("instance_dir", "class_dir")


def default_max_train_steps(num_photos: int, architecture: Architecture = "sd1") -> int:
    """The default number of training steps: 100 per photo, plus 100 when there are fewer than 10
    (DreamBooth's rule for SD and SDXL); 1000 for a FLUX LoRA.

    >>> default_max_train_steps(4), default_max_train_steps(10), default_max_train_steps(25)
    (500, 1000, 2500)
    >>> default_max_train_steps(15, "flux")
    1000
    """
    if num_photos < 1:
        raise ValueError("num_photos must be at least 1")
    if architecture == "flux":
        return FLUX_TRAIN_STEPS
    extra = STEPS_PER_PHOTO if num_photos < SMALL_SET_PHOTOS else 0
    return STEPS_PER_PHOTO * num_photos + extra


def slugify(text: str, max_length: int = 60) -> str:
    """A folder-safe name for a prompt: ``"a photo of a man"`` -> ``"a-photo-of-a-man"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "class"


# Help panels of ``sdtrain run`` / ``train``: each field names the one it is listed in.
# The largest photo accepted, in millions of pixels (trainer.photos refuses larger ones undecoded).
MAX_PHOTO_MEGAPIXELS = 64.0

INPUT = "Input and output"
TRAIN = "Training"
LORA = "LoRA (--method lora)"
PRIOR = "Prior preservation (class images)"
SPEED = "Memory and speed"
CKPT = "Checkpoints and resuming"
FLUX = "FLUX (flow matching)"
SAMPLE = "Samples"
EXPORT = "Export and publish"


def _cli(panel: str, *flags: str, show: str | bool | None = None) -> dict[str, Any]:
    """How a field appears on the command line (read by :mod:`trainer.cli`).

    Args:
        panel: The ``--help`` panel.
        *flags: The flag spellings when they differ from ``--field-name`` (``--x/--no-x`` for a switch).
        show: What ``--help`` shows as the default; default: the field's own default.
    """
    return {"cli": {"panel": panel, "flags": list(flags), "show_default": show}}


class Concept(BaseModel):
    """One subject to learn: its photos and prompts (an entry of the notebook's ``concepts_list``)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    instance_dir: Path = Field(
        description="Folder with 5-20 photos of the subject (JPEG, PNG, WebP).",
        json_schema_extra=_cli(INPUT, show=False),
    )
    instance_prompt: str = Field(
        min_length=1,
        description="Prompt naming the subject with a rare token: 'photo of sks man'.",
        json_schema_extra=_cli(INPUT, show=False),
    )
    class_prompt: str | None = Field(
        default=None,
        min_length=1,
        description="The subject's class: 'photo of a man' (prior preservation).",
        json_schema_extra=_cli(INPUT, show=False),
    )
    class_dir: Path | None = Field(
        default=None,
        description="Class image cache.",
        json_schema_extra=_cli(INPUT, show="OUT/class_images/<class prompt>"),
    )


class ResolvedConcept(Concept):
    """A concept with its class folder decided (``None`` only without prior preservation)."""

    class_prompt: str | None = None
    class_dir: Path | None = None


def expand_lora_targets(value: str | list[str]) -> list[str]:
    """Module names from ``--lora-target-modules``: a preset name or comma-separated names.

    >>> expand_lora_targets("attention")
    ['to_q', 'to_k', 'to_v', 'to_out.0']
    >>> expand_lora_targets("to_q, to_v")
    ['to_q', 'to_v']
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in (i.strip() for i in items):
        for name in LORA_TARGET_PRESETS.get(item, [item] if item else []):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"give module names or a preset ({', '.join(LORA_TARGET_PRESETS)})")
    return names


class RunConfig(BaseModel):
    """Every option of ``sdtrain run``; ``None`` means "derive it" (see each field).

    Each field's ``description`` is its ``--help`` text and its ``json_schema_extra["cli"]`` its
    panel and flag spellings: the ``run`` and ``train`` commands are built from these fields.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, validate_assignment=True)

    # -- input and output ---------------------------------------------------------------------
    base_model: str = Field(
        min_length=1,
        description="Hub id (stable-diffusion-v1-5/stable-diffusion-v1-5, "
        "stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev) or diffusers folder.",
        json_schema_extra=_cli(INPUT, show=False),
    )
    concepts: list[Concept] = Field(min_length=1, description="The subjects to learn (at least one).")
    output_dir: Path = Field(
        description="Run folder (lora/ or model/, checkpoints/, samples/, export/).",
        json_schema_extra=_cli(INPUT, "--output", "-o", show=False),
    )
    max_photo_megapixels: float = Field(
        default=MAX_PHOTO_MEGAPIXELS,
        gt=0,
        description="Photos with more pixels are refused, from their header (nothing is decoded).",
        json_schema_extra=_cli(INPUT, "--max-megapixels"),
    )

    # -- training -------------------------------------------------------------------------------
    method: Method = Field(
        default="lora",
        description="lora: train a small adapter (5-200 MB, less GPU memory, servable by Inference "
        "Providers); full: fine-tune every UNet weight (a 2-7 GB model).",
        json_schema_extra=_cli(TRAIN),
    )
    resolution: int | None = Field(
        default=None,
        ge=64,
        le=2048,
        description="Training size in px.",
        json_schema_extra=_cli(TRAIN, show="from the model: 512 SD 1.5, 768 SD 2.1, 1024 SDXL"),
    )
    aspect_buckets: bool | None = Field(
        default=None,
        description="Train each photo at the aspect-ratio bucket nearest its shape (about "
        "resolution² pixels, cropped as little as possible) instead of a centre-cropped square.",
        json_schema_extra=_cli(
            TRAIN, "--aspect-buckets/--no-aspect-buckets", show="on for SDXL and FLUX, off for SD 1.x/2.x"
        ),
    )
    max_train_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optimizer steps.",
        json_schema_extra=_cli(TRAIN, show="100 per photo, +100 under 10 photos; FLUX 1000"),
    )
    learning_rate: float = Field(
        default=DEFAULT_LORA_LEARNING_RATE,
        gt=0,
        lt=1,
        description="AdamW learning rate.",
        json_schema_extra=_cli(
            TRAIN, show=f"{DEFAULT_LORA_LEARNING_RATE} with lora, {DEFAULT_LEARNING_RATE} with full"
        ),
    )
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        default="constant",
        description="constant, constant_with_warmup, linear or cosine.",
        json_schema_extra=_cli(TRAIN),
    )
    lr_warmup_steps: int = Field(
        default=0,
        ge=0,
        description="Warm-up steps (with constant_with_warmup).",
        json_schema_extra=_cli(TRAIN),
    )
    train_batch_size: int = Field(
        default=1, ge=1, description="Photos per step and GPU.", json_schema_extra=_cli(TRAIN)
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, description="Micro-batches per optimizer step.", json_schema_extra=_cli(TRAIN)
    )
    train_text_encoder: bool = Field(
        default=False,
        description="Train the text encoder too (with lora: a text-encoder adapter).",
        json_schema_extra=_cli(TRAIN),
    )
    noise_offset: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Noise offset (0.05-0.1 helps very dark/bright images).",
        json_schema_extra=_cli(TRAIN),
    )
    seed: int = Field(
        default=1337, ge=0, lt=2**32, description="Seed for everything random.", json_schema_extra=_cli(TRAIN)
    )
    adam_beta1: float = Field(
        default=0.9, ge=0, lt=1, description="AdamW beta1.", json_schema_extra=_cli(TRAIN)
    )
    adam_beta2: float = Field(
        default=0.999, ge=0, lt=1, description="AdamW beta2.", json_schema_extra=_cli(TRAIN)
    )
    adam_weight_decay: float = Field(
        default=1e-2, ge=0, description="AdamW weight decay.", json_schema_extra=_cli(TRAIN)
    )
    adam_epsilon: float = Field(
        default=1e-8, gt=0, description="AdamW epsilon.", json_schema_extra=_cli(TRAIN)
    )
    max_grad_norm: float = Field(
        default=1.0, gt=0, description="Gradient clipping norm.", json_schema_extra=_cli(TRAIN)
    )

    # -- LoRA -------------------------------------------------------------------------------------
    lora_rank: int = Field(
        default=16, ge=1, le=1024, description="Rank of the LoRA matrices.", json_schema_extra=_cli(LORA)
    )
    lora_alpha: int = Field(
        default=16,
        ge=1,
        description="LoRA alpha: the update is scaled by alpha / rank.",
        json_schema_extra=_cli(LORA, show="--lora-rank"),
    )
    lora_dropout: float = Field(
        default=0.0, ge=0, lt=1, description="Dropout of the LoRA layers.", json_schema_extra=_cli(LORA)
    )
    lora_target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGET_PRESETS["attention"]),
        min_length=1,
        description="UNet modules that get an adapter: 'attention' (to_q,to_k,to_v,to_out.0), "
        "'attention-ff' (+ proj_in, proj_out, feed-forward) or comma-separated module names.",
        json_schema_extra=_cli(LORA, show="attention"),
    )

    # -- FLUX -------------------------------------------------------------------------------------
    flux_guidance: float = Field(
        default=FLUX_GUIDANCE_SCALE,
        ge=0,
        description="FLUX: the guidance value the transformer is given while training (FLUX.1-dev "
        "takes it as an input).",
        json_schema_extra=_cli(FLUX),
    )
    weighting_scheme: WeightingScheme = Field(
        default="none",
        description="FLUX: timestep sampling and loss weighting: none (uniform), logit_normal, mode, "
        "sigma_sqrt or cosmap.",
        json_schema_extra=_cli(FLUX),
    )
    logit_mean: float = Field(
        default=0.0, description="FLUX: mean of the logit_normal sampling.", json_schema_extra=_cli(FLUX)
    )
    logit_std: float = Field(
        default=1.0, gt=0, description="FLUX: std of the logit_normal sampling.", json_schema_extra=_cli(FLUX)
    )
    mode_scale: float = Field(
        default=1.29, description="FLUX: scale of the mode sampling.", json_schema_extra=_cli(FLUX)
    )

    # -- prior preservation ---------------------------------------------------------------------
    with_prior_preservation: bool | None = Field(
        default=None,
        description="Train on class images too, so the class is not forgotten.",
        json_schema_extra=_cli(
            PRIOR, "--prior-preservation/--no-prior-preservation", show="on; off for FLUX"
        ),
    )
    prior_loss_weight: float = Field(
        default=1.0, ge=0, description="Weight of the class images' loss.", json_schema_extra=_cli(PRIOR)
    )
    num_class_images: int = Field(
        default=200, ge=1, description="Class images per concept.", json_schema_extra=_cli(PRIOR)
    )
    class_batch_size: int = Field(
        default=4, ge=1, description="Class images generated per batch.", json_schema_extra=_cli(PRIOR)
    )
    class_image_steps: int | None = Field(
        default=None,
        ge=1,
        description="Inference steps per class image.",
        json_schema_extra=_cli(PRIOR, show=f"{SD_SAMPLE_STEPS}, FLUX {FLUX_SAMPLE_STEPS}"),
    )

    # -- memory and speed -----------------------------------------------------------------------
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        default="auto",
        description="auto (bf16/fp16 on CUDA, none on CPU), no, fp16 or bf16.",
        json_schema_extra=_cli(SPEED),
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Less memory, ~30% slower.", json_schema_extra=_cli(SPEED, show="off")
    )
    use_8bit_adam: bool = Field(
        default=False,
        description="8-bit AdamW (needs bitsandbytes, CUDA).",
        json_schema_extra=_cli(SPEED, "--use-8bit-adam/--no-8bit-adam", show="off"),
    )
    quantize_base: QuantizeBase = Field(
        default="none",
        description="FLUX: none, or hold the frozen transformer quantized while training (QLoRA): "
        "nf4 (bitsandbytes 4-bit, bf16 compute, CUDA) or int8 (torchao weight-only); needs the gpu "
        "extra. The LoRA files still apply to the full-precision base.",
        json_schema_extra=_cli(SPEED),
    )
    attention: Literal["sdpa", "xformers"] = Field(
        default="sdpa",
        description="sdpa (PyTorch) or xformers (needs xformers and CUDA).",
        json_schema_extra=_cli(SPEED),
    )
    cache_latents: bool = Field(
        default=True,
        description="Encode photos once instead of every step.",
        json_schema_extra=_cli(SPEED, show="on"),
    )
    vae: str | None = Field(
        default=None,
        description="Another VAE (folder or Hub id), e.g. an fp16-safe 'fp16-fix' SDXL VAE; "
        "otherwise SDXL's own VAE runs in fp32 (it overflows in fp16).",
        json_schema_extra=_cli(SPEED, show="the base model's"),
    )

    # -- checkpoints ----------------------------------------------------------------------------
    checkpointing_steps: int = Field(
        default=500,
        ge=1,
        description="Save a resumable checkpoint every N steps.",
        json_schema_extra=_cli(CKPT),
    )
    checkpoints_total_limit: int = Field(
        default=2, ge=1, description="Checkpoints kept (the newest).", json_schema_extra=_cli(CKPT)
    )

    # -- samples ------------------------------------------------------------------------------
    sample_prompt: str | None = Field(
        default=None,
        description="Prompt of the samples made after training.",
        json_schema_extra=_cli(SAMPLE, show="the instance prompt"),
    )
    sample_negative_prompt: str | None = Field(
        default=None, description="Negative prompt of the samples.", json_schema_extra=_cli(SAMPLE)
    )
    num_samples: int = Field(
        default=4, ge=0, le=64, description="Sample images (0: none).", json_schema_extra=_cli(SAMPLE)
    )
    sample_steps: int | None = Field(
        default=None,
        ge=1,
        description="Inference steps per sample.",
        json_schema_extra=_cli(SAMPLE, show=f"{SD_SAMPLE_STEPS}, FLUX {FLUX_SAMPLE_STEPS}"),
    )
    sample_guidance_scale: float | None = Field(
        default=None,
        ge=0,
        description="Guidance scale of the samples.",
        json_schema_extra=_cli(SAMPLE, show=f"{SD_GUIDANCE_SCALE}, FLUX {FLUX_GUIDANCE_SCALE}"),
    )
    sample_seed: int | None = Field(
        default=None,
        ge=0,
        lt=2**32,
        description="Seed of the first sample (+1 for each next).",
        json_schema_extra=_cli(SAMPLE, show="--seed"),
    )

    # -- export and publish ---------------------------------------------------------------------
    export_format: Literal["safetensors", "ckpt"] = Field(
        default="safetensors",
        description="safetensors or ckpt (pickle: only for old tools).",
        json_schema_extra=_cli(EXPORT),
    )
    export_half: bool = Field(
        default=True,
        description="fp16 (half the size) or fp32 single file.",
        json_schema_extra=_cli(EXPORT, "--export-half/--export-full", show="half"),
    )
    hub_repo: str | None = Field(
        default=None,
        description="Publish to this Hub repo (owner/name); token from HF_TOKEN or `hf auth login`.",
        json_schema_extra=_cli(EXPORT, show=False),
    )
    hub_private: bool = Field(
        default=True,
        description="Visibility of a new Hub repo.",
        json_schema_extra=_cli(EXPORT, "--private/--public", show="private"),
    )

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        """Defaults that depend on other options: the learning rate on the method, alpha on the rank."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("learning_rate") is None:
            full = data.get("method") == "full"
            data["learning_rate"] = DEFAULT_LEARNING_RATE if full else DEFAULT_LORA_LEARNING_RATE
        if data.get("lora_alpha") is None:
            data["lora_alpha"] = data.get("lora_rank", 16)
        return data

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _lora_targets(cls, value: Any) -> Any:
        return expand_lora_targets(value) if isinstance(value, str | list) else value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), e.g. {value - value % 8}")
        return value

    @field_validator("hub_repo")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not (HUB_ID.fullmatch(value) and "/" in value):
            raise ValueError(
                "must look like 'owner/name' (your Hub user or organisation, then the repo name)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.with_prior_preservation and (problem := self.missing_class_prompt()):
            raise ValueError(problem)
        prompts_by_dir: dict[Path, str | None] = {}
        for c in self.concepts:
            if c.class_dir is None:
                continue
            seen = prompts_by_dir.setdefault(c.class_dir, c.class_prompt)
            if seen != c.class_prompt:
                raise ValueError(
                    f"class_dir {c.class_dir} is shared by two class prompts ({seen!r} and "
                    f"{c.class_prompt!r}): give each class prompt its own folder"
                )
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError("lr_warmup_steps needs lr_scheduler 'constant_with_warmup' (or linear/cosine)")
        return self

    def missing_class_prompt(self) -> str | None:
        """What is wrong when prior preservation is on and a concept has no class prompt."""
        missing = [i for i, c in enumerate(self.concepts) if not c.class_prompt]
        if not missing:
            return None
        return (
            f"concepts[{missing[0]}].class_prompt is required with prior preservation "
            "(e.g. 'photo of a man'); or turn it off with --no-prior-preservation"
        )

    def resolved_concepts(self) -> list[ResolvedConcept]:
        """The concepts with default class folders filled in (``OUT/class_images/<prompt slug>``),
        unless prior preservation is off."""
        out = []
        for c in self.concepts:
            class_dir = c.class_dir
            if self.with_prior_preservation is not False and class_dir is None and c.class_prompt:
                class_dir = self.output_dir / "class_images" / slugify(c.class_prompt)
            out.append(ResolvedConcept(**{**c.model_dump(), "class_dir": class_dir}))
        return out


class RunRecord(RunConfig):
    """A run with every choice made: the content of ``OUT/run.json``.

    The publisher reads ``base_model``, ``base_model_license``, ``concepts``, ``resolution``,
    ``max_train_steps``, ``train_text_encoder``, ``learning_rate``, ``seed``, ``prediction_type``,
    ``sample_prompt``, ``mixed_precision``, ``with_prior_preservation`` and ``num_class_images``;
    for a LoRA run also ``method``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules`` and ``architecture`` (``sd1``, ``sd2``, ``sdxl`` or ``flux``).
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    concepts: list[ResolvedConcept] = Field(min_length=1)  # type: ignore[assignment]  # narrower
    resolution: int = Field(ge=64, le=2048)
    max_train_steps: int = Field(ge=1)
    mixed_precision: MixedPrecision
    sample_prompt: str
    sample_seed: int
    sample_steps: int = Field(default=SD_SAMPLE_STEPS, ge=1)
    class_image_steps: int = Field(default=SD_SAMPLE_STEPS, ge=1)
    sample_guidance_scale: float = Field(default=SD_GUIDANCE_SCALE, ge=0)
    base_model_license: str | None = None
    prediction_type: PredictionType = "epsilon"
    architecture: Architecture = "sd1"
    num_instance_images: int = Field(default=0, ge=0)
    aspect_buckets: bool = False  # decided: runs recorded before buckets existed trained on squares
    with_prior_preservation: bool = True  # decided (per base: off for FLUX unless asked for)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    sdtrain_version: str = ""

    @model_validator(mode="before")
    @classmethod
    def _sd_defaults_when_undecided(cls, data: Any) -> Any:
        """Steps and guidance left undecided (``None``) take the SD defaults (FLUX runs decide them in
        :func:`trainer.run.prepare_run`), undecided buckets are off and prior preservation on."""
        if isinstance(data, dict):
            undecided = (
                "sample_steps",
                "sample_guidance_scale",
                "class_image_steps",
                "aspect_buckets",
                "with_prior_preservation",
            )
            data = {k: v for k, v in data.items() if not (k in undecided and v is None)}
        return data

    def training_fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint depends on: a resumed run must match them.

        ``max_train_steps`` is left out on purpose: resuming with more steps trains longer.
        """
        keys: tuple[str, ...] = (
            "base_model",
            "resolution",
            "train_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "lr_scheduler",
            "lr_warmup_steps",
            "train_text_encoder",
            "method",
            "lora_rank",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "vae",
            "noise_offset",
            "seed",
            "with_prior_preservation",
            "prior_loss_weight",
            "use_8bit_adam",
            "num_instance_images",
        )
        if self.architecture == "flux":
            keys += (
                "flux_guidance",
                "weighting_scheme",
                "logit_mean",
                "logit_std",
                "mode_scale",
                "quantize_base",
            )
        data = self.model_dump(mode="json")
        fingerprint = {k: data[k] for k in keys}
        # Off is None, as in checkpoints saved before buckets existed (they trained on squares).
        fingerprint["aspect_buckets"] = True if self.aspect_buckets else None
        fingerprint["concepts"] = [
            {"instance_prompt": c["instance_prompt"], "class_prompt": c["class_prompt"]}
            for c in data["concepts"]
        ]
        return fingerprint

    def write(self, path: Path) -> Path:
        """Write the record as JSON (atomically: a crash never leaves half a file)."""
        from trainer._fs import atomic_write_text

        return atomic_write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        """Read ``run.json``.

        Raises:
            ConfigError: the file is missing or not a valid record.
        """
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"{path} does not exist: is {path.parent} the output folder of a run?"
            ) from None
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source=str(path))) from None


def format_validation_error(exc: ValidationError, *, source: str = "configuration") -> str:
    """One line per invalid field, named as a user writes it (``concepts[0].instance_dir``)."""
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] == "extra_forbidden":
            msg = "is not an option (check the spelling; options use snake_case in files)"
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
        lines.append(f"  - {loc or '(top level)'}: {msg}")
    return f"Invalid {source}:\n" + "\n".join(lines)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a ``.toml`` / ``.yaml`` / ``.yml`` config file into a dict, paths made absolute.

    Raises:
        ConfigError: missing file, unknown suffix, syntax error or not a mapping.
    """
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"Config file {path} must end in .toml, .yaml or .yml.")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except Exception as exc:  # yaml.YAMLError, imported lazily
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of options (key = value), not {type(data).__name__}.")
    return _absolute_paths(data, path.parent.resolve())


def _absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(data)
    for key in _PATH_KEYS:
        if isinstance(out.get(key), str):
            out[key] = str(base / out[key])
    model = out.get("base_model")
    if isinstance(model, str) and (base / model).exists():
        out["base_model"] = str(base / model)
    if isinstance(out.get("concepts"), list):
        concepts = []
        for c in out["concepts"]:
            if isinstance(c, dict):
                c = dict(c)
                for key in _CONCEPT_PATH_KEYS:
                    if isinstance(c.get(key), str):
                        c[key] = str(base / c[key])
            concepts.append(c)
        out["concepts"] = concepts
    return out


CONCEPT_FIELDS = ("instance_prompt", "instance_dir", "class_prompt", "class_dir")


def build_config(config_file: Path | None = None, **overrides: Any) -> RunConfig:
    """Merge a config file and flag values (flags win) into a validated :class:`RunConfig`.

    Args:
        config_file: Optional ``.toml``/``.yaml`` file.
        **overrides: Options given as flags; ``None`` values mean "not given". The concept keys
            (``instance_prompt``, ``instance_dir``, ``class_prompt``, ``class_dir``) describe
            one concept: they fill or override the file's only concept, or make one.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: a field is missing or invalid (each one named), or concept flags were given
            while the file has several concepts.
    """
    data = load_config_file(config_file) if config_file is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    concept_flags = {k: given.pop(k) for k in CONCEPT_FIELDS if k in given}
    data.update(given)
    if concept_flags:
        concepts = data.get("concepts") or [{}]
        if not isinstance(concepts, list) or len(concepts) != 1:
            raise ConfigError(
                f"{config_file} defines {len(concepts) if isinstance(concepts, list) else 'several'} "
                f"concepts; --{next(iter(concept_flags)).replace('_', '-')} can only change a run with "
                "one concept. Edit the concepts in the config file instead."
            )
        data["concepts"] = [{**concepts[0], **concept_flags}]
    source = f"configuration ({config_file} and flags)" if config_file else "options"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc, source=source)
        if "concepts" not in data:
            message += "\n  (give --instance-dir and --instance-prompt, or [[concepts]] in a --config file)"
        raise ConfigError(message) from None
