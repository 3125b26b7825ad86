"""SD 2.x single files: the .yaml beside them, and the OpenCLIP tensors copied from the base's file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from trainer import _keymaps  # noqa: E402
from trainer.export import (  # noqa: E402
    ExportError,
    ModelParts,
    config_path,
    export_single_file,
    load_model_parts,
    original_config,
    verify_single_file,
)

PREFIX = _keymaps.OPENCLIP_PREFIX


def _fake_base_file(model_dir: Path, path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An original-layout file of ``model_dir`` plus what a released SD 2.x file has on top of it:
    one more OpenCLIP layer (the last), ``text_projection`` and ``logit_scale``, in float32."""
    state = load_file(export_single_file(model_dir, path.with_name("plain.safetensors"), verify=False))
    layers = load_model_parts(model_dir).text_encoder_config["num_hidden_layers"]
    generator = torch.Generator().manual_seed(0)
    extras = {
        f"{PREFIX}transformer.resblocks.{layers}.{key.split(f'resblocks.{layers - 1}.')[1]}": torch.randn(
            tensor.shape, generator=generator
        )
        for key, tensor in state.items()
        if f"{PREFIX}transformer.resblocks.{layers - 1}." in key
    }
    width = state[f"{PREFIX}ln_final.weight"].shape[0]
    extras[f"{PREFIX}text_projection"] = torch.randn(width, width, generator=generator)
    extras[f"{PREFIX}logit_scale"] = torch.tensor(4.6052)
    save_file({**state, **extras}, path)
    return path, extras


def _plain(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value


def test_the_yaml_beside_an_sd2_file_describes_the_model(
    tiny_sd2: Path, tiny_sd1: Path, tmp_path: Path
) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = export_single_file(tiny_sd2, tmp_path / "sd2.safetensors")

    config_file = config_path(out)
    assert config_file == tmp_path / "sd2.yaml" and config_file.is_file()
    config = yaml.safe_load(config_file.read_text())
    params = config["model"]["params"]
    assert params["parameterization"] == "v"
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"
    assert params["cond_stage_config"]["target"] == "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
    # diffusers builds the same UNet and VAE from the file and the yaml alone (no diffusers configs).
    folder_unet = UNet2DConditionModel.from_pretrained(tiny_sd2, subfolder="unet")
    unet = UNet2DConditionModel.from_single_file(str(out), original_config=str(config_file))
    for key in (
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "use_linear_projection",
        "in_channels",
        "out_channels",
    ):
        assert _plain(unet.config[key]) == _plain(folder_unet.config[key]), key
    want = folder_unet.state_dict()
    assert all(torch.equal(tensor, want[key]) for key, tensor in unet.state_dict().items())
    folder_vae = AutoencoderKL.from_pretrained(tiny_sd2, subfolder="vae")
    vae = AutoencoderKL.from_single_file(str(out), original_config=str(config_file))
    assert vae.config.scaling_factor == folder_vae.config.scaling_factor
    want = folder_vae.state_dict()
    assert all(torch.equal(tensor, want[key]) for key, tensor in vae.state_dict().items())

    # SD 1.x files need no yaml (A1111's default config is SD 1.x's).
    sd1 = export_single_file(tiny_sd1, tmp_path / "sd1.safetensors")
    assert not config_path(sd1).exists()


def test_full_size_sd21_config_is_v2_inference_v() -> None:
    """The released SD 2.1 768-v architecture gets the values of Stability AI's v2-inference-v.yaml."""
    from trainer.tiny import _SCHEDULER_SD2, _configs

    configs = _configs("sd2", "full", 49408)
    parts = ModelParts(
        unet={},
        unet_config=dict(configs.unet),
        vae={},
        vae_config={**configs.vae, "scaling_factor": 0.18215},
        text_encoder={},
        text_encoder_config=dict(configs.text_encoder),
        prediction_type="v_prediction",
        scheduler_config=dict(_SCHEDULER_SD2),
    )

    params = original_config(parts)["model"]["params"]

    assert params["parameterization"] == "v"
    assert (params["linear_start"], params["linear_end"], params["timesteps"]) == (0.00085, 0.012, 1000)
    assert (params["image_size"], params["channels"], params["scale_factor"]) == (96, 4, 0.18215)
    unet = params["unet_config"]["params"]
    assert unet["model_channels"] == 320 and unet["channel_mult"] == [1, 2, 4, 4]
    assert unet["attention_resolutions"] == [1, 2, 4]  # the same set as the yaml's [4, 2, 1]
    assert unet["num_head_channels"] == 64 and unet["context_dim"] == 1024
    assert unet["num_res_blocks"] == 2 and unet["transformer_depth"] == 1
    assert unet["use_linear_in_transformer"] is True and unet["legacy"] is False
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    assert ddconfig["ch"] == 128 and ddconfig["ch_mult"] == [1, 2, 4, 4] and ddconfig["z_channels"] == 4
    epsilon = original_config(ModelParts(**{**parts.__dict__, "prediction_type": "epsilon"}))
    assert "parameterization" not in epsilon["model"]["params"]  # v2-inference.yaml


def test_diffusers_reads_the_full_size_sd21_config_back() -> None:
    """diffusers' own config builders turn the written config into SD 2.1's diffusers configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.export import to_original_state_dict
    from trainer.tiny import _SCHEDULER_SD2, _configs

    configs = _configs("sd2", "full", 49408)
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
        prediction_type="v_prediction",
        scheduler_config=dict(_SCHEDULER_SD2),
    )
    checkpoint = to_original_state_dict(parts)
    config = original_config(parts)

    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)  # type: ignore[no-untyped-call]
    for key in (
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "use_linear_projection",
        "in_channels",
        "out_channels",
    ):
        assert _plain(unet_config[key]) == _plain(unet.config[key]), key
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, checkpoint)  # type: ignore[no-untyped-call]
    for key in ("block_out_channels", "latent_channels", "layers_per_block", "scaling_factor"):
        assert _plain(vae_config[key]) == _plain(vae.config[key]), key


def test_base_single_file_tensors_are_copied_bit_exactly(
    tiny_sd2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, extras = _fake_base_file(tiny_sd2, tmp_path / "base.safetensors")

    with caplog.at_level(logging.INFO, logger="trainer.export"):
        out = export_single_file(tiny_sd2, tmp_path / "tuned.safetensors", half=True, base_single_file=base)
    plain = load_file(export_single_file(tiny_sd2, tmp_path / "plain-half.safetensors", half=True))

    written = load_file(out)
    assert set(written) == set(plain) | set(extras)
    for key, tensor in extras.items():
        assert written[key].dtype == tensor.dtype == torch.float32, key  # as stored in the base file
        assert torch.equal(written[key], tensor), key
    assert all(torch.equal(written[key], tensor) for key, tensor in plain.items())
    assert f"Copied {len(extras)} text-encoder tensors" in caplog.text
    verify_single_file(out, tiny_sd2, half=True)  # the copied tensors are left out of the comparison


def test_without_a_base_file_the_missing_tensors_are_named(
    tiny_sd2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer.export"):
        export_single_file(tiny_sd2, tmp_path / "sd2.safetensors")

    assert "no final OpenCLIP layer, text_projection or logit_scale" in caplog.text
    assert "--base-single-file" in caplog.text
    # The tiny UNet has no output_blocks.11: ComfyUI would guess epsilon, and the export says so.
    assert "ComfyUI will take sd2.safetensors for an epsilon model" in caplog.text
    assert "ModelSamplingDiscrete" in caplog.text


def test_a_base_file_that_does_not_fit_is_refused(tiny_sd1: Path, tiny_sd2: Path, tmp_path: Path) -> None:
    sd1_file = export_single_file(tiny_sd1, tmp_path / "sd1.safetensors")
    with pytest.raises(ExportError, match="has no SD 2.x text encoder"):
        export_single_file(tiny_sd2, tmp_path / "a.safetensors", base_single_file=sd1_file)
    with pytest.raises(ExportError, match="is for SD 2.x models"):
        export_single_file(tiny_sd1, tmp_path / "b.safetensors", base_single_file=sd1_file)
    with pytest.raises(ExportError, match="does not exist"):
        export_single_file(
            tiny_sd2, tmp_path / "c.safetensors", base_single_file=tmp_path / "nope.safetensors"
        )
    state = load_file(export_single_file(tiny_sd2, tmp_path / "d.safetensors"))
    key = f"{PREFIX}ln_final.weight"
    state[key] = torch.ones(state[key].shape[0] * 2)
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(ExportError, match=r"not a single file of this model's base(.|\n)*ln_final.weight"):
        export_single_file(
            tiny_sd2, tmp_path / "e.safetensors", base_single_file=tmp_path / "other.safetensors"
        )
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "e.safetensors").exists()


def _image(pipe: object) -> object:
    generator = torch.Generator("cpu").manual_seed(7)
    return pipe("a photo of sks dog", num_inference_steps=2, generator=generator, output_type="np").images[0]  # type: ignore[operator]


def test_a_file_with_the_base_tensors_gives_the_folder_s_image(tiny_sd2: Path, tmp_path: Path) -> None:
    from trainer.loading import load_pipeline

    base, _ = _fake_base_file(tiny_sd2, tmp_path / "base.safetensors")
    path = export_single_file(tiny_sd2, tmp_path / "model.safetensors", base_single_file=base)

    from_folder = load_pipeline(tiny_sd2, device="cpu", dtype=torch.float32)
    from_file = load_pipeline(path, device="cpu", dtype=torch.float32, config=tiny_sd2, local_files_only=True)

    assert from_file.scheduler.config.prediction_type == "v_prediction"
    assert (_image(from_folder) == _image(from_file)).all()  # type: ignore[union-attr]
