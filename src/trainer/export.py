"""Export a diffusers Stable Diffusion folder as one original-layout (CompVis/LDM) checkpoint.

*Only* the UNet, the VAE and the text encoder are converted (the tokenizer and the scheduler are
not part of an original checkpoint). The key tables live in :mod:`trainer._keymaps` and are
derived from the model's configs. The text encoder's layout follows its architecture: OpenAI CLIP
(SD 1.x, ``quick_gelu``) keeps transformers' names under ``cond_stage_model.transformer.``; OpenCLIP
(SD 2.x, ``gelu``) uses open_clip's names under ``cond_stage_model.model.`` with q, k and v fused.

The export checks itself: diffusers' own single-file converters
(``diffusers.loaders.single_file_utils``, what ``from_single_file`` runs) read the written file
back, and every tensor must equal the folder's, bit for bit.

```python
from trainer.export import export_single_file

export_single_file(Path("out/model"), Path("out/export/model.safetensors"))
```
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trainer import _keymaps
from trainer._keymaps import KeyMapError, Rule
from trainer.errors import TrainerError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ExportError",
    "ExportVerificationError",
    "ModelParts",
    "TextEncoderLayout",
    "export_single_file",
    "load_model_parts",
    "restore_diffusers_state_dicts",
    "text_encoder_layout",
    "to_original_state_dict",
    "verify_single_file",
]

logger = logging.getLogger(__name__)

TextEncoderLayout = Literal["clip", "openclip"]
SUFFIXES = (".safetensors", ".ckpt")
PICKLE_WARNING = (
    "Writing a pickle (.ckpt) checkpoint: loading a pickle file can run arbitrary code, so many tools "
    "refuse or warn about them. Prefer .safetensors unless a tool needs .ckpt."
)
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
_MAX_LISTED = 20


class ExportError(TrainerError, RuntimeError):
    """The model cannot be exported; the message says why."""


class ExportVerificationError(ExportError):
    """The written checkpoint does not convert back to the model's exact tensors.

    Attributes:
        problems: One line per mismatching key (``component: key: what differs``).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        super().__init__(
            f"The exported checkpoint does not round-trip through diffusers' converters "
            f"({len(problems)} mismatching keys):\n  {listed}{more}"
        )


@dataclass
class ModelParts:
    """The three converted components of a pipeline: their state dicts and configs."""

    unet: dict[str, torch.Tensor]
    unet_config: dict[str, Any]
    vae: dict[str, torch.Tensor]
    vae_config: dict[str, Any]
    text_encoder: dict[str, torch.Tensor]
    text_encoder_config: dict[str, Any]


def text_encoder_layout(text_encoder_config: Mapping[str, Any]) -> TextEncoderLayout:
    """Which original layout a ``CLIPTextModel`` config belongs to.

    SD 2.x's OpenCLIP ViT-H/14 uses GELU; SD 1.x's OpenAI CLIP ViT-L/14 uses quick GELU.
    """
    return "openclip" if text_encoder_config.get("hidden_act") == "gelu" else "clip"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(
            f"{path} is missing: is {path.parent.parent} a complete diffusers folder?"
        ) from None
    return data


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A component's state dict as saved (safetensors or .bin, sharded or not, keeping dtypes)."""
    import torch
    from safetensors.torch import load_file

    for variant in ("", ".fp16"):
        for name in _WEIGHT_NAMES:
            single = folder / f"{name}{variant}.safetensors"
            if single.is_file():
                return load_file(single)
            index = folder / f"{name}{variant}.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(_read_json(index)["weight_map"].values()))
                merged: dict[str, torch.Tensor] = {}
                for shard in shards:
                    merged.update(load_file(folder / shard))
                return merged
            pickled = folder / f"{name}{variant}.bin"
            if pickled.is_file():
                loaded: dict[str, torch.Tensor] = torch.load(pickled, map_location="cpu", weights_only=True)
                return loaded
    raise ExportError(
        f"No weights found in {folder} (expected diffusion_pytorch_model.safetensors or similar)."
    )


def load_model_parts(model_dir: Path) -> ModelParts:
    """Read the UNet, VAE and text encoder of a diffusers folder, as stored on disk.

    Raises:
        ExportError: the folder is not a diffusers Stable Diffusion pipeline.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ExportError(
            f"{model_dir} has no model_index.json: point at a diffusers pipeline folder "
            "(the 'model/' folder of a training run)."
        )
    text = {
        # transformers >= 5.6 saves CLIPTextModel without the `text_model.` prefix; older versions with it.
        key.removeprefix("text_model."): tensor
        for key, tensor in _load_weights(model_dir / "text_encoder").items()
    }
    return ModelParts(
        unet=_load_weights(model_dir / "unet"),
        unet_config=_read_json(model_dir / "unet" / "config.json"),
        vae=_load_weights(model_dir / "vae"),
        vae_config=_read_json(model_dir / "vae" / "config.json"),
        text_encoder=text,
        text_encoder_config=_read_json(model_dir / "text_encoder" / "config.json"),
    )


def _apply_rules(
    state_dict: Mapping[str, torch.Tensor], rules: list[Rule], errors: list[str], component: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        try:
            ldm_key, rule = _keymaps.map_key(key, rules)
        except KeyMapError as exc:
            errors.append(f"{component}: {exc}")
            continue
        if rule.conv_1x1 and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[ldm_key] = tensor
    return out


_QKV_KEY = re.compile(r"encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj\.)(weight|bias)")


def _convert_openclip(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], errors: list[str]
) -> dict[str, torch.Tensor]:
    import torch

    rules = _keymaps.openclip_rules(config)
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "embeddings.position_ids":  # an arange buffer; open_clip has none
            continue
        match = _QKV_KEY.fullmatch(key)
        if match:
            fused.setdefault((int(match[1]), match[3]), {})[match[2]] = tensor
        else:
            rest[key] = tensor
    out = _apply_rules(rest, rules, errors, "text_encoder")
    for (layer, kind), parts in sorted(fused.items()):
        if set(parts) != set(_keymaps.OPENCLIP_QKV):
            errors.append(f"text_encoder: layer {layer} lacks some of q/k/v {kind}s: {sorted(parts)}")
            continue
        key = f"{_keymaps.OPENCLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"
        out[key] = torch.cat([parts[name] for name in _keymaps.OPENCLIP_QKV], dim=0)
    return out


def to_original_state_dict(parts: ModelParts, *, half: bool = False) -> dict[str, torch.Tensor]:
    """The original-layout state dict (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.*``) of a pipeline's three components.

    Args:
        parts: The components, e.g. from :func:`load_model_parts`.
        half: Cast floating-point tensors to float16 (others keep their dtype).

    Returns:
        A new dict; tensors are the inputs' own (or reshaped/concatenated copies).

    Raises:
        ExportError: a config or key the original layout cannot express (all such keys listed).
    """
    import torch

    errors: list[str] = []
    try:
        unet_rules = _keymaps.unet_rules(parts.unet_config)
        vae_rules = _keymaps.vae_rules(parts.vae_config)
    except KeyMapError as exc:
        raise ExportError(f"Cannot export this model to the original Stable Diffusion layout: {exc}") from exc
    out = _apply_rules(parts.unet, unet_rules, errors, "unet")
    out.update(_apply_rules(parts.vae, vae_rules, errors, "vae"))
    if text_encoder_layout(parts.text_encoder_config) == "openclip":
        out.update(_convert_openclip(parts.text_encoder, parts.text_encoder_config, errors))
    else:
        out.update(_apply_rules(parts.text_encoder, _keymaps.clip_rules(), errors, "text_encoder"))
    if errors:
        listed = "\n  ".join(errors[:_MAX_LISTED])
        raise ExportError(
            f"Cannot export this model to the original Stable Diffusion layout "
            f"({len(errors)} keys have no counterpart):\n  {listed}"
        )
    if half:
        out = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in out.items()}
    return out


def restore_diffusers_state_dicts(
    checkpoint: Mapping[str, torch.Tensor],
    *,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoder_config: Mapping[str, Any],
) -> dict[str, dict[str, torch.Tensor]]:
    """Convert an original-layout checkpoint back with diffusers' own single-file converters.

    These are the functions ``from_single_file`` runs. Text-encoder keys come back without the
    ``text_model.`` prefix, as :func:`load_model_parts` reads them.

    Returns:
        ``{"unet": ..., "vae": ..., "text_encoder": ...}``.
    """
    import torch
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    ckpt = dict(checkpoint)
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    unet = sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet_config))  # type: ignore[no-untyped-call]
    vae = sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae_config))  # type: ignore[no-untyped-call]
    if text_encoder_layout(text_encoder_config) == "openclip":
        # The converter reads only the model's config (hidden size): build it without weights.
        with torch.device("meta"):
            shell = CLIPTextModel(CLIPTextConfig.from_dict(dict(text_encoder_config)))
        text = sfu.convert_open_clip_checkpoint(shell, ckpt)  # type: ignore[no-untyped-call]
    else:
        text = sfu.convert_ldm_clip_checkpoint(ckpt)  # type: ignore[no-untyped-call]
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": {k.removeprefix("text_model."): v for k, v in text.items()},
    }


def compare_state_dicts(
    component: str,
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    values: bool = True,
) -> list[str]:
    """One line per key that is missing, unexpected, or differs in dtype, shape or (bitwise) value."""
    import torch

    problems = [
        f"{component}: {k}: missing after the round trip" for k in sorted(set(expected) - set(actual))
    ]
    problems += [f"{component}: {k}: unexpected key" for k in sorted(set(actual) - set(expected))]
    for key in sorted(set(actual) & set(expected)):
        got, want = actual[key], expected[key]
        if got is None:
            problems.append(f"{component}: {key}: converted to nothing")
        elif got.dtype != want.dtype:
            problems.append(f"{component}: {key}: dtype {got.dtype} != {want.dtype}")
        elif tuple(got.shape) != tuple(want.shape):
            problems.append(f"{component}: {key}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        elif values and not torch.equal(got, want):
            problems.append(f"{component}: {key}: values differ")
    return problems


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state: dict[str, torch.Tensor] = loaded.get("state_dict", loaded)
    return state


def _expected(parts: ModelParts, half: bool) -> dict[str, dict[str, torch.Tensor]]:
    import torch

    def cast(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(torch.float16) if half and v.is_floating_point() else v for k, v in sd.items()}

    text = cast(parts.text_encoder)
    if text_encoder_layout(parts.text_encoder_config) == "openclip":
        text.pop("embeddings.position_ids", None)
    return {"unet": cast(parts.unet), "vae": cast(parts.vae), "text_encoder": text}


def _verify(checkpoint: Mapping[str, torch.Tensor], parts: ModelParts, half: bool) -> None:
    restored = restore_diffusers_state_dicts(
        checkpoint,
        unet_config=parts.unet_config,
        vae_config=parts.vae_config,
        text_encoder_config=parts.text_encoder_config,
    )
    expected = _expected(parts, half)
    problems: list[str] = []
    for component in ("unet", "vae", "text_encoder"):
        problems += compare_state_dicts(component, restored[component], expected[component])
    if problems:
        raise ExportVerificationError(problems)


def verify_single_file(path: Path, model_dir: Path, *, half: bool = False) -> None:
    """Check that ``path`` converts back, through diffusers, to ``model_dir``'s exact tensors.

    Args:
        path: A ``.safetensors`` or ``.ckpt`` checkpoint written by :func:`export_single_file`.
        model_dir: The diffusers folder it was exported from.
        half: The checkpoint was exported with ``half=True`` (compare against float16 casts).

    Raises:
        ExportVerificationError: some tensors differ; ``.problems`` lists them.
    """
    _verify(_read_checkpoint(Path(path)), load_model_parts(Path(model_dir)), half)


def _metadata(model_dir: Path, parts: ModelParts) -> dict[str, str]:
    """safetensors header metadata: the ``format`` key and Stability AI's ModelSpec fields."""
    scheduler_config = model_dir / "scheduler" / "scheduler_config.json"
    prediction = "epsilon"
    if scheduler_config.is_file():
        prediction = _read_json(scheduler_config).get("prediction_type", "epsilon")
    sd2 = text_encoder_layout(parts.text_encoder_config) == "openclip"
    if not sd2:
        architecture = "stable-diffusion-v1"
    else:
        architecture = (
            "stable-diffusion-v2-768-v" if prediction == "v_prediction" else "stable-diffusion-v2-512"
        )
    vae_scale = 2 ** (len(parts.vae_config["block_out_channels"]) - 1)
    size = int(parts.unet_config.get("sample_size", 64)) * vae_scale
    title = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    return {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or "model",
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
    }


def _contiguous(state: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state}


def export_single_file(model_dir: Path, out_path: Path, *, half: bool = False, verify: bool = True) -> Path:
    """Write a diffusers Stable Diffusion folder as one original-layout checkpoint.

    The file loads in tools that take original checkpoints, and in diffusers with
    ``StableDiffusionPipeline.from_single_file(path, config=model_dir)``.

    Args:
        model_dir: A diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
            ``text_encoder/``), e.g. a training run's ``model/``.
        out_path: ``*.safetensors`` (recommended; carries ``format: pt`` and ModelSpec metadata)
            or ``*.ckpt`` (a pickle of ``{"state_dict": ...}``; a warning says why to avoid it).
            Parent folders are created; an existing file is replaced only once the new one is
            complete (and verified).
        half: Store floating-point tensors as float16 (half the size).
        verify: Convert the written file back with diffusers' converters and require every tensor
            to be bit-identical to the folder's (after the float16 cast with ``half``).

    Returns:
        ``out_path``.

    Raises:
        ExportError: the folder is not a convertible pipeline, or ``out_path`` has another suffix.
        ExportVerificationError: the round trip changed some tensors (nothing is written then).
    """
    import torch
    from safetensors.torch import save_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_path.suffix not in SUFFIXES:
        raise ExportError(f"{out_path}: the checkpoint must end in .safetensors or .ckpt.")
    parts = load_model_parts(model_dir)
    state = _contiguous(to_original_state_dict(parts, half=half).items())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.partial{out_path.suffix}")
    try:
        if out_path.suffix == ".safetensors":
            save_file(state, tmp, metadata=_metadata(model_dir, parts))
        else:
            warnings.warn(PICKLE_WARNING, UserWarning, stacklevel=2)
            torch.save({"state_dict": state}, tmp)
        del state
        if verify:
            _verify(_read_checkpoint(tmp), parts, half)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info(
        "Exported %s to %s (%.1f MB%s%s)",
        model_dir,
        out_path,
        out_path.stat().st_size / 1e6,
        ", float16" if half else "",
        ", verified bit-exact" if verify else "",
    )
    return out_path
