"""Export a diffusers Stable Diffusion folder, or a LoRA run fused into its base, as one
original-layout checkpoint (CompVis/LDM for SD 1.x / 2.x, Stability AI's ``sgm`` for SDXL).

*Only* the UNet, the VAE and the text encoder(s) are converted (the tokenizers and the scheduler
are not part of an original checkpoint). The key tables live in :mod:`trainer._keymaps` and are
derived from the model's configs. The text encoder's layout follows its architecture: OpenAI CLIP
(SD 1.x, ``quick_gelu``) keeps transformers' names under ``cond_stage_model.transformer.``; OpenCLIP
(SD 2.x, ``gelu``) uses open_clip's names under ``cond_stage_model.model.`` with q, k and v fused.
SDXL, as ``sd_xl_base_1.0.safetensors``: CLIP ViT-L under ``conditioner.embedders.0.transformer.``,
OpenCLIP bigG (with its ``text_projection``) under ``conditioner.embedders.1.model.``.

The export checks itself: diffusers' own single-file converters
(``diffusers.loaders.single_file_utils``, what ``from_single_file`` runs) read the written file
back, and every tensor must equal the folder's, bit for bit.

SD 2.x files get two more things, because other tools need them:

- ``<file>.yaml`` beside the checkpoint: the original inference config (``v2-inference-v.yaml``
  for a v-prediction model, with ``parameterization: "v"``; ``v2-inference.yaml`` for an epsilon
  one), its sizes taken from the model's configs. AUTOMATIC1111 loads a ``.yaml`` of the
  checkpoint's name before guessing; without one, it guesses v-prediction by running the UNet
  once on a test input. ComfyUI reads no ``.yaml`` (only its deprecated ``CheckpointLoader`` node
  takes a config): it guesses from a weight, calling an SD 2.x model v-prediction when the standard
  deviation of ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` exceeds 0.09. The ``v_pred``
  key it looks for marks SDXL models only. The export logs a warning when that guess would be
  wrong; ComfyUI's ``ModelSamplingDiscrete`` node (sampling: ``v_prediction``) then fixes it.
  diffusers reads the UNet and VAE shapes from the ``.yaml`` (``original_config=``), not its
  ``parameterization``: its scheduler comes from ``config=`` (or a guess without one).
- The OpenCLIP tensors that released SD 2.x checkpoints carry and diffusers' text encoder does
  not: the 24th (last) transformer layer (SD 2.x conditions on the penultimate one, so diffusers
  keeps 23), ``text_projection`` and ``logit_scale``. They are copied, as stored, from the base
  model's own single file (``base_single_file=``, ``sdtrain export --base-single-file``). Without
  one they are left out and a warning says so: diffusers, A1111 and ComfyUI load the file and make
  the same images (the missing tensors are not used to condition SD 2.x; A1111 and ComfyUI report
  them as missing keys), but tools that need the whole OpenCLIP model, such as merges with released
  checkpoints that expect the same keys, do not get it.

```python
from trainer.export import export_merged, export_single_file

export_single_file(Path("out/model"), Path("out/export/model.safetensors"))
export_merged(Path("lora-run"), Path("lora-run/export/model.safetensors"))  # base + adapter, fused
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
from trainer.lora_files import LORA_DIR, LORA_WEIGHTS

if TYPE_CHECKING:
    import torch

__all__ = [
    "Architecture",
    "ExportError",
    "ExportVerificationError",
    "ModelParts",
    "TextEncoderLayout",
    "export_merged",
    "export_single_file",
    "config_path",
    "load_model_parts",
    "merge_lora",
    "openclip_extras",
    "original_config",
    "parts_from_pipeline",
    "restore_diffusers_state_dicts",
    "text_encoder_layout",
    "to_original_state_dict",
    "verify_single_file",
]

logger = logging.getLogger(__name__)

TextEncoderLayout = Literal["clip", "openclip"]
Architecture = Literal["sd1", "sd2", "sdxl"]
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
    """The converted components of a pipeline: their state dicts and configs.

    Text-encoder keys carry no ``text_model.`` prefix (``encoder.layers.0...``); SDXL's second
    encoder keeps its ``text_projection.weight``.
    """

    unet: dict[str, torch.Tensor]
    unet_config: dict[str, Any]
    vae: dict[str, torch.Tensor]
    vae_config: dict[str, Any]
    text_encoder: dict[str, torch.Tensor]
    text_encoder_config: dict[str, Any]
    text_encoder_2: dict[str, torch.Tensor] | None = None
    text_encoder_2_config: dict[str, Any] | None = None
    prediction_type: str = "epsilon"
    scheduler_config: dict[str, Any] | None = None

    @property
    def architecture(self) -> Architecture:
        """``sdxl`` (two text encoders), ``sd2`` (OpenCLIP) or ``sd1`` (OpenAI CLIP)."""
        if self.text_encoder_2 is not None:
            return "sdxl"
        return "sd2" if text_encoder_layout(self.text_encoder_config) == "openclip" else "sd1"

    def components(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"unet": ..., "vae": ..., "text_encoder": ...[, "text_encoder_2": ...]}``."""
        out = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        return out


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

    def text(name: str) -> dict[str, torch.Tensor]:
        # transformers >= 5.6 saves CLIPTextModel without the `text_model.` prefix; Hub repos have it.
        return {key.removeprefix("text_model."): t for key, t in _load_weights(model_dir / name).items()}

    second = (model_dir / "text_encoder_2").is_dir()
    scheduler_config = model_dir / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_config) if scheduler_config.is_file() else None
    prediction = (scheduler or {}).get("prediction_type", "epsilon")
    return ModelParts(
        unet=_load_weights(model_dir / "unet"),
        unet_config=_read_json(model_dir / "unet" / "config.json"),
        vae=_load_weights(model_dir / "vae"),
        vae_config=_read_json(model_dir / "vae" / "config.json"),
        text_encoder=text("text_encoder"),
        text_encoder_config=_read_json(model_dir / "text_encoder" / "config.json"),
        text_encoder_2=text("text_encoder_2") if second else None,
        text_encoder_2_config=_read_json(model_dir / "text_encoder_2" / "config.json") if second else None,
        prediction_type=prediction,
        scheduler_config=scheduler,
    )


def parts_from_pipeline(pipe: Any) -> ModelParts:
    """The components of a loaded diffusers pipeline (e.g. after fusing a LoRA), as in memory."""

    def text(model: Any) -> dict[str, torch.Tensor]:
        return {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}

    second = getattr(pipe, "text_encoder_2", None)
    return ModelParts(
        unet=pipe.unet.state_dict(),
        unet_config=dict(pipe.unet.config),
        vae=pipe.vae.state_dict(),
        vae_config=dict(pipe.vae.config),
        text_encoder=text(pipe.text_encoder),
        text_encoder_config=pipe.text_encoder.config.to_dict(),
        text_encoder_2=text(second) if second is not None else None,
        text_encoder_2_config=second.config.to_dict() if second is not None else None,
        prediction_type=str(pipe.scheduler.config.get("prediction_type", "epsilon")),
        scheduler_config=dict(pipe.scheduler.config),
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
        if rule.transpose:
            tensor = tensor.T.contiguous()
        out[ldm_key] = tensor
    return out


_QKV_KEY = re.compile(r"encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj\.)(weight|bias)")


def _convert_openclip(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    errors: list[str],
    *,
    prefix: str = _keymaps.OPENCLIP_PREFIX,
    component: str = "text_encoder",
) -> dict[str, torch.Tensor]:
    import torch

    rules = _keymaps.openclip_rules(config, prefix)
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
    out = _apply_rules(rest, rules, errors, component)
    for (layer, kind), parts in sorted(fused.items()):
        if set(parts) != set(_keymaps.OPENCLIP_QKV):
            errors.append(f"{component}: layer {layer} lacks some of q/k/v {kind}s: {sorted(parts)}")
            continue
        key = f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"
        out[key] = torch.cat([parts[name] for name in _keymaps.OPENCLIP_QKV], dim=0)
    return out


def to_original_state_dict(parts: ModelParts, *, half: bool = False) -> dict[str, torch.Tensor]:
    """The original-layout state dict (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.*``, or ``conditioner.embedders.*`` for SDXL) of a pipeline's components.

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
    if parts.architecture == "sdxl":
        assert parts.text_encoder_2 is not None and parts.text_encoder_2_config is not None
        clip = _keymaps.clip_rules(_keymaps.SGM_CLIP_PREFIX)
        out.update(_apply_rules(parts.text_encoder, clip, errors, "text_encoder"))
        out.update(
            _convert_openclip(
                parts.text_encoder_2,
                parts.text_encoder_2_config,
                errors,
                prefix=_keymaps.SGM_OPENCLIP_PREFIX,
                component="text_encoder_2",
            )
        )
    elif parts.architecture == "sd2":
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
    text_encoder_2_config: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Convert an original-layout checkpoint back with diffusers' own single-file converters.

    These are the functions ``from_single_file`` runs. Text-encoder keys come back without the
    ``text_model.`` prefix, as :func:`load_model_parts` reads them.

    Args:
        checkpoint: The original-layout state dict.
        unet_config: The UNet's diffusers config.
        vae_config: The VAE's diffusers config.
        text_encoder_config: The (first) text encoder's transformers config.
        text_encoder_2_config: SDXL's second text encoder's config (``None`` for SD 1.x / 2.x).

    Returns:
        ``{"unet": ..., "vae": ..., "text_encoder": ...}``, plus ``"text_encoder_2"`` for SDXL.
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

    def open_clip(config: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
        # The converter reads only the model's config (hidden size): build it without weights.
        with torch.device("meta"):
            shell = CLIPTextModel(CLIPTextConfig.from_dict(dict(config)))
        converted: dict[str, torch.Tensor] = sfu.convert_open_clip_checkpoint(shell, ckpt, prefix)  # type: ignore[no-untyped-call]
        return converted

    text_2: dict[str, torch.Tensor] | None = None
    if text_encoder_2_config is not None:
        # SDXL: the CLIP converter strips `conditioner.embedders.0.transformer.` itself.
        text = sfu.convert_ldm_clip_checkpoint(ckpt)  # type: ignore[no-untyped-call]
        text_2 = open_clip(text_encoder_2_config, _keymaps.SGM_OPENCLIP_PREFIX)
    elif text_encoder_layout(text_encoder_config) == "openclip":
        text = open_clip(text_encoder_config, _keymaps.OPENCLIP_PREFIX)
    else:
        text = sfu.convert_ldm_clip_checkpoint(ckpt)  # type: ignore[no-untyped-call]
    restored = {
        "unet": unet,
        "vae": vae,
        "text_encoder": {k.removeprefix("text_model."): v for k, v in text.items()},
    }
    if text_2 is not None:
        restored["text_encoder_2"] = {k.removeprefix("text_model."): v for k, v in text_2.items()}
    return restored


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

    expected = {name: cast(sd) for name, sd in parts.components().items()}
    # open_clip has no position-id buffer: OpenCLIP encoders come back without it.
    openclip = {"sd1": None, "sd2": "text_encoder", "sdxl": "text_encoder_2"}[parts.architecture]
    if openclip is not None:
        expected[openclip].pop("embeddings.position_ids", None)
    return expected


def _verify(checkpoint: Mapping[str, torch.Tensor], parts: ModelParts, half: bool) -> None:
    restored = restore_diffusers_state_dicts(
        checkpoint,
        unet_config=parts.unet_config,
        vae_config=parts.vae_config,
        text_encoder_config=parts.text_encoder_config,
        text_encoder_2_config=parts.text_encoder_2_config,
    )
    expected = _expected(parts, half)
    problems: list[str] = []
    for component, want in expected.items():
        problems += compare_state_dicts(component, restored.get(component, {}), want)
    if problems:
        raise ExportVerificationError(problems)


def verify_single_file(path: Path, model_dir: Path, *, half: bool = False) -> None:
    """Check that ``path`` converts back, through diffusers, to ``model_dir``'s exact tensors.

    Args:
        path: A ``.safetensors`` or ``.ckpt`` checkpoint written by :func:`export_single_file`.
        model_dir: The diffusers folder it was exported from.
        half: The checkpoint was exported with ``half=True`` (compare against float16 casts).

    SD 2.x files may carry the base's extra OpenCLIP tensors (``base_single_file=``); those have
    no counterpart in the folder and are left out of the comparison.

    Raises:
        ExportVerificationError: some tensors differ; ``.problems`` lists them.
    """
    parts = load_model_parts(Path(model_dir))
    checkpoint = _read_checkpoint(Path(path))
    if parts.architecture == "sd2":
        checkpoint = _without_openclip_extras(checkpoint, parts.text_encoder_config["num_hidden_layers"])
    _verify(checkpoint, parts, half)


def _without_openclip_extras(checkpoint: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """``checkpoint`` less the OpenCLIP tensors diffusers' SD 2.x text encoder has no place for."""
    prefix = _keymaps.OPENCLIP_PREFIX
    extra_layers = re.compile(rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")

    def extra(key: str) -> bool:
        if key in (f"{prefix}text_projection", f"{prefix}logit_scale"):
            return True
        match = extra_layers.match(key)
        return match is not None and int(match[1]) >= layers

    return {k: v for k, v in checkpoint.items() if not extra(k)}


_MODELSPEC_ARCHITECTURES = {
    ("sd1", False): "stable-diffusion-v1",
    ("sd1", True): "stable-diffusion-v1",
    ("sd2", False): "stable-diffusion-v2-512",
    ("sd2", True): "stable-diffusion-v2-768-v",
    ("sdxl", False): "stable-diffusion-xl-v1-base",
    ("sdxl", True): "stable-diffusion-xl-v1-base",
}


def _metadata(parts: ModelParts, title: str) -> dict[str, str]:
    """safetensors header metadata: the ``format`` key and Stability AI's ModelSpec fields."""
    v_prediction = parts.prediction_type == "v_prediction"
    vae_scale = 2 ** (len(parts.vae_config["block_out_channels"]) - 1)
    size = int(parts.unet_config.get("sample_size", 64)) * vae_scale
    return {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _MODELSPEC_ARCHITECTURES[(parts.architecture, v_prediction)],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or "model",
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }


# ComfyUI's SD 2.x v-prediction guess (comfy/supported_models.py, SD20.model_type).
COMFYUI_V_KEY = f"{_keymaps.UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.norm1.bias"
COMFYUI_V_THRESHOLD = 0.09


def original_config(parts: ModelParts) -> dict[str, Any]:
    """The original (CompVis / Stability AI) inference config of an SD 2.x model.

    For the released SD 2.x architectures this is ``v2-inference-v.yaml`` (v-prediction) or
    ``v2-inference.yaml`` (epsilon); the sizes come from the model's configs, so a tiny or otherwise
    resized model gets a config that describes it.

    Raises:
        ExportError: the UNet's attention heads cannot be written as the original config's
            ``num_head_channels`` / ``num_heads``.
    """
    unet, vae = parts.unet_config, parts.vae_config
    scheduler = parts.scheduler_config or {}
    channels = list(unet["block_out_channels"])
    base = channels[0]
    heads = unet.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, list | tuple) else [heads] * len(channels)
    head_channels = {c // h for c, h in zip(channels, heads, strict=True)}
    head_params: dict[str, Any]
    if unet.get("use_linear_projection") and len(head_channels) == 1:
        head_params = {"num_head_channels": head_channels.pop()}
    elif len(set(heads)) == 1:
        head_params = {"num_heads": heads[0]}
    else:
        raise ExportError(
            f"Cannot write an original config for attention heads {heads} over channels {channels}."
        )
    depth = unet.get("transformer_layers_per_block", 1)
    vae_channels = list(vae["block_out_channels"])
    params: dict[str, Any] = {}
    if parts.prediction_type == "v_prediction":
        params["parameterization"] = "v"
    params |= {
        "linear_start": scheduler.get("beta_start", 0.00085),
        "linear_end": scheduler.get("beta_end", 0.012),
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": scheduler.get("num_train_timesteps", 1000),
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": unet.get("sample_size", 64),
        "channels": unet.get("in_channels", 4),
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": vae.get("scaling_factor", 0.18215),
        "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {
                "use_checkpoint": True,
                "use_fp16": True,
                "image_size": 32,
                "in_channels": unet.get("in_channels", 4),
                "out_channels": unet.get("out_channels", 4),
                "model_channels": base,
                "attention_resolutions": [
                    2**i for i, kind in enumerate(unet["down_block_types"]) if kind.startswith("CrossAttn")
                ],
                "num_res_blocks": unet.get("layers_per_block", 2),
                "channel_mult": [c // base for c in channels],
                **head_params,
                "use_spatial_transformer": True,
                "use_linear_in_transformer": bool(unet.get("use_linear_projection")),
                "transformer_depth": depth if isinstance(depth, int) else list(depth),
                "context_dim": unet["cross_attention_dim"],
                "legacy": False,
            },
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": vae.get("latent_channels", 4),
                "monitor": "val/rec_loss",
                "ddconfig": {
                    "double_z": True,
                    "z_channels": vae.get("latent_channels", 4),
                    "resolution": 256,
                    "in_channels": vae.get("in_channels", 3),
                    "out_ch": vae.get("out_channels", 3),
                    "ch": vae_channels[0],
                    "ch_mult": [c // vae_channels[0] for c in vae_channels],
                    "num_res_blocks": vae.get("layers_per_block", 2),
                    "attn_resolutions": [],
                    "dropout": 0.0,
                },
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        },
    }
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": params,
        }
    }


def config_path(checkpoint: Path) -> Path:
    """Where the ``.yaml`` of an SD 2.x single file goes: beside it, with the same name."""
    return Path(checkpoint).with_suffix(".yaml")


def _write_original_config(parts: ModelParts, checkpoint: Path) -> Path:
    import yaml

    from trainer._fs import atomic_write_text

    kind = "v-prediction" if parts.prediction_type == "v_prediction" else "epsilon"
    header = (
        f"# The original inference config of {checkpoint.name} (SD 2.x, {kind}), written by sdtrain.\n"
        "# AUTOMATIC1111 loads it because it has the checkpoint's name: keep the two together.\n"
    )
    text = yaml.safe_dump(original_config(parts), sort_keys=False, default_flow_style=None)
    return atomic_write_text(config_path(checkpoint), header + text)


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose keys start with ``prefix`` (safetensors: only those are read)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ExportError(f"{path} does not exist: give the base model's own single file (.safetensors).")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
        except SafetensorError as exc:
            raise ExportError(f"{path} is not a readable safetensors file ({exc}).") from None
    try:
        state = _read_checkpoint(path)
    except Exception as exc:  # a pickle holds anything; weights_only refuses what is not tensors
        raise ExportError(
            f"{path} could not be read as a weights-only checkpoint ({exc}); "
            "use the base's .safetensors file."
        ) from None
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def openclip_extras(base_single_file: Path, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The OpenCLIP text-encoder tensors of an SD 2.x base's single file that ``state`` lacks.

    For the released SD 2.x files: ``transformer.resblocks.23.*`` (the last layer),
    ``text_projection`` and ``logit_scale``, under ``cond_stage_model.model.``. They are returned
    as stored in the file (dtype included).

    Args:
        base_single_file: The base model's original-layout checkpoint.
        state: The converted state dict of the fine-tuned model.

    Raises:
        ExportError: the file has no SD 2.x text encoder, or its text encoder has other shapes than
            the model's (it is not this model's base).
    """
    prefix = _keymaps.OPENCLIP_PREFIX
    base = _read_prefixed(Path(base_single_file), prefix)
    if not base:
        raise ExportError(
            f"{base_single_file} has no SD 2.x text encoder ({prefix}*): give the single file of the SD 2.x "
            "model this one was fine-tuned from."
        )
    ours = {k: v for k, v in state.items() if k.startswith(prefix)}
    problems = [f"{k}: missing there" for k in sorted(set(ours) - set(base))]
    problems += [
        f"{k}: shape {tuple(base[k].shape)} there, {tuple(v.shape)} here"
        for k, v in sorted(ours.items())
        if k in base and base[k].shape != v.shape
    ]
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        raise ExportError(
            f"{base_single_file} is not a single file of this model's base (its text encoder "
            f"differs):\n  {listed}"
        )
    extras = {k: v.contiguous() for k, v in sorted(base.items()) if k not in ours}
    logger.info(
        "Copied %d text-encoder tensors from %s: %s", len(extras), base_single_file, ", ".join(extras)
    )
    return extras


MISSING_OPENCLIP_WARNING = (
    "%s has no final OpenCLIP layer, text_projection or logit_scale (diffusers' SD 2.x text encoder does "
    "not keep them). diffusers, A1111 and ComfyUI load it and make the same images (SD 2.x conditions on "
    "the penultimate layer; A1111 and ComfyUI report the keys as missing). To copy them in from the base "
    "model's own single file: sdtrain export ... --base-single-file BASE.safetensors"
)


def _check_comfyui_guess(state: Mapping[str, torch.Tensor], parts: ModelParts, out_path: Path) -> None:
    """Warn when ComfyUI's weight-based guess would take this SD 2.x file for the other prediction type."""
    tensor = state.get(COMFYUI_V_KEY)
    guessed_v = tensor is not None and float(tensor.float().std(unbiased=False)) > COMFYUI_V_THRESHOLD
    if guessed_v != (parts.prediction_type == "v_prediction"):
        logger.warning(
            "ComfyUI will take %s for a%s model (it guesses SD 2.x models from %s): add a "
            "ModelSamplingDiscrete node with sampling '%s' after loading it.",
            out_path.name,
            " v-prediction" if guessed_v else "n epsilon",
            COMFYUI_V_KEY.removeprefix(_keymaps.UNET_PREFIX)
            if tensor is not None
            else "a weight this model lacks",
            "v_prediction" if parts.prediction_type == "v_prediction" else "eps",
        )


def _contiguous(state: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state}


def _check_suffix(out_path: Path) -> None:
    if out_path.suffix not in SUFFIXES:
        raise ExportError(f"{out_path}: the checkpoint must end in .safetensors or .ckpt.")


def _write(
    parts: ModelParts,
    out_path: Path,
    *,
    title: str,
    half: bool,
    verify: bool,
    source: str,
    base_single_file: Path | None = None,
) -> Path:
    """Convert, write to a partial file, verify it, then move it into place (SD 2.x: and its .yaml)."""
    import torch
    from safetensors.torch import save_file

    sd2 = parts.architecture == "sd2"
    if base_single_file is not None and not sd2:
        raise ExportError(
            "--base-single-file is for SD 2.x models (their OpenCLIP text encoder); "
            f"this is {parts.architecture}."
        )
    state = _contiguous(to_original_state_dict(parts, half=half).items())
    extras: dict[str, torch.Tensor] = {}
    if sd2:
        _check_comfyui_guess(state, parts, out_path)
        if base_single_file is not None:
            extras = openclip_extras(base_single_file, state)
        else:
            logger.warning(MISSING_OPENCLIP_WARNING, out_path.name)
        state.update(extras)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.partial{out_path.suffix}")
    try:
        if out_path.suffix == ".safetensors":
            save_file(state, tmp, metadata=_metadata(parts, title))
        else:
            warnings.warn(PICKLE_WARNING, UserWarning, stacklevel=3)
            torch.save({"state_dict": state}, tmp)
        del state
        if verify:
            written = _read_checkpoint(tmp)
            copied = {k: written[k] for k in extras if k in written}
            problems = compare_state_dicts("base single file", copied, extras)
            if problems:
                raise ExportVerificationError(problems)
            _verify({k: v for k, v in written.items() if k not in extras}, parts, half)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    if sd2:
        _write_original_config(parts, out_path)
    logger.info(
        "Exported %s to %s (%.1f MB%s%s)",
        source,
        out_path,
        out_path.stat().st_size / 1e6,
        ", float16" if half else "",
        ", verified bit-exact" if verify else "",
    )
    return out_path


def export_single_file(
    model_dir: Path,
    out_path: Path,
    *,
    half: bool = False,
    verify: bool = True,
    base_single_file: Path | None = None,
) -> Path:
    """Write a diffusers Stable Diffusion folder as one original-layout checkpoint.

    The file loads in tools that take original checkpoints, and in diffusers with
    ``StableDiffusionPipeline.from_single_file(path, config=model_dir)``
    (``StableDiffusionXLPipeline`` for SDXL). An SD 2.x file gets its ``.yaml`` beside it.

    Args:
        model_dir: A diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
            ``text_encoder/``, SDXL's ``text_encoder_2/``), e.g. a training run's ``model/``.
        out_path: ``*.safetensors`` (recommended; carries ``format: pt`` and ModelSpec metadata)
            or ``*.ckpt`` (a pickle of ``{"state_dict": ...}``; a warning says why to avoid it).
            Parent folders are created; an existing file is replaced only once the new one is
            complete (and verified).
        half: Store floating-point tensors as float16 (half the size).
        verify: Convert the written file back with diffusers' converters and require every tensor
            to be bit-identical to the folder's (after the float16 cast with ``half``), and the
            copied base tensors to the base file's.
        base_single_file: SD 2.x only: the base model's own single file, to copy the OpenCLIP
            tensors diffusers does not keep (last layer, ``text_projection``, ``logit_scale``) from.

    Returns:
        ``out_path``.

    Raises:
        ExportError: the folder is not a convertible pipeline, ``out_path`` has another suffix, or
            ``base_single_file`` is not an SD 2.x file of this model's architecture.
        ExportVerificationError: the round trip changed some tensors (nothing is written then).
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    _check_suffix(out_path)
    parts = load_model_parts(model_dir)
    title = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    return _write(
        parts,
        out_path,
        title=title,
        half=half,
        verify=verify,
        source=str(model_dir),
        base_single_file=Path(base_single_file) if base_single_file is not None else None,
    )


def merge_lora(
    base_model: str | Path, lora_dir: Path, *, lora_scale: float = 1.0, local_files_only: bool = False
) -> Any:
    """Load ``base_model`` and fuse the diffusers-format adapter in ``lora_dir`` into its weights.

    diffusers' own route: ``load_lora_weights`` + ``fuse_lora`` + ``unload_lora_weights``, on the
    CPU in float32, for every component the adapter has (UNet, text encoders).

    Args:
        base_model: The base the adapter was trained on: a diffusers folder or a Hub id.
        lora_dir: A folder with ``pytorch_lora_weights.safetensors`` (or that file itself).
        lora_scale: How much of the adapter to fuse (1.0: as trained).
        local_files_only: Never reach the network for a Hub id (it must be in the local cache).

    Returns:
        The pipeline with plain (adapter-free) modules holding the fused weights.

    Raises:
        ExportError: the adapter file is missing or does not fit the base.
    """
    import torch
    from diffusers import DiffusionPipeline

    from trainer.loading import ModelLoadError

    lora_dir = Path(lora_dir)
    weights = lora_dir if lora_dir.is_file() else lora_dir / LORA_WEIGHTS
    if not weights.is_file():
        raise ExportError(
            f"{weights} is missing: point --merge at a LoRA run folder (it has lora/{LORA_WEIGHTS})."
        )
    loader: Any = DiffusionPipeline  # untyped loaders
    try:
        pipe = loader.from_pretrained(str(base_model), dtype=torch.float32, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load the base model {base_model}: {exc}. The adapter is fused into the base it was "
            "trained on: check run.json's base_model, or pass --base-model."
        ) from exc
    try:
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ExportError(f"{weights} does not fit {base_model}: {exc}") from exc
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()
    return pipe


def export_merged(
    run_dir: Path,
    out_path: Path,
    *,
    base_model: str | Path | None = None,
    lora_scale: float = 1.0,
    half: bool = False,
    verify: bool = True,
    local_files_only: bool = False,
    base_single_file: Path | None = None,
) -> Path:
    """Fuse a LoRA run's adapter into its base and write the result as one original-layout file.

    SD 1.x / 2.x get the CompVis layout, SDXL the ``sgm`` layout of ``sd_xl_base_1.0.safetensors``.
    The file loads in A1111 / ComfyUI, and in diffusers with ``from_single_file(path,
    config=<the base model>)``.

    Args:
        run_dir: A LoRA run folder (``run.json``, ``lora/pytorch_lora_weights.safetensors``).
        out_path: ``*.safetensors`` or ``*.ckpt``, as for :func:`export_single_file`.
        base_model: The base to fuse into; default run.json's ``base_model``.
        lora_scale: How much of the adapter to fuse (1.0: as trained).
        half: Store floating-point tensors as float16.
        verify: Require diffusers' converters to read back the fused tensors bit for bit.
        local_files_only: Never reach the network for a Hub id base.
        base_single_file: SD 2.x only: the base's own single file (see :func:`export_single_file`).

    Returns:
        ``out_path``.

    Raises:
        ExportError: not a LoRA run, or the model cannot be expressed in the original layout.
        ExportVerificationError: the round trip changed some tensors (nothing is written then).
    """
    run_dir, out_path = Path(run_dir), Path(out_path)
    _check_suffix(out_path)
    if base_model is None:
        base_model = _run_base_model(run_dir)
    pipe = merge_lora(
        base_model, run_dir / LORA_DIR, lora_scale=lora_scale, local_files_only=local_files_only
    )
    parts = parts_from_pipeline(pipe)
    del pipe
    source = f"{run_dir / LORA_DIR} fused into {base_model}"
    return _write(
        parts,
        out_path,
        title=run_dir.resolve().name,
        half=half,
        verify=verify,
        source=source,
        base_single_file=Path(base_single_file) if base_single_file is not None else None,
    )


def _run_base_model(run_dir: Path) -> str:
    record = run_dir / "run.json"
    try:
        base = json.loads(record.read_text(encoding="utf-8")).get("base_model")
    except FileNotFoundError:
        raise ExportError(
            f"{record} is missing: point --merge at a LoRA run folder made by `sdtrain run`."
        ) from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{record} is not valid JSON ({exc}).") from None
    if not isinstance(base, str) or not base:
        raise ExportError(f"{record} names no base_model: pass the base explicitly (--base-model).")
    return base
