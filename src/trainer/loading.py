"""Loading a Stable Diffusion pipeline from a Hub id, a diffusers folder or a single file.

One place for it: class-image generation, sampling, export verification and ``sdtrain serve`` all
load pipelines the same way, on the same device, with the same dtype rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

    from trainer.config import QuantizeBase

__all__ = [
    "ModelLoadError",
    "default_device",
    "default_dtype",
    "load_pipeline",
    "load_run_pipeline",
    "load_vae",
    "resolve_run_model",
]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


def default_device() -> torch.device:
    """CUDA when available, then Apple's MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators, full precision on the CPU (where fp16 is slow or missing)."""
    import torch

    return torch.float32 if device.type == "cpu" else torch.float16


def load_pipeline(
    model: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
    local_files_only: bool = False,
    lora: str | Path | None = None,
    vae: str | Path | None = None,
    quantize_base: QuantizeBase = "none",
) -> StableDiffusionPipeline:
    """Load a text-to-image pipeline and move it to ``device``.

    Args:
        model: A diffusers folder (``model_index.json`` inside), a single ``.safetensors`` /
            ``.ckpt`` checkpoint, or a Hub model id such as
            ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
        device: Where to run; default :func:`default_device`.
        dtype: Weights dtype; default :func:`default_dtype` for the device.
        config: For a single file: a diffusers folder (or Hub id) whose configs describe the
            architecture. Without it diffusers asks the Hub.
        local_files_only: Never reach the network (a Hub id must then be in the local cache).
        lora: A LoRA adapter to load into the pipeline: a folder holding
            ``pytorch_lora_weights.safetensors`` (a run's ``lora/``) or a ``.safetensors`` file in the
            diffusers or kohya format.
        vae: A VAE to use instead of the model's own (a VAE folder or Hub id such as an "fp16-fix"
            SDXL VAE, or a pipeline folder with a ``vae/``).
        quantize_base: A FLUX pipeline's transformer loaded quantized (``nf4`` or ``int8``, see
            :mod:`trainer.quantize`) rather than in ``dtype``.

    Returns:
        The pipeline, with the safety checker off and SDPA attention (diffusers' default).

    Raises:
        ModelLoadError: the model (or the adapter) is missing, incomplete or could not be read.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline_cls: Any = _pipeline_class(model, local_files_only) or StableDiffusionPipeline  # untyped
    dev = torch.device(device) if device is not None else default_device()
    torch_dtype = dtype if dtype is not None else default_dtype(dev)
    path = Path(model)
    common: dict[str, Any] = {"dtype": torch_dtype}
    try:
        if vae is not None:
            common["vae"] = load_vae(vae, torch_dtype)
        if quantize_base != "none":
            common["transformer"] = _quantized_transformer(model, pipeline_cls, quantize_base, torch_dtype)
        if path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(
                    f"{path} is not a checkpoint: expected a {' or '.join(SINGLE_FILE_SUFFIXES)} file "
                    "or a diffusers folder."
                )
            kwargs: dict[str, Any] = dict(common)
            if config is not None:
                kwargs["config"] = str(config)
                kwargs["local_files_only"] = local_files_only or Path(config).is_dir()
            pipe = pipeline_cls.from_single_file(str(path), **kwargs)
        elif path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(
                    f"{path} has no model_index.json: point at a diffusers pipeline folder "
                    "(the 'model/' folder of a training run) or a single checkpoint file."
                )
            pipe = pipeline_cls.from_pretrained(
                str(path), safety_checker=None, requires_safety_checker=False, **common
            )
        elif path.is_absolute() or str(model).startswith((".", "~")) or str(model).count("/") != 1:
            raise ModelLoadError(
                f"{model} does not exist: give a diffusers folder, a checkpoint file "
                "or a Hub id (owner/name)."
            )
        else:
            pipe = pipeline_cls.from_pretrained(
                str(model),
                safety_checker=None,
                requires_safety_checker=False,
                local_files_only=local_files_only,
                **common,
            )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load {model}: {exc}. Check the path or Hub id; a gated model needs "
            "`hf auth login` and accepted terms on its Hub page."
        ) from exc
    if lora is not None:
        _load_lora(pipe, Path(lora))
    pipe.set_progress_bar_config(disable=True)
    loaded: StableDiffusionPipeline = pipe.to(dev)
    return loaded


def pipeline_class_name(model: str | Path, local_files_only: bool = False) -> str | None:
    """The pipeline class a diffusers folder (or Hub repo) names in ``model_index.json``; ``None``
    when there is none to read (offline, gated, missing: ``from_pretrained`` reports it properly)."""
    import json

    path = Path(model)
    index = path / "model_index.json"
    if not path.exists() and str(model).count("/") == 1 and not str(model).startswith((".", "~", "/")):
        from huggingface_hub import hf_hub_download

        try:  # a Hub id: its index is a small file (cached like the rest of the snapshot)
            index = Path(hf_hub_download(str(model), "model_index.json", local_files_only=local_files_only))
        except Exception:
            return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return None
    return name if isinstance(name, str) else None


def _pipeline_class(model: str | Path, local_files_only: bool = False) -> Any:
    """The SDXL or FLUX pipeline class when ``model_index.json`` names it, else ``None``."""
    import diffusers

    name = pipeline_class_name(model, local_files_only)
    return getattr(diffusers, name) if name in ("StableDiffusionXLPipeline", "FluxPipeline") else None


def _quantized_transformer(
    model: str | Path, pipeline_cls: Any, kind: QuantizeBase, dtype: torch.dtype
) -> Any:
    from trainer.quantize import load_quantized_transformer

    if pipeline_cls.__name__ != "FluxPipeline" or Path(model).is_file():
        raise ModelLoadError(
            f"Only a FLUX pipeline in diffusers layout loads with a quantized transformer, not {model}."
        )
    return load_quantized_transformer(str(model), kind, dtype)


def load_vae(vae: str | Path, dtype: torch.dtype | None = None) -> Any:
    """A VAE on its own: a VAE folder or Hub id (such as an "fp16-fix" SDXL VAE), or a pipeline
    folder holding a ``vae/``.

    Raises:
        OSError: it cannot be found or read.
    """
    from diffusers import AutoencoderKL

    loader: Any = AutoencoderKL  # untyped
    in_pipeline = (Path(vae) / "vae" / "config.json").is_file()
    return loader.from_pretrained(str(vae), subfolder="vae" if in_pipeline else None, dtype=dtype)


def _load_lora(pipe: Any, lora: Path) -> None:
    from trainer.lora_files import LORA_WEIGHTS

    if lora.is_dir() and not (lora / LORA_WEIGHTS).is_file():
        raise ModelLoadError(f"{lora} holds no {LORA_WEIGHTS}: is it the lora/ folder of a LoRA run?")
    if not lora.exists():
        raise ModelLoadError(f"The LoRA adapter {lora} does not exist.")
    try:
        if lora.is_dir():
            pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHTS)
        else:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"Could not load the LoRA adapter {lora} into {pipe.name_or_path}: {exc}"
        ) from exc


def resolve_run_model(model: str | Path) -> tuple[str, Path | None]:
    """What to load for ``model``: ``(pipeline, adapter or None)``.

    A run folder stands for its result: ``(base model, RUN/lora)`` for a LoRA run, ``(RUN/model,
    None)`` for a full fine-tune. Anything else is passed through as ``(model, None)``.
    """
    from trainer.lora_files import LORA_DIR, LORA_WEIGHTS

    path = Path(model)
    if not (path / "run.json").is_file():
        return str(model), None
    if (path / LORA_DIR / LORA_WEIGHTS).is_file():
        from trainer.config import RunRecord

        return RunRecord.read(path / "run.json").base_model, path / LORA_DIR
    if (path / "model" / "model_index.json").is_file():
        return str(path / "model"), None
    return str(model), None


def load_run_pipeline(run_dir: str | Path, **kwargs: Any) -> StableDiffusionPipeline:
    """Load what a run made (see :func:`resolve_run_model`); ``kwargs`` go to :func:`load_pipeline`.

    A LoRA run trained with ``--vae`` draws with that VAE too (a full run saved it in its model).
    """
    model, lora = resolve_run_model(run_dir)
    if lora is not None and "vae" not in kwargs:
        from trainer.config import RunRecord

        kwargs["vae"] = RunRecord.read(Path(run_dir) / "run.json").vae
    return load_pipeline(model, lora=lora, **kwargs)
