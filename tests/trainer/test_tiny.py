"""The tiny pipelines: Hub layout, keys as the real repos store them, and loading with the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TEXT_ENCODERS = {"sd1": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_text_encoders_are_saved_with_the_text_model_prefix(
    request: pytest.FixtureRequest, variant: str
) -> None:
    """transformers 4.x loads an unprefixed CLIPTextModel file with random weights: every real repo
    stores ``text_model.*`` (and a projection, when there is one, at the top level)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(request.getfixturevalue(f"tiny_{variant}"))
    for name in TEXT_ENCODERS[variant]:
        saved = load_file(folder / name / "model.safetensors")
        assert saved, name
        unprefixed = [k for k in saved if not k.startswith("text_model.")]
        assert unprefixed == (["text_projection.weight"] if name == "text_encoder_2" else []), name
        assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in saved
        assert "text_model.embeddings.token_embedding.weight" in saved

        # And the installed transformers loads every saved tensor (none left at random).
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        model = cls.from_pretrained(folder / name)
        loaded = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
        for key, tensor in saved.items():
            assert torch.equal(loaded[key.removeprefix("text_model.")], tensor), key


def test_tiny_sdxl_is_laid_out_like_sdxl_base(tiny_sdxl: Path) -> None:
    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["force_zeros_for_empty_prompt"] is True
    for folder in ("tokenizer", "tokenizer_2"):
        assert (tiny_sdxl / folder / "vocab.json").is_file() and (tiny_sdxl / folder / "merges.txt").is_file()
    assert json.loads((tiny_sdxl / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"

    unet = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    te1 = json.loads((tiny_sdxl / "text_encoder" / "config.json").read_text())
    te2 = json.loads((tiny_sdxl / "text_encoder_2" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    time_ids = 6 * unet["addition_time_embed_dim"]
    assert unet["projection_class_embeddings_input_dim"] == time_ids + te2["projection_dim"]
    assert (te1["hidden_act"], te2["hidden_act"]) == ("quick_gelu", "gelu")
    assert json.loads((tiny_sdxl / "vae" / "config.json").read_text())["scaling_factor"] == 0.13025


@pytest.mark.slow
def test_tiny_sdxl_loads_and_generates(tiny_sdxl: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)

    def image(seed: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe("a photo of sks toy", num_inference_steps=2, generator=generator, output_type="pt")
        return out.images[0]

    first = image(0)
    assert tuple(first.shape) == (3, 64, 64)
    assert torch.isfinite(first).all()
    assert torch.equal(first, image(0))
    assert not torch.equal(first, image(1))


def test_full_size_sdxl_has_the_released_shapes() -> None:
    """SDXL base 1.0 built on the meta device: parameter counts of the released UNet and encoders."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from trainer.tiny import _configs

    configs = _configs("sdxl", "full", 49408)
    assert configs.text_encoder_2 is not None
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs.unet)
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(**configs.text_encoder_2))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in bigg.parameters()) == 694_659_840


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux"), variant="flux")


def test_tiny_flux_is_laid_out_like_flux_dev(tiny_flux: Path) -> None:
    index = json.loads((tiny_flux / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    transformer = json.loads((tiny_flux / "transformer" / "config.json").read_text())
    clip = json.loads((tiny_flux / "text_encoder" / "config.json").read_text())
    t5 = json.loads((tiny_flux / "text_encoder_2" / "config.json").read_text())
    vae = json.loads((tiny_flux / "vae" / "config.json").read_text())
    assert transformer["guidance_embeds"] is True  # FLUX.1-dev takes the guidance scale as an input
    assert transformer["joint_attention_dim"] == t5["d_model"]
    assert transformer["pooled_projection_dim"] == clip["hidden_size"]
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert transformer["in_channels"] == 4 * vae["latent_channels"] == 64  # 2 x 2 packed latents
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    scheduler = json.loads((tiny_flux / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] is True and scheduler["shift"] == 3.0
    assert all(
        key.startswith("text_model.") for key in load_file(tiny_flux / "text_encoder" / "model.safetensors")
    )
    assert (tiny_flux / "tokenizer_2" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_tiny_flux_loads_and_generates(tiny_flux: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux)

    def image(seed: int, guidance: float = 3.5) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe(
            "a photo of sks cat",
            num_inference_steps=2,
            guidance_scale=guidance,
            height=64,
            width=64,
            max_sequence_length=32,
            generator=generator,
            output_type="pt",
        )
        return out.images[0]

    first = image(0)
    assert tuple(first.shape) == (3, 64, 64) and torch.isfinite(first).all()
    assert torch.equal(first, image(0))
    assert not torch.equal(first, image(1))
    assert not torch.equal(first, image(0, guidance=7.0))  # the guidance embedding is used


def test_a_flux_base_is_recognised_with_its_default_size(tiny_flux: Path) -> None:
    from trainer.run import inspect_base_model

    info = inspect_base_model(str(tiny_flux))
    assert (info.architecture, info.prediction_type) == ("flux", "flow_matching")
    # FluxPipeline's default: 128 latent pixels x the VAE's scale (2 for the tiny VAE, 8 for dev).
    assert info.resolution == 256
    assert info.describe() == "FLUX.1 (flow_matching, 256 px)"
