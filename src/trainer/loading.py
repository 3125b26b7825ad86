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

__all__ = ["ModelLoadError", "default_device", "default_dtype", "load_pipeline"]

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

    Returns:
        The pipeline, with the safety checker off and SDPA attention (diffusers' default).

    Raises:
        ModelLoadError: the model is missing, incomplete or could not be read.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline_cls: Any = StableDiffusionPipeline  # untyped loaders
    dev = torch.device(device) if device is not None else default_device()
    torch_dtype = dtype if dtype is not None else default_dtype(dev)
    path = Path(model)
    common: dict[str, Any] = {"dtype": torch_dtype}
    try:
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
    pipe.set_progress_bar_config(disable=True)
    loaded: StableDiffusionPipeline = pipe.to(dev)
    return loaded
