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

from trainer.errors import ConfigError

__all__ = [
    "DEFAULT_LEARNING_RATE",
    "STEPS_WARNING_THRESHOLD",
    "Concept",
    "ResolvedConcept",
    "RunConfig",
    "RunRecord",
    "build_config",
    "default_max_train_steps",
    "format_validation_error",
    "load_config_file",
    "slugify",
]

MixedPrecision = Literal["no", "fp16", "bf16"]
PredictionType = Literal["epsilon", "v_prediction"]

# diffusers' DreamBooth guide trains SD 1.x at 5e-6 with prior preservation; the Colab notebook
# this project follows used 1e-6 to 2e-6 at 512 px for ~1000+ steps. 5e-6 learns a face in the
# default 100 steps per photo; lower it (2e-6) for long runs or when samples look over-baked.
DEFAULT_LEARNING_RATE = 5e-6
STEPS_PER_PHOTO = 100
SMALL_SET_PHOTOS = 10  # fewer photos than this get STEPS_PER_PHOTO extra steps
STEPS_WARNING_THRESHOLD = 2000  # above this DreamBooth tends to over-fit (every image looks the same)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Keys whose values are paths: resolved against the config file's folder.
_PATH_KEYS = ("output_dir",)
_CONCEPT_PATH_KEYS = ("instance_dir", "class_dir")


def default_max_train_steps(num_photos: int) -> int:
    """The default number of training steps: 100 per photo, plus 100 when there are fewer than 10.

    >>> default_max_train_steps(4), default_max_train_steps(10), default_max_train_steps(25)
    (500, 1000, 2500)
    """
    if num_photos < 1:
        raise ValueError("num_photos must be at least 1")
    extra = STEPS_PER_PHOTO if num_photos < SMALL_SET_PHOTOS else 0
    return STEPS_PER_PHOTO * num_photos + extra


def slugify(text: str, max_length: int = 60) -> str:
    """A folder-safe name for a prompt: ``"a photo of a man"`` -> ``"a-photo-of-a-man"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "class"


class Concept(BaseModel):
    """One subject to learn: its photos and prompts (an entry of the notebook's ``concepts_list``)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    instance_prompt: str = Field(
        min_length=1, description="Prompt naming the subject, e.g. 'photo of sks man'."
    )
    instance_dir: Path = Field(description="Folder with the subject's photos (JPEG, PNG or WebP).")
    class_prompt: str | None = Field(
        default=None, min_length=1, description="Prompt for the subject's class, e.g. 'photo of a man'."
    )
    class_dir: Path | None = Field(
        default=None,
        description="Where class images are cached; default OUT/class_images/<class prompt>.",
    )


class ResolvedConcept(Concept):
    """A concept with its class folder decided (``None`` only without prior preservation)."""

    class_prompt: str | None = None
    class_dir: Path | None = None


class RunConfig(BaseModel):
    """Every option of ``sdtrain run``; ``None`` means "derive it" (see each field)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, validate_assignment=True)

    # -- input and output ---------------------------------------------------------------------
    base_model: str = Field(
        min_length=1,
        description="Hub id (stable-diffusion-v1-5/stable-diffusion-v1-5) or a local diffusers folder.",
    )
    concepts: list[Concept] = Field(min_length=1, description="The subjects to learn (at least one).")
    output_dir: Path = Field(description="Run folder: model/, checkpoints/, samples/, export/, run.json.")

    # -- training -------------------------------------------------------------------------------
    resolution: int | None = Field(
        default=None, ge=64, le=2048, description="Training size in pixels; default from the model."
    )
    max_train_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps; default 100 per photo (+100 under 10 photos)."
    )
    train_batch_size: int = Field(default=1, ge=1, description="Photos per step (per GPU).")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=DEFAULT_LEARNING_RATE, gt=0, lt=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(default=1e-2, ge=0)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    train_text_encoder: bool = False
    noise_offset: float = Field(
        default=0.0, ge=0, le=1, description="e.g. 0.05-0.1 for darker/brighter images."
    )
    seed: int = Field(default=1337, ge=0, lt=2**32)

    # -- prior preservation ---------------------------------------------------------------------
    with_prior_preservation: bool = True
    prior_loss_weight: float = Field(default=1.0, ge=0)
    num_class_images: int = Field(default=200, ge=1, description="Class images per concept.")
    class_batch_size: int = Field(default=4, ge=1, description="Class images generated per batch.")
    class_image_steps: int = Field(default=50, ge=1, description="Inference steps per class image.")

    # -- memory and speed -----------------------------------------------------------------------
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        default="auto", description="auto: fp16 on CUDA, none on the CPU."
    )
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    cache_latents: bool = True

    # -- checkpoints ----------------------------------------------------------------------------
    checkpointing_steps: int = Field(default=500, ge=1)
    checkpoints_total_limit: int = Field(default=2, ge=1, description="Checkpoints kept (newest).")

    # -- samples ------------------------------------------------------------------------------
    sample_prompt: str | None = Field(default=None, description="Default: the first instance prompt.")
    sample_negative_prompt: str | None = None
    num_samples: int = Field(default=4, ge=0, le=64)
    sample_steps: int = Field(default=50, ge=1)
    sample_guidance_scale: float = Field(default=7.5, ge=0)
    sample_seed: int | None = Field(default=None, ge=0, lt=2**32, description="Default: seed.")

    # -- export and publish ---------------------------------------------------------------------
    export_format: Literal["safetensors", "ckpt"] = "safetensors"
    export_half: bool = Field(
        default=True, description="fp16 single file (2 GB for SD 1.5), like the notebook."
    )
    hub_repo: str | None = Field(default=None, description="Publish to this Hub repo (owner/name).")
    hub_private: bool = True

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), e.g. {value - value % 8}")
        return value

    @field_validator("hub_repo")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not _HUB_ID.match(value):
            raise ValueError(
                "must look like 'owner/name' (your Hub user or organisation, then the repo name)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.with_prior_preservation:
            missing = [i for i, c in enumerate(self.concepts) if not c.class_prompt]
            if missing:
                raise ValueError(
                    f"concepts[{missing[0]}].class_prompt is required with prior preservation "
                    "(e.g. 'photo of a man'); or turn it off with --no-prior-preservation"
                )
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

    def resolved_concepts(self) -> list[ResolvedConcept]:
        """The concepts with default class folders filled in (``OUT/class_images/<prompt slug>``)."""
        out = []
        for c in self.concepts:
            class_dir = c.class_dir
            if self.with_prior_preservation and class_dir is None and c.class_prompt:
                class_dir = self.output_dir / "class_images" / slugify(c.class_prompt)
            out.append(ResolvedConcept(**{**c.model_dump(), "class_dir": class_dir}))
        return out


class RunRecord(RunConfig):
    """A run with every choice made: the content of ``OUT/run.json``.

    The publisher reads ``base_model``, ``base_model_license``, ``concepts``, ``resolution``,
    ``max_train_steps``, ``train_text_encoder``, ``learning_rate``, ``seed``, ``prediction_type``,
    ``sample_prompt``, ``mixed_precision``, ``with_prior_preservation`` and ``num_class_images``.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    concepts: list[ResolvedConcept] = Field(min_length=1)  # type: ignore[assignment]  # narrower
    resolution: int = Field(ge=64, le=2048)
    max_train_steps: int = Field(ge=1)
    mixed_precision: MixedPrecision
    sample_prompt: str
    sample_seed: int
    base_model_license: str | None = None
    prediction_type: PredictionType = "epsilon"
    num_instance_images: int = Field(default=0, ge=0)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    sdtrain_version: str = ""

    def training_fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint depends on: a resumed run must match them.

        ``max_train_steps`` is left out on purpose: resuming with more steps trains longer.
        """
        keys = (
            "base_model",
            "resolution",
            "train_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "lr_scheduler",
            "lr_warmup_steps",
            "train_text_encoder",
            "noise_offset",
            "seed",
            "with_prior_preservation",
            "prior_loss_weight",
            "use_8bit_adam",
            "num_instance_images",
        )
        data = self.model_dump(mode="json")
        fingerprint = {k: data[k] for k in keys}
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
