"""The files of a LoRA run: the diffusers adapter file and its kohya / A1111 / ComfyUI twin.

``OUT/lora/pytorch_lora_weights.safetensors`` is written by the pipeline class's own
``save_lora_weights`` (diffusers format: ``unet.`` / ``text_encoder.`` / ``text_encoder_2.``
prefixed keys, the PEFT adapter configs in the file's metadata) and loads with
``pipeline.load_lora_weights(OUT/lora)``. Text-encoder keys carry the ``text_model.`` level that
the released CLIP checkpoints have, so older transformers versions find them too.

``OUT/lora/pytorch_lora_weights_kohya.safetensors`` holds the same tensors under the names kohya's
sd-scripts write and A1111, ComfyUI and Forge read: ``lora_unet_<module>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha`` (module path with ``_`` for ``.``; the UNet keeps diffusers' block
names, as kohya does), ``lora_te_`` for the text encoder of SD 1.x/2.x and ``lora_te1_`` /
``lora_te2_`` for SDXL's two. diffusers' own kohya converter reads it back (see the tests).

A FLUX run adapts the transformer only: its file holds ``transformer.`` prefixed keys, written by
``FluxPipeline.save_lora_weights`` (``transformer_lora_layers``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from trainer._fs import atomic_write_bytes, publish_dir, temp_sibling

__all__ = [
    "KOHYA_WEIGHTS",
    "LORA_DIR",
    "LORA_WEIGHTS",
    "kohya_state_dict",
    "pipeline_class",
    "save_lora_weights",
    "write_kohya_file",
]

LORA_DIR = "lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
# A diffusers-format LoRA key: component, module path, down (A) or up (B).
_DIFFUSERS_KEY = re.compile(
    r"^(?P<part>unet|text_encoder|text_encoder_2)\.(?P<module>.+)\.(?:lora|lora_linear_layer)\."
    r"(?P<which>down|up)\.weight$"
)
_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the PEFT configs in the file


def pipeline_class(architecture: str) -> Any:
    """The diffusers pipeline class of an architecture (``sd1``/``sd2``: SD, ``sdxl``: SDXL, ``flux``)."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if architecture == "flux":
        return FluxPipeline
    return StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline


def _adapter_layers(model: Any) -> dict[str, Any]:
    """A model's adapter weights in diffusers naming (from PEFT's state dict)."""
    from diffusers.utils import state_dict_utils
    from peft.utils import get_peft_model_state_dict

    convert: Any = state_dict_utils.convert_state_dict_to_diffusers  # untyped
    layers: dict[str, Any] = convert(get_peft_model_state_dict(model))
    return {k: v.detach().float().contiguous().cpu() for k, v in layers.items()}


def _adapter_metadata(model: Any) -> dict[str, Any] | None:
    config = getattr(model, "peft_config", {}).get("default")
    return None if config is None else dict(config.to_dict())


def save_lora_weights(
    out: Path,
    *,
    architecture: str,
    unet: Any = None,
    text_encoders: list[Any] | None = None,
    transformer: Any = None,
) -> Path:
    """Write the adapters of ``unet`` (and the text encoders, first then second) to ``out``, atomically.

    Args:
        out: The folder (``OUT/lora``); replaced as a whole.
        architecture: ``sd1``, ``sd2``, ``sdxl`` or ``flux`` (picks the pipeline class that writes
            the file).
        unet: The UNet with its PEFT adapter (SD/SDXL).
        text_encoders: The text encoders that have adapters (empty when only the UNet was trained).
        transformer: FLUX's transformer with its PEFT adapter (instead of a UNet).

    Returns:
        ``out``, holding :data:`LORA_WEIGHTS`.
    """
    if architecture == "flux":
        kwargs: dict[str, Any] = {
            "transformer_lora_layers": _adapter_layers(transformer),
            "transformer_lora_adapter_metadata": _adapter_metadata(transformer),
        }
    else:
        kwargs = {
            "unet_lora_layers": _adapter_layers(unet),
            "unet_lora_adapter_metadata": _adapter_metadata(unet),
        }
    for name, text_encoder in zip(TEXT_ENCODER_NAMES, text_encoders or [], strict=False):
        layers = _adapter_layers(text_encoder)
        # transformers 5 leaves out the `text_model.` level of CLIPTextModel; the released files have it.
        kwargs[f"{name}_lora_layers"] = {
            (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in layers.items()
        }
        kwargs[f"{name}_lora_adapter_metadata"] = _adapter_metadata(text_encoder)
    tmp = temp_sibling(out)
    try:
        pipeline_class(architecture).save_lora_weights(str(tmp), weight_name=LORA_WEIGHTS, **kwargs)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _alphas(metadata: dict[str, str] | None) -> dict[str, float]:
    """Each component's LoRA alpha from the diffusers file's metadata (rank = alpha when absent)."""
    if not metadata or _METADATA_KEY not in metadata:
        return {}
    configs: dict[str, Any] = json.loads(metadata[_METADATA_KEY])
    alphas = {}
    for key, value in configs.items():
        # Keys are "<component>.<config key>", e.g. "unet.lora_alpha".
        part, _, name = key.partition(".")
        if name == "lora_alpha":
            alphas[part] = float(value)
    return alphas


def kohya_state_dict(
    diffusers_state: dict[str, Any], *, architecture: str, alphas: dict[str, float] | None = None
) -> dict[str, Any]:
    """Rename a diffusers-format LoRA state dict to kohya's names, adding each module's ``.alpha``.

    Args:
        diffusers_state: Keys such as ``unet.down_blocks.0...to_q.lora.down.weight``.
        architecture: ``sdxl`` names the text encoders ``lora_te1_``/``lora_te2_``, others ``lora_te_``.
        alphas: LoRA alpha per component (``unet``, ``text_encoder``, ``text_encoder_2``); a missing
            one is taken equal to the rank (diffusers' default).

    Raises:
        ValueError: a key is not a diffusers LoRA down/up weight.
    """
    import torch

    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if architecture == "sdxl" else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    out: dict[str, Any] = {}
    for key, tensor in diffusers_state.items():
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            raise ValueError(f"{key} is not a diffusers LoRA weight (…lora.down.weight / …lora.up.weight)")
        part, module, which = match["part"], match["module"], match["which"]
        name = prefixes[part] + module.replace(".", "_")
        out[f"{name}.lora_{which}.weight"] = tensor
        if which == "down":
            rank = tensor.shape[0]
            alpha = (alphas or {}).get(part, float(rank))
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=tensor.dtype)
    return out


def write_kohya_file(lora_dir: Path, *, architecture: str) -> Path:
    """Write :data:`KOHYA_WEIGHTS` beside the diffusers file of ``lora_dir`` (atomically).

    Returns:
        The written file.
    """
    from safetensors import safe_open
    from safetensors.torch import save

    source = lora_dir / LORA_WEIGHTS
    with safe_open(str(source), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    kohya = kohya_state_dict(state, architecture=architecture, alphas=_alphas(metadata))
    # kohya's own files say what they are in their metadata; A1111 shows these fields.
    info = {"ss_network_module": "networks.lora", "ss_base_model_version": _base_version(architecture)}
    return atomic_write_bytes(lora_dir / KOHYA_WEIGHTS, save(kohya, metadata=info))


def _base_version(architecture: str) -> str:
    return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(architecture, architecture)
