"""Single-file export: key layout, bit-exact round trips through diffusers, and the same images."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from trainer import _keymaps  # noqa: E402
from trainer.export import (  # noqa: E402
    ExportError,
    ExportVerificationError,
    ModelParts,
    compare_state_dicts,
    export_single_file,
    load_model_parts,
    restore_diffusers_state_dicts,
    to_original_state_dict,
    verify_single_file,
)


@pytest.fixture(scope="module")
def sd1_dir(tiny_sd1: Path) -> Path:
    return tiny_sd1


@pytest.fixture(scope="module")
def sd2_dir(tiny_sd2: Path) -> Path:
    return tiny_sd2


@pytest.fixture(params=["sd1", "sd2"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(f"{request.param}_dir"))


def _independent_round_trip(path: Path, model_dir: Path, *, half: bool) -> None:
    """Re-check a written file without export's own verification code path."""
    if path.suffix == ".safetensors":
        checkpoint = load_file(path)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    parts = load_model_parts(model_dir)
    restored = restore_diffusers_state_dicts(
        checkpoint,
        unet_config=parts.unet_config,
        vae_config=parts.vae_config,
        text_encoder_config=parts.text_encoder_config,
    )
    for component in ("unet", "vae", "text_encoder"):
        want = dict(getattr(parts, component))
        if component == "text_encoder" and "cond_stage_model.model.ln_final.weight" in checkpoint:
            want.pop("embeddings.position_ids", None)
        if half:
            want = {k: v.half() if v.is_floating_point() else v for k, v in want.items()}
        assert len(restored[component]) == len(want)
        for key, tensor in want.items():
            back = restored[component][key]
            assert back.dtype == tensor.dtype, key
            assert torch.equal(back, tensor), key


def test_sd1_layout_and_round_trip(sd1_dir: Path, tmp_path: Path) -> None:
    out = export_single_file(sd1_dir, tmp_path / "export" / "model.safetensors")

    assert out == tmp_path / "export" / "model.safetensors"
    assert not list(out.parent.glob(".*")), "no partial file left behind"
    state = load_file(out)
    # Original names: UNet, VAE (1x1 conv attention) and OpenAI CLIP under cond_stage_model.transformer.
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 4  # SD 1.x conv proj_in
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "first_stage_model.decoder.mid.attn_1.proj_out.bias" in state
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in state
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.resolution"] == "64x64"
    _independent_round_trip(out, sd1_dir, half=False)


def test_sd2_uses_the_openclip_layout(sd2_dir: Path, tmp_path: Path) -> None:
    out = export_single_file(sd2_dir, tmp_path / "sd2.safetensors")

    state = load_file(out)
    prefix = "cond_stage_model.model."
    assert state[f"{prefix}transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)
    assert state[f"{prefix}transformer.resblocks.1.attn.in_proj_bias"].shape == (3 * 32,)
    for name in ("ln_1.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_proj.bias", "attn.out_proj.weight"):
        assert f"{prefix}transformer.resblocks.1.{name}" in state
    assert state[f"{prefix}positional_embedding"].shape == (77, 32)
    assert f"{prefix}token_embedding.weight" in state and f"{prefix}ln_final.bias" in state
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    # SD 2.x linear projections stay Linear weights.
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert metadata["modelspec.prediction_type"] == "v"
    _independent_round_trip(out, sd2_dir, half=False)


def test_half_stores_float16_bit_exact(model_dir: Path, tmp_path: Path) -> None:
    full = export_single_file(model_dir, tmp_path / "full.safetensors")
    half = export_single_file(model_dir, tmp_path / "half.safetensors", half=True)

    state = load_file(half)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}
    assert half.stat().st_size < 0.6 * full.stat().st_size
    _independent_round_trip(half, model_dir, half=True)


def test_ckpt_is_a_weights_only_state_dict_with_a_warning(model_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="pickle"):
        out = export_single_file(model_dir, tmp_path / "model.ckpt", half=True)

    loaded = torch.load(out, map_location="cpu", weights_only=True)
    assert set(loaded) == {"state_dict"}
    assert (
        loaded["state_dict"].keys()
        == load_file(export_single_file(model_dir, tmp_path / "model.safetensors", half=True)).keys()
    )
    _independent_round_trip(out, model_dir, half=True)
    verify_single_file(out, model_dir, half=True)


def test_verification_catches_a_wrong_table(
    sd2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, k, v = _keymaps.OPENCLIP_QKV
    monkeypatch.setattr(_keymaps, "OPENCLIP_QKV", (k, q, v))  # fuse in the wrong order
    out = tmp_path / "bad.safetensors"

    with pytest.raises(ExportVerificationError) as info:
        export_single_file(sd2_dir, out)

    assert "text_encoder: encoder.layers.0.self_attn.q_proj.weight: values differ" in info.value.problems
    assert not out.exists() and not list(tmp_path.iterdir()), "nothing is written when verification fails"


def test_verification_catches_a_wrong_vae_reshape(
    sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    swapped = [
        ("norm.", "group_norm."),
        ("q.", "to_k."),
        ("k.", "to_q."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ]
    monkeypatch.setattr(_keymaps, "VAE_ATTENTION_PARTS", swapped)

    with pytest.raises(
        ExportVerificationError, match=r"vae: encoder\.mid_block\.attentions\.0\.to_q\.weight"
    ):
        export_single_file(sd1_dir, tmp_path / "bad.safetensors")


def _replace_unet_and_vae(base: Path, dest: Path) -> Path:
    """A pipeline folder whose UNet has 3 blocks of 1 layer and whose VAE has 3 blocks of 2."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    shutil.copytree(base, dest)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        sample_size=16,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=16,
    )
    for name, model in (("unet", unet), ("vae", vae)):
        shutil.rmtree(dest / name)
        model.save_pretrained(dest / name)
    return dest


def test_tables_follow_the_config(sd1_dir: Path, tmp_path: Path) -> None:
    folder = _replace_unet_and_vae(sd1_dir, tmp_path / "odd")

    out = export_single_file(folder, tmp_path / "odd.safetensors")

    state = load_file(out)
    unet = "model.diffusion_model."
    # 1 layer per block: resnet, downsampler, resnet, downsampler, resnet(+attention).
    assert f"{unet}input_blocks.2.0.op.weight" in state and f"{unet}input_blocks.4.0.op.weight" in state
    assert (
        f"{unet}input_blocks.5.1.proj_in.weight" in state
        and f"{unet}input_blocks.3.1.norm.weight" not in state
    )
    # Up blocks have 2 layers; the attention block's upsampler sits in slot 2, the plain one's in slot 1.
    assert f"{unet}output_blocks.1.2.conv.weight" in state and f"{unet}output_blocks.3.1.conv.weight" in state
    assert "first_stage_model.encoder.down.2.block.1.conv2.weight" in state
    assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in state
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in state
    _independent_round_trip(out, folder, half=False)


def test_unsupported_configs_are_refused_clearly() -> None:
    config = {
        "layers_per_block": [1, 2],
        "down_block_types": ["CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D"],
    }
    with pytest.raises(_keymaps.KeyMapError, match="one layer count for every block"):
        _keymaps.unet_rules(config)
    config["layers_per_block"] = 2
    config["class_embed_type"] = "timestep"
    with pytest.raises(_keymaps.KeyMapError, match="class_embed_type"):
        _keymaps.unet_rules(config)
    with pytest.raises(_keymaps.KeyMapError, match="no counterpart"):
        _keymaps.map_key(
            "add_embedding.linear_1.weight", _keymaps.unet_rules({**config, "class_embed_type": None})
        )


def test_bad_arguments(sd1_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"\.safetensors or \.ckpt"):
        export_single_file(sd1_dir, tmp_path / "model.bin")
    with pytest.raises(ExportError, match="model_index.json"):
        export_single_file(tmp_path, tmp_path / "model.safetensors")


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_full_size_key_layout_on_the_meta_device(variant: str) -> None:
    """The released SD 1.5 / 2.1 architectures, names and shapes only (no memory allocated)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.tiny import _configs

    configs = _configs(variant, "full", 49408)  # type: ignore[arg-type]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs.unet)
        vae = AutoencoderKL(**configs.vae)
        text = CLIPTextModel(CLIPTextConfig(**configs.text_encoder))
    parts = ModelParts(
        unet=unet.state_dict(),
        unet_config=dict(unet.config),
        vae=vae.state_dict(),
        vae_config=dict(vae.config),
        text_encoder={k.removeprefix("text_model."): v for k, v in text.state_dict().items()},
        text_encoder_config=text.config.to_dict(),
    )

    state = to_original_state_dict(parts)

    unet_prefix = "model.diffusion_model."
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    width = 1024 if variant == "sd2" else 768
    assert shapes[f"{unet_prefix}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] == (320, 320)
    assert shapes[f"{unet_prefix}input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes[f"{unet_prefix}output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[f"{unet_prefix}output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[f"{unet_prefix}middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, width)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["first_stage_model.decoder.up.0.block.0.conv1.weight"] == (128, 256, 3, 3)
    assert sum(k.startswith(unet_prefix) for k in state) == 686
    assert sum(k.startswith("first_stage_model.") for k in state) == 248
    if variant == "sd2":
        assert shapes["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"] == (3072, 1024)
        assert shapes["cond_stage_model.model.positional_embedding"] == (77, 1024)
    else:
        assert shapes["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias"] == (768,)
    assert infer_diffusers_model_type(state) == ("v2" if variant == "sd2" else "v1")

    restored = restore_diffusers_state_dicts(
        state,
        unet_config=parts.unet_config,
        vae_config=parts.vae_config,
        text_encoder_config=parts.text_encoder_config,
    )
    for component in ("unet", "vae", "text_encoder"):
        assert (
            compare_state_dicts(component, restored[component], getattr(parts, component), values=False) == []
        )


def _image(pipe: object, seed: int = 7) -> object:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe("a photo of sks dog", num_inference_steps=2, generator=generator, output_type="np").images[0]  # type: ignore[operator]


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "suffix"), [("sd1", ".safetensors"), ("sd2", ".ckpt")])
def test_single_file_gives_the_same_image(
    request: pytest.FixtureRequest, tmp_path: Path, variant: str, suffix: str
) -> None:
    from trainer.loading import load_pipeline

    folder = Path(request.getfixturevalue(f"{variant}_dir"))
    with pytest.warns(UserWarning, match="pickle") if suffix == ".ckpt" else contextlib.nullcontext():
        path = export_single_file(folder, tmp_path / f"model{suffix}")

    from_folder = load_pipeline(folder, device="cpu", dtype=torch.float32)
    from_file = load_pipeline(path, device="cpu", dtype=torch.float32, config=folder, local_files_only=True)

    assert type(from_file.scheduler) is type(from_folder.scheduler)
    assert from_file.scheduler.config.prediction_type == from_folder.scheduler.config.prediction_type
    assert (_image(from_folder) == _image(from_file)).all()  # type: ignore[union-attr]
