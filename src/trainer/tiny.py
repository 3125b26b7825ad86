"""Randomly initialised Stable Diffusion pipelines, built offline from configs in code.

Tests, the offline demo and users' own CI need a real pipeline that loads with the real loaders
(``StableDiffusionPipeline.from_pretrained(folder)``) without downloading weights. ``tiny`` builds
an 8 MB miniature with the same structure as SD 1.x / SD 2.x (cross-attention blocks first, a
plain block last, a CLIP text encoder, a KL VAE); ``full`` builds the real SD 1.5 / 2.1
architecture with random weights, for speed and memory benchmarks on a GPU.

The tokenizer is a byte-level CLIP BPE written locally: every one of the 256 byte symbols, with and
without the end-of-word marker, plus the start and end tokens, so any text tokenizes.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Literal

Variant = Literal["sd1", "sd2"]
Size = Literal["tiny", "full"]

__all__ = ["build_tiny_pipeline", "build_random_pipeline", "write_byte_level_tokenizer"]

# Schedulers exactly as the public SD 1.5 and SD 2.1 repositories ship them.
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


def _configs(variant: Variant, size: Size, vocab_size: int) -> tuple[dict[str, Any], ...]:
    sd2 = variant == "sd2"
    text: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    if size == "tiny":
        text = {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "projection_dim": 32,
            "vocab_size": vocab_size,
        }
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
        text = {
            "hidden_size": 1024 if sd2 else 768,
            "intermediate_size": 4096 if sd2 else 3072,
            "num_attention_heads": 16 if sd2 else 12,
            "num_hidden_layers": 23 if sd2 else 12,
            "projection_dim": 512 if sd2 else 768,
            "vocab_size": 49408,
        }
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
    text.update(
        {
            "hidden_act": "gelu" if sd2 else "quick_gelu",
            "max_position_embeddings": 77,
            "layer_norm_eps": 1e-5,
            "bos_token_id": vocab_size - 2 if size == "tiny" else 49406,
            "eos_token_id": vocab_size - 1 if size == "tiny" else 49407,
            "pad_token_id": 1,
        }
    )
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
    return text, unet, vae, scheduler


def build_random_pipeline(
    out_dir: str | Path, *, variant: Variant = "sd1", size: Size = "tiny", seed: int = 0
) -> Path:
    """Build a randomly initialised Stable Diffusion pipeline and save it in Hub layout.

    Args:
        out_dir: Folder to write (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
            ``tokenizer/``, ``scheduler/``). Created if missing.
        variant: ``"sd1"`` (epsilon prediction, CLIP) or ``"sd2"`` (v-prediction, linear
            projections, upcast attention, GELU text encoder).
        size: ``"tiny"`` (8 MB, 64 px) or ``"full"`` (the released architecture, 512 / 768 px).
        seed: Seed for the random weights: the same seed gives the same files.

    Returns:
        The folder, loadable with ``StableDiffusionPipeline.from_pretrained(folder)``.
    """
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    lib: Any = diffusers  # diffusers' constructors and loaders are untyped

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    pad_token = "!" if variant == "sd2" else "<|endoftext|>"  # as the released tokenizers pad
    vocab_size = write_byte_level_tokenizer(tokenizer_dir, pad_token=pad_token)
    text_cfg, unet_cfg, vae_cfg, sched_cfg = _configs(variant, size, vocab_size)

    torch.manual_seed(seed)
    unet = lib.UNet2DConditionModel(**unet_cfg)
    vae = lib.AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    scheduler_cls = getattr(lib, sched_cfg["_class_name"])
    scheduler = scheduler_cls.from_config(sched_cfg)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    pipe = lib.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # save_pretrained rewrites the tokenizer folder; keep the classic vocab.json/merges.txt beside it.
    write_byte_level_tokenizer(tokenizer_dir, pad_token=pad_token)
    return out


def build_tiny_pipeline(out_dir: str | Path, *, variant: Variant = "sd1", seed: int = 0) -> Path:
    """Build the 8 MB randomly initialised pipeline used by tests and the offline demo.

    See :func:`build_random_pipeline`; images are 64x64 (32x32 latents).
    """
    return build_random_pipeline(out_dir, variant=variant, size="tiny", seed=seed)
