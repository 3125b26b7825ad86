"""Randomly initialised Stable Diffusion pipelines, built offline from configs in code.

Tests, the offline demo and users' own CI need a real pipeline that loads with the real loaders
(``StableDiffusionPipeline.from_pretrained(folder)``) without downloading weights. ``tiny`` builds
an 8 MB miniature with the same structure as SD 1.x / SD 2.x (cross-attention blocks first, a
plain block last, a CLIP text encoder, a KL VAE) or SDXL (two text encoders, the second with a
projection for the pooled embedding, a ``text_time`` UNet, an Euler scheduler) or FLUX.1-dev (a
``FluxTransformer2DModel`` with the guidance embedding, CLIP for the pooled embedding and T5 for the
sequence, a 16-channel VAE, the flow-matching Euler scheduler); ``full`` builds the real SD 1.5 /
2.1 / SDXL / FLUX.1-dev architecture with random weights, for speed and memory benchmarks on a GPU.
Text-encoder weights are saved under the ``text_model.`` key prefix like the real repos, so
that transformers 4.x loads them too.

The tokenizer is a byte-level CLIP BPE written locally: every one of the 256 byte symbols, with and
without the end-of-word marker, plus the start and end tokens, so any text tokenizes.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

Variant = Literal["sd1", "sd2", "sdxl", "flux"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
Size = Literal["tiny", "full"]

__all__ = [
    "VARIANTS",
    "PipelineConfigs",
    "build_random_pipeline",
    "build_tiny_pipeline",
    "flux_transformer_config",
    "save_text_encoder_with_prefix",
    "write_byte_level_tokenizer",
    "write_t5_tokenizer",
]

# Schedulers exactly as the public SD 1.5, SD 2.1 and SDXL base 1.0 repositories ship them.
_SCHEDULER_SD1: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
_SCHEDULER_SD2: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "v_prediction",
}
_SCHEDULER_FLUX: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
_SCHEDULER_SDXL: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-printable-character table of GPT-2/CLIP byte-level BPE."""
    visible = list(range(ord("!"), ord("~") + 1))
    visible += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = visible[:]
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(visible, (chr(c) for c in chars), strict=True))


def write_byte_level_tokenizer(folder: Path, *, pad_token: str = "<|endoftext|>") -> int:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of a byte-level CLIP tokenizer.

    Returns the vocabulary size.
    """
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4.x
        tokenizer = CLIPTokenizer(
            vocab_file=str(folder / "vocab.json"),
            merges_file=str(folder / "merges.txt"),
            pad_token=pad_token,
            model_max_length=77,
        )
    else:  # transformers 5 builds the fast tokenizer from the vocabulary itself
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)
    tokenizer.save_pretrained(folder)
    return len(vocab)


@dataclass(frozen=True)
class PipelineConfigs:
    """The component configs of one pipeline (``text_encoder_2`` only for SDXL)."""

    text_encoder: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None


def _text_config(
    *, hidden: int, layers: int, heads: int, projection: int, act: str, size: Size, vocab_size: int
) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": 37 if size == "tiny" else hidden * 4,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "projection_dim": projection,
        "vocab_size": vocab_size,
        "hidden_act": act,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab_size - 2 if size == "tiny" else 49406,
        "eos_token_id": vocab_size - 1 if size == "tiny" else 49407,
        "pad_token_id": 1,
    }


def _clip_vit_l(size: Size, vocab_size: int) -> dict[str, Any]:
    """CLIP ViT-L/14's text encoder (SDXL's first, FLUX's pooled one), or its miniature."""
    tiny = size == "tiny"
    return _text_config(
        hidden=32 if tiny else 768,
        layers=2 if tiny else 12,
        heads=4 if tiny else 12,
        projection=32 if tiny else 768,
        act="quick_gelu",
        size=size,
        vocab_size=vocab_size,
    )


def _sdxl_configs(size: Size, vocab_size: int) -> PipelineConfigs:
    """SDXL base 1.0: CLIP ViT-L + OpenCLIP ViT-bigG, a ``text_time`` UNet, an Euler scheduler."""
    tiny = size == "tiny"
    text = _clip_vit_l(size, vocab_size)
    # bigG: 10 layers is the fewest that single-file tools recognise as SDXL (they look for
    # `conditioner.embedders.1.model.transformer.resblocks.9.*`), and a width other than the first
    # encoder's, which is how diffusers' single-file loader tells the two encoders apart.
    text_2 = _text_config(
        hidden=64 if tiny else 1280,
        layers=10 if tiny else 32,
        heads=4 if tiny else 20,
        projection=64 if tiny else 1280,
        act="gelu",
        size=size,
        vocab_size=vocab_size,
    )
    time_embed_dim = 8 if tiny else 256
    unet: dict[str, Any] = {
        "block_out_channels": (32, 64) if tiny else (320, 640, 1280),
        "layers_per_block": 2,
        "sample_size": 32 if tiny else 128,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")
        if tiny
        else ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")
        if tiny
        else ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2) if tiny else (1, 2, 10),
        "attention_head_dim": (2, 4) if tiny else (5, 10, 20),
        # The UNet attends to both encoders' penultimate hidden states, concatenated.
        "cross_attention_dim": text["hidden_size"] + text_2["hidden_size"],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        # Six time ids (original size, crop top-left, target size) plus the pooled bigG embedding.
        "projection_class_embeddings_input_dim": 6 * time_embed_dim + text_2["projection_dim"],
        "use_linear_projection": True,
        "in_channels": 4,
        "out_channels": 4,
    }
    vae: dict[str, Any] = {
        "block_out_channels": (32, 64) if tiny else (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * (2 if tiny else 4),
        "up_block_types": ("UpDecoderBlock2D",) * (2 if tiny else 4),
        "sample_size": 64 if tiny else 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
    }
    if not tiny:
        vae["layers_per_block"] = 2
    return PipelineConfigs(text, unet, vae, dict(_SCHEDULER_SDXL), text_2)


def _configs(variant: Variant, size: Size, vocab_size: int) -> PipelineConfigs:
    if variant == "sdxl":
        return _sdxl_configs(size, vocab_size)
    sd2 = variant == "sd2"
    unet: dict[str, Any]
    vae: dict[str, Any]
    if size == "tiny":
        text = _text_config(
            hidden=32,
            layers=2,
            heads=4,
            projection=32,
            act="gelu" if sd2 else "quick_gelu",
            size=size,
            vocab_size=vocab_size,
        )
        unet = {
            "block_out_channels": (32, 64),
            "layers_per_block": 2,
            "sample_size": 32,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": (2, 4) if sd2 else 8,
        }
        vae = {
            "block_out_channels": (32, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "sample_size": 64,
        }
    else:
        # The released SD 1.5 (CLIP ViT-L/14) and SD 2.1 (OpenCLIP ViT-H/14, penultimate layer) shapes.
        text = _text_config(
            hidden=1024 if sd2 else 768,
            layers=23 if sd2 else 12,
            heads=16 if sd2 else 12,
            projection=512 if sd2 else 768,
            act="gelu" if sd2 else "quick_gelu",
            size=size,
            vocab_size=49408,
        )
        unet = {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "sample_size": 96 if sd2 else 64,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 1024 if sd2 else 768,
            "attention_head_dim": (5, 10, 20, 20) if sd2 else 8,
        }
        vae = {
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "sample_size": 768 if sd2 else 512,
        }
    unet.update(
        {
            "in_channels": 4,
            "out_channels": 4,
            "use_linear_projection": sd2,
            "upcast_attention": sd2,
        }
    )
    vae.update({"in_channels": 3, "out_channels": 3, "latent_channels": 4})
    scheduler = dict(_SCHEDULER_SD2 if sd2 else _SCHEDULER_SD1)
    return PipelineConfigs(text, unet, vae, scheduler)


def save_text_encoder_with_prefix(folder: Path) -> None:
    """Rewrite ``folder``'s weights with every key under ``text_model.``, as real Hub repos have them.

    transformers 5 saves a ``CLIPTextModel`` built from a config without the prefix; transformers
    4.x (which Inference Endpoints run) would load such a file with random weights. Both versions
    load the prefixed file. Projection weights (``text_projection.*``) stay at the top level.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        state = load_file(path)
        renamed = {
            key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": tensor
            for key, tensor in state.items()
        }
        if renamed.keys() != state.keys():
            save_file(renamed, path, metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {
            key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": shard
            for key, shard in data["weight_map"].items()
        }
        index.write_text(json.dumps(data, indent=2), encoding="utf-8")


def build_random_pipeline(
    out_dir: str | Path, *, variant: Variant = "sd1", size: Size = "tiny", seed: int = 0
) -> Path:
    """Build a randomly initialised Stable Diffusion pipeline and save it in Hub layout.

    Args:
        out_dir: Folder to write (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
            ``tokenizer/``, ``scheduler/``; SDXL adds ``text_encoder_2/`` and ``tokenizer_2/``).
            Created if missing.
        variant: ``"sd1"`` (epsilon prediction, CLIP), ``"sd2"`` (v-prediction, linear
            projections, upcast attention, GELU text encoder) or ``"sdxl"`` (CLIP ViT-L plus
            OpenCLIP bigG with projection, a ``text_time`` UNet conditioned on pooled embeddings
            and size/crop ids, an Euler scheduler, as ``stabilityai/stable-diffusion-xl-base-1.0``).
        size: ``"tiny"`` (a few MB, 64 px) or ``"full"`` (the released architecture, 512 / 768 /
            1024 px).
        seed: Seed for the random weights: the same seed gives the same files.

    Returns:
        The folder, loadable with ``StableDiffusionPipeline.from_pretrained(folder)``
        (``StableDiffusionXLPipeline`` for ``"sdxl"``). Text-encoder weights are stored under the
        ``text_model.`` prefix, as in the real repositories.
    """
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    lib: Any = diffusers  # diffusers' constructors and loaders are untyped

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if variant == "flux":
        return _build_flux(out, size, seed)
    tokenizer_dir = out / "tokenizer"
    # As the released tokenizers pad: OpenCLIP's (SD 2.x, SDXL's second) with "!".
    pad_token = "!" if variant == "sd2" else "<|endoftext|>"
    vocab_size = write_byte_level_tokenizer(tokenizer_dir, pad_token=pad_token)
    configs = _configs(variant, size, vocab_size)

    torch.manual_seed(seed)
    unet = lib.UNet2DConditionModel(**configs.unet)
    vae = lib.AutoencoderKL(**configs.vae)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs.text_encoder))
    scheduler_cls = getattr(lib, configs.scheduler["_class_name"])
    scheduler = scheduler_cls.from_config(configs.scheduler)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
    }
    tokenizers = {"tokenizer": pad_token}
    if configs.text_encoder_2 is not None:
        write_byte_level_tokenizer(out / "tokenizer_2", pad_token="!")
        tokenizers["tokenizer_2"] = "!"
        components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs.text_encoder_2))
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
        pipe = lib.StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)
    else:
        pipe = lib.StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        if (out / name).is_dir():
            save_text_encoder_with_prefix(out / name)
    # save_pretrained rewrites the tokenizer folders; keep the classic vocab.json/merges.txt beside them.
    for name, pad in tokenizers.items():
        write_byte_level_tokenizer(out / name, pad_token=pad)
    return out


def write_t5_tokenizer(folder: Path, *, max_length: int = 512) -> int:
    """Write a T5 (Unigram) tokenizer of printable ASCII characters, as ``tokenizer.json``.

    Returns the vocabulary size.
    """
    import transformers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(c), -1.0) for c in range(33, 127)]
    tokenizer = transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def flux_transformer_config(size: Size = "full") -> dict[str, Any]:
    """``FluxTransformer2DModel``'s arguments for FLUX.1-dev's architecture or its miniature.

    ``full``: 19 double-stream and 38 single-stream blocks, 3072 wide (24 heads of 128), guidance
    embedding, conditioned on T5-XXL's 4096-dim hidden states and CLIP ViT-L's 768-dim pooled output.
    ``tiny``: 2 heads of 16, one block of each kind, 32-dim text and pooled inputs (the tiny T5's
    and CLIP's widths).
    """
    tiny = size == "tiny"
    return {
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels, packed 2 x 2
        "num_layers": 1 if tiny else 19,
        "num_single_layers": 1 if tiny else 38,
        "attention_head_dim": 16 if tiny else 128,
        "num_attention_heads": 2 if tiny else 24,
        "joint_attention_dim": 32 if tiny else 4096,  # T5's width
        "pooled_projection_dim": 32 if tiny else 768,  # CLIP's pooled width
        "guidance_embeds": True,  # FLUX.1-dev is guidance-distilled: the scale is an input
        "axes_dims_rope": (4, 6, 6) if tiny else (16, 56, 56),  # sums to attention_head_dim
    }


def _build_flux(out: Path, size: Size, seed: int) -> Path:
    """FLUX.1-dev's architecture (``tiny``: 64 px, a few MB), saved in Hub layout."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    lib: Any = diffusers
    tiny = size == "tiny"
    vocab_size = write_byte_level_tokenizer(out / "tokenizer")
    t5_vocab = write_t5_tokenizer(out / "tokenizer_2") if tiny else 32128
    clip = _clip_vit_l(size, vocab_size if tiny else 49408)
    t5 = T5Config(
        vocab_size=t5_vocab,
        d_model=32 if tiny else 4096,
        d_kv=8 if tiny else 64,
        d_ff=37 if tiny else 10240,
        num_layers=2 if tiny else 24,
        num_heads=4 if tiny else 64,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    transformer = lib.FluxTransformer2DModel(**flux_transformer_config(size))
    vae = lib.AutoencoderKL(
        block_out_channels=(32, 64) if tiny else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * (2 if tiny else 4),
        up_block_types=("UpDecoderBlock2D",) * (2 if tiny else 4),
        layers_per_block=1 if tiny else 2,
        latent_channels=16,
        sample_size=64 if tiny else 1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        in_channels=3,
        out_channels=3,
    )
    import transformers

    pipe = lib.FluxPipeline(
        scheduler=lib.FlowMatchEulerDiscreteScheduler.from_config(_SCHEDULER_FLUX),
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip)),
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=transformers.T5Tokenizer.from_pretrained(out / "tokenizer_2") if tiny else None,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    save_text_encoder_with_prefix(out / "text_encoder")
    write_byte_level_tokenizer(out / "tokenizer")
    if tiny:
        write_t5_tokenizer(out / "tokenizer_2")
    return out


def build_tiny_pipeline(out_dir: str | Path, *, variant: Variant = "sd1", seed: int = 0) -> Path:
    """Build the 8 MB randomly initialised pipeline used by tests and the offline demo.

    See :func:`build_random_pipeline`; images are 64x64 (32x32 latents).
    """
    return build_random_pipeline(out_dir, variant=variant, size="tiny", seed=seed)
