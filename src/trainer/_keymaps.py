"""Key tables between diffusers state dicts and the original Stable Diffusion layouts: CompVis/LDM
(SD 1.x / 2.x) and Stability AI's ``sgm`` (SDXL: the same UNet and VAE names, other text-encoder
prefixes).

Every table is a list of ``(stable-diffusion, HF Diffusers)`` pairs, the order diffusers' own
conversion scripts use. Fixed names are listed once; the per-block names are *derived from the
model's config* (number of blocks, layers per block, which blocks have attention), so any UNet or
VAE that the LDM layout can express maps, not only the released SD 1.x / 2.x shapes.

A :class:`Rule` maps one diffusers key prefix (``down_blocks.0.resnets.1.``) to its LDM prefix
(``input_blocks.2.0.``); its ``parts`` table then renames what follows the prefix
(``norm1.weight`` -> ``in_layers.0.weight``). ``parts=None`` keeps the rest of the name unchanged
(attention transformers and plain convolutions are named alike in both layouts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLIP_PREFIX",
    "OPENCLIP_PREFIX",
    "OPENCLIP_QKV",
    "SGM_CLIP_PREFIX",
    "SGM_OPENCLIP_PREFIX",
    "clip_rules",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "KeyMapError",
    "Rule",
    "map_key",
    "openclip_rules",
    "unet_rules",
    "vae_rules",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# SD 1.x: OpenAI CLIP ViT-L/14 as wrapped by transformers in the original repository.
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
# SD 2.x: OpenCLIP ViT-H/14 (open_clip's own names; q, k, v fused into in_proj).
OPENCLIP_PREFIX = "cond_stage_model.model."
# SDXL (Stability AI's `sgm` layout, as in sd_xl_base_1.0.safetensors): CLIP ViT-L under the first
# conditioner embedder, OpenCLIP ViT-bigG/14 (with its text projection) under the second.
SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SGM_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

Table = Sequence[tuple[str, str]]

# --- UNet ---------------------------------------------------------------------------------------

# (stable-diffusion, HF Diffusers)
UNET_TOP_LEVEL: list[tuple[str, str]] = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]

# (stable-diffusion, HF Diffusers)
UNET_RESNET_PARTS: list[tuple[str, str]] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
]

# (stable-diffusion, HF Diffusers): SDXL's embedding of the pooled text embedding and size/crop ids
# (diffusers `addition_embed_type="text_time"`).
UNET_ADDITION_EMBEDDING: list[tuple[str, str]] = [
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
]

_UNET_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UNET_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# --- VAE ----------------------------------------------------------------------------------------

# (stable-diffusion, HF Diffusers)
VAE_TOP_LEVEL: list[tuple[str, str]] = [
    ("encoder.conv_in.", "encoder.conv_in."),
    ("encoder.norm_out.", "encoder.conv_norm_out."),
    ("encoder.conv_out.", "encoder.conv_out."),
    ("decoder.conv_in.", "decoder.conv_in."),
    ("decoder.norm_out.", "decoder.conv_norm_out."),
    ("decoder.conv_out.", "decoder.conv_out."),
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
]

# (stable-diffusion, HF Diffusers)
VAE_RESNET_PARTS: list[tuple[str, str]] = [
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
]

# (stable-diffusion, HF Diffusers). Diffusers keeps these as Linear layers ([C, C]); the original
# VAE uses 1x1 convolutions ([C, C, 1, 1]): the weights are reshaped on the way out.
VAE_ATTENTION_PARTS: list[tuple[str, str]] = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]

# --- Text encoders ------------------------------------------------------------------------------

# (stable-diffusion, HF Diffusers), names relative to CLIP_PREFIX / the CLIPTextModel.
CLIP_TOP_LEVEL: list[tuple[str, str]] = [
    ("embeddings.", "embeddings."),
    ("encoder.", "encoder."),
    ("final_layer_norm.", "final_layer_norm."),
]

# (stable-diffusion, HF Diffusers), names relative to OPENCLIP_PREFIX / the CLIPTextModel.
OPENCLIP_TOP_LEVEL: list[tuple[str, str]] = [
    ("token_embedding.", "embeddings.token_embedding."),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.", "final_layer_norm."),
]
# (stable-diffusion, HF Diffusers): open_clip multiplies by the matrix (x @ P), a Linear layer stores
# its transpose. Only CLIPTextModelWithProjection (SDXL's bigG) has it in diffusers.
OPENCLIP_TEXT_PROJECTION = ("text_projection", "text_projection.weight")

# (stable-diffusion, HF Diffusers)
OPENCLIP_LAYER_PARTS: list[tuple[str, str]] = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    # q, k and v are concatenated, in that order, into one projection.
    ("attn.in_proj_", "self_attn.q_proj."),
    ("attn.in_proj_", "self_attn.k_proj."),
    ("attn.in_proj_", "self_attn.v_proj."),
]
OPENCLIP_QKV = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")


class KeyMapError(ValueError):
    """A key or a config that the original Stable Diffusion layout cannot express."""


@dataclass(frozen=True)
class Rule:
    """``diffusers`` prefix -> ``ldm`` prefix, with ``parts`` renaming the rest (None: unchanged)."""

    ldm: str
    diffusers: str
    parts: Table | None = None
    conv_1x1: bool = False  # Linear weights become 1x1 convolution weights
    transpose: bool = False  # the original stores the matrix transposed


def _get(config: Mapping[str, Any], key: str, default: Any) -> Any:
    value = config.get(key, default)
    return default if value is None and default is not None else value


def unet_rules(config: Mapping[str, Any]) -> list[Rule]:
    """The UNet's rules, derived from its ``config.json`` (``UNet2DConditionModel`` config).

    Raises:
        KeyMapError: a UNet feature the LDM layout has no names for (per-block layer counts,
            class or addition embeddings, other block types).
    """
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise KeyMapError(
            f"layers_per_block={layers!r}: the original layout needs one layer count for every block."
        )
    for key in ("class_embed_type", "num_class_embeds", "encoder_hid_proj"):
        if config.get(key) is not None:
            raise KeyMapError(
                f"UNet config sets {key}={config[key]!r}: not part of the SD 1.x/2.x/XL layout."
            )
    addition = config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise KeyMapError(
            f"UNet config sets addition_embed_type={addition!r}: only SDXL's 'text_time' has original names."
        )
    if _get(config, "time_embedding_type", "positional") != "positional":
        raise KeyMapError("Only positional time embeddings exist in the SD 1.x/2.x layout.")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", None):
        raise KeyMapError(f"mid_block_type={mid_type!r} has no SD 1.x/2.x counterpart.")

    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    unknown = [t for t in down_types if t not in _UNET_DOWN_BLOCKS]
    unknown += [t for t in up_types if t not in _UNET_UP_BLOCKS]
    if unknown:
        raise KeyMapError(f"UNet block types {unknown} have no SD 1.x/2.x counterpart.")

    rules = [Rule(ldm, hf) for ldm, hf in UNET_TOP_LEVEL]
    if addition == "text_time":
        rules += [Rule(ldm, hf) for ldm, hf in UNET_ADDITION_EMBEDDING]
    # input_blocks.0 is conv_in; then each down block contributes `layers` (resnet[, attention])
    # entries and, except the last, one downsampler entry.
    stride = layers + 1
    for i, block_type in enumerate(down_types):
        for j in range(layers):
            index = 1 + i * stride + j
            rules.append(Rule(f"input_blocks.{index}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET_PARTS))
            if _UNET_DOWN_BLOCKS[block_type]:
                rules.append(Rule(f"input_blocks.{index}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < len(down_types) - 1:
            index = 1 + i * stride + layers
            rules.append(Rule(f"input_blocks.{index}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    if mid_type is not None:
        rules += [
            Rule("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET_PARTS),
            Rule("middle_block.1.", "mid_block.attentions.0."),
            Rule("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET_PARTS),
        ]
    # Up blocks have one layer more (they also take the skip connection of the downsampler).
    for i, block_type in enumerate(up_types):
        attention = _UNET_UP_BLOCKS[block_type]
        for j in range(layers + 1):
            index = i * stride + j
            rules.append(Rule(f"output_blocks.{index}.0.", f"up_blocks.{i}.resnets.{j}.", UNET_RESNET_PARTS))
            if attention:
                rules.append(Rule(f"output_blocks.{index}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < len(up_types) - 1:
            index = i * stride + layers
            slot = 2 if attention else 1
            rules.append(Rule(f"output_blocks.{index}.{slot}.conv.", f"up_blocks.{i}.upsamplers.0.conv."))
    return [Rule(UNET_PREFIX + r.ldm, r.diffusers, r.parts) for r in rules]


def vae_rules(config: Mapping[str, Any]) -> list[Rule]:
    """The VAE's rules, derived from its ``config.json`` (``AutoencoderKL`` config).

    Raises:
        KeyMapError: block types the original layout has no names for.
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    if set(down_types) != {"DownEncoderBlock2D"} or set(up_types) != {"UpDecoderBlock2D"}:
        raise KeyMapError(
            f"VAE blocks {down_types} / {up_types}: the original layout has only "
            "DownEncoderBlock2D / UpDecoderBlock2D."
        )
    layers = int(config.get("layers_per_block", 1))
    count = len(down_types)
    rules = [Rule(ldm, hf) for ldm, hf in VAE_TOP_LEVEL]
    for i in range(count):
        for j in range(layers):
            rules.append(
                Rule(
                    f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET_PARTS
                )
            )
        if i < count - 1:
            rules.append(
                Rule(f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.")
            )
    # The decoder's up blocks are numbered from the lowest resolution in diffusers and from the
    # highest in the original: diffusers up_blocks[i] is original up[count - 1 - i].
    for i in range(len(up_types)):
        ldm_i = len(up_types) - 1 - i
        for j in range(layers + 1):
            rules.append(
                Rule(
                    f"decoder.up.{ldm_i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", VAE_RESNET_PARTS
                )
            )
        if i < len(up_types) - 1:
            rules.append(
                Rule(f"decoder.up.{ldm_i}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv.")
            )
    for side in ("encoder", "decoder"):
        for k in range(2):
            rules.append(
                Rule(f"{side}.mid.block_{k + 1}.", f"{side}.mid_block.resnets.{k}.", VAE_RESNET_PARTS)
            )
        if config.get("mid_block_add_attention", True):
            rules.append(
                Rule(
                    f"{side}.mid.attn_1.",
                    f"{side}.mid_block.attentions.0.",
                    VAE_ATTENTION_PARTS,
                    conv_1x1=True,
                )
            )
    return [Rule(VAE_PREFIX + r.ldm, r.diffusers, r.parts, r.conv_1x1) for r in rules]


def clip_rules(prefix: str = CLIP_PREFIX) -> list[Rule]:
    """An OpenAI CLIP text encoder's rules (SD 1.x; SDXL's first encoder with
    :data:`SGM_CLIP_PREFIX`): transformers' own names under one prefix."""
    return [Rule(prefix + ldm, hf) for ldm, hf in CLIP_TOP_LEVEL]


def openclip_rules(config: Mapping[str, Any], prefix: str = OPENCLIP_PREFIX) -> list[Rule]:
    """An OpenCLIP text encoder's rules (SD 2.x; SDXL's bigG with :data:`SGM_OPENCLIP_PREFIX`),
    from the ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` config.

    Fused q/k/v are not covered here: :data:`OPENCLIP_QKV` names the projections that the exporter
    concatenates into ``attn.in_proj_weight`` / ``attn.in_proj_bias``.
    """
    rules = [Rule(prefix + ldm, hf) for ldm, hf in OPENCLIP_TOP_LEVEL]
    ldm_projection, hf_projection = OPENCLIP_TEXT_PROJECTION
    rules.append(Rule(prefix + ldm_projection, hf_projection, transpose=True))
    for i in range(int(config["num_hidden_layers"])):
        rules.append(
            Rule(
                f"{prefix}transformer.resblocks.{i}.",
                f"encoder.layers.{i}.",
                [pair for pair in OPENCLIP_LAYER_PARTS if pair[1] not in OPENCLIP_QKV],
            )
        )
    return rules


def map_key(key: str, rules: Sequence[Rule]) -> tuple[str, Rule]:
    """The LDM name of diffusers ``key`` and the rule that named it.

    Raises:
        KeyMapError: no rule covers the key (the model has parts the layout cannot hold).
    """
    for rule in rules:
        # A prefix ends with a dot; anything else names one whole key.
        if rule.diffusers.endswith("."):
            if not key.startswith(rule.diffusers):
                continue
        elif key != rule.diffusers:
            continue
        rest = key[len(rule.diffusers) :]
        if rule.parts is None:
            return rule.ldm + rest, rule
        for ldm_part, hf_part in rule.parts:
            if rest.startswith(hf_part):
                return rule.ldm + ldm_part + rest[len(hf_part) :], rule
        raise KeyMapError(f"{key}: '{rest}' is not a known part of {rule.diffusers.rstrip('.')}")
    raise KeyMapError(f"{key}: no counterpart in the original Stable Diffusion layout")
