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
``FluxPipeline.save_lora_weights`` (``transformer_lora_layers``). Its kohya twin uses the names of
Black Forest Labs' checkpoint, which sd-scripts, ComfyUI and Forge use for FLUX:
``lora_unet_double_blocks_{i}_img_attn_qkv`` and so on (see :data:`FLUX_MODULES`). BFL's layers
fuse some of diffusers' (q, k and v; single blocks' ``linear1`` holds q, k, v and the MLP input),
so their LoRAs are fused too: the downs stacked on the rank axis, the ups block-diagonal, zero
blocks for parts without an adapter, and an alpha that keeps ``alpha / rank``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from trainer._fs import atomic_write_bytes, publish_dir, temp_sibling

__all__ = [
    "FLUX_MODULES",
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


def _adapter_layers(model: Any, *, peft_names: bool = False) -> dict[str, Any]:
    """A model's adapter weights from PEFT's state dict: in diffusers' older ``lora.down`` /
    ``lora.up`` naming (UNets and text encoders, as diffusers' SD scripts save them), or with
    ``peft_names`` as PEFT's ``lora_A`` / ``lora_B`` (FLUX's transformer, as diffusers' FLUX script
    saves it: its loader reads one naming per file, and the older one does not cover every layer)."""
    from diffusers.utils import state_dict_utils
    from peft.utils import get_peft_model_state_dict

    layers: dict[str, Any] = get_peft_model_state_dict(model)
    if not peft_names:
        convert: Any = state_dict_utils.convert_state_dict_to_diffusers  # untyped
        layers = convert(layers)
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
            "transformer_lora_layers": _adapter_layers(transformer, peft_names=True),
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
        diffusers_state: Keys such as ``unet.down_blocks.0...to_q.lora.down.weight`` (FLUX:
            ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` or ``...lora.down.weight``).
        architecture: ``sdxl`` names the text encoders ``lora_te1_``/``lora_te2_``, others ``lora_te_``;
            ``flux`` uses BFL's module names and fuses q/k/v (see the module docstring).
        alphas: LoRA alpha per component (``unet``, ``transformer``, ``text_encoder``,
            ``text_encoder_2``); a missing one is taken equal to the rank (diffusers' default).

    Raises:
        ValueError: a key is not a diffusers LoRA down/up weight (for FLUX: of a module that BFL's
            checkpoint has).
    """
    import torch

    if architecture == "flux":
        return _flux_kohya_state_dict(diffusers_state, alphas or {})

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
    module = "networks.lora_flux" if architecture == "flux" else "networks.lora"  # sd-scripts' names
    info = {"ss_network_module": module, "ss_base_model_version": _base_version(architecture)}
    return atomic_write_bytes(lora_dir / KOHYA_WEIGHTS, save(kohya, metadata=info))


def _base_version(architecture: str) -> str:
    versions = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
    return versions.get(architecture, architecture)


# FLUX: (diffusers module, BFL / sd-scripts name, its place in BFL's fused layer or None). `{i}` is
# the block number. The order of a fused layer's parts is the order of its output rows.
FLUX_MODULES: list[tuple[str, str, int | None]] = [
    ("transformer_blocks.{i}.attn.to_q", "double_blocks_{i}_img_attn_qkv", 0),
    ("transformer_blocks.{i}.attn.to_k", "double_blocks_{i}_img_attn_qkv", 1),
    ("transformer_blocks.{i}.attn.to_v", "double_blocks_{i}_img_attn_qkv", 2),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks_{i}_img_attn_proj", None),
    ("transformer_blocks.{i}.attn.add_q_proj", "double_blocks_{i}_txt_attn_qkv", 0),
    ("transformer_blocks.{i}.attn.add_k_proj", "double_blocks_{i}_txt_attn_qkv", 1),
    ("transformer_blocks.{i}.attn.add_v_proj", "double_blocks_{i}_txt_attn_qkv", 2),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks_{i}_txt_attn_proj", None),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks_{i}_img_mlp_0", None),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks_{i}_img_mlp_2", None),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks_{i}_txt_mlp_0", None),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks_{i}_txt_mlp_2", None),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks_{i}_img_mod_lin", None),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks_{i}_txt_mod_lin", None),
    ("single_transformer_blocks.{i}.attn.to_q", "single_blocks_{i}_linear1", 0),
    ("single_transformer_blocks.{i}.attn.to_k", "single_blocks_{i}_linear1", 1),
    ("single_transformer_blocks.{i}.attn.to_v", "single_blocks_{i}_linear1", 2),
    ("single_transformer_blocks.{i}.proj_mlp", "single_blocks_{i}_linear1", 3),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks_{i}_linear2", None),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks_{i}_modulation_lin", None),
    ("x_embedder", "img_in", None),
    ("context_embedder", "txt_in", None),
    ("time_text_embed.timestep_embedder.linear_1", "time_in_in_layer", None),
    ("time_text_embed.timestep_embedder.linear_2", "time_in_out_layer", None),
    ("time_text_embed.text_embedder.linear_1", "vector_in_in_layer", None),
    ("time_text_embed.text_embedder.linear_2", "vector_in_out_layer", None),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in_in_layer", None),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in_out_layer", None),
    ("proj_out", "final_layer_linear", None),
    # diffusers' AdaLayerNormContinuous puts scale before shift; BFL shift before scale.
    ("norm_out.linear", "final_layer_adaLN_modulation_1", None),
]
# Output rows of each part of a fused layer, in units of the model width (FLUX's MLP is 4x wide).
_FLUX_FUSED_WIDTHS = {"attn_qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}
_FLUX_KEY = re.compile(
    r"^(?P<part>transformer|text_encoder)\.(?P<module>.+)\."
    r"(?:lora_(?P<ab>A|B)|(?:lora|lora_linear_layer)\.(?P<which>down|up))\.weight$"
)
_FLUX_PATTERNS = [
    (re.compile("^" + re.escape(module).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), name, slot)
    for module, name, slot in FLUX_MODULES
]


def _flux_name(module: str) -> tuple[str, int | None]:
    """BFL's name of a diffusers FLUX transformer module, and its place in a fused layer."""
    for pattern, name, slot in _FLUX_PATTERNS:
        match = pattern.match(module)
        if match is not None:
            return name.replace("{i}", match.groupdict().get("i") or ""), slot
    raise ValueError(f"transformer.{module} has no counterpart in FLUX's original (BFL) checkpoint")


def _flux_kohya_state_dict(diffusers_state: dict[str, Any], alphas: dict[str, float]) -> dict[str, Any]:
    import torch

    # (down, up) per diffusers module, then grouped by BFL layer: {name: {slot: (down, up, scale)}}.
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tensor in diffusers_state.items():
        match = _FLUX_KEY.match(key)
        if match is None:
            raise ValueError(f"{key} is not a diffusers LoRA weight (…lora_A.weight / …lora_B.weight)")
        which = match["which"] or ("down" if match["ab"] == "A" else "up")
        pairs.setdefault((match["part"], match["module"]), {})[which] = tensor
    out: dict[str, Any] = {}
    layers: dict[str, dict[int, tuple[Any, Any, float]]] = {}
    for (part, module), pair in pairs.items():
        if set(pair) != {"down", "up"}:
            raise ValueError(f"{part}.{module} has a LoRA down or up weight without the other")
        down, up = pair["down"], pair["up"]
        rank = down.shape[0]
        alpha = alphas.get(part, float(rank))
        if part == "text_encoder":  # CLIP-L, named as sd-scripts names it for FLUX
            name, slot = "lora_te1_" + module.replace(".", "_"), None
        else:
            bfl, slot = _flux_name(module)
            name = "lora_unet_" + bfl
            if bfl == "final_layer_adaLN_modulation_1":
                scale, shift = up.chunk(2, dim=0)
                up = torch.cat([shift, scale], dim=0)
        if slot is None:
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
        else:
            layers.setdefault(name, {})[slot] = (down, up, alpha / rank)
    for name, parts in sorted(layers.items()):
        out.update(_fused_lora(name, parts))
    return out


def _fused_lora(name: str, parts: dict[int, tuple[Any, Any, float]]) -> dict[str, Any]:
    """One LoRA for a BFL layer that fuses several diffusers layers (``parts``: slot → down, up, scale).

    The fused LoRA computes every part's own update: ``up_fused @ down_fused`` is block-diagonal in
    the parts, and ``alpha / rank`` is the first part's scale (other parts' ups are rescaled to it).
    """
    import torch

    widths = _FLUX_FUSED_WIDTHS["linear1" if name.endswith("_linear1") else "attn_qkv"]
    slot, (down, up, scale) = min(parts.items())
    width = up.shape[0] // widths[slot]  # the model width, from any part's output rows
    rank, in_features = down.shape[0], down.shape[1]
    downs, ups = [], []
    for j, multiple in enumerate(widths):
        if j in parts:
            part_down, part_up, part_scale = parts[j]
            downs.append(part_down)
            ups.append(part_up * (part_scale / scale))
        else:  # no adapter on this part: a zero block leaves it as it is
            downs.append(down.new_zeros(rank, in_features))
            ups.append(up.new_zeros(width * multiple, rank))
    fused_rank = sum(d.shape[0] for d in downs)
    block_diag: Any = torch.block_diag  # untyped
    return {
        f"{name}.lora_down.weight": torch.cat(downs, dim=0),
        f"{name}.lora_up.weight": block_diag(*ups),
        f"{name}.alpha": torch.tensor(scale * fused_rank, dtype=down.dtype),
    }
