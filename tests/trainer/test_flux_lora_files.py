"""The kohya / ComfyUI / Forge file of a FLUX LoRA: BFL's names, q/k/v fused, read back by diffusers."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402

from trainer.lora_files import (  # noqa: E402
    KOHYA_WEIGHTS,
    LORA_DIR,
    kohya_state_dict,
    save_lora_weights,
    write_kohya_file,
)

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
WIDTH, MLP = 32, 128  # the tiny transformer's width (2 heads of 16) and its MLP's (4x)


def make_flux_lora(
    base: Path, out: Path, *, target_modules: Any, rank: int = 4, alpha: int = 4
) -> tuple[Path, dict[str, Any]]:
    """``out/lora`` as a FLUX LoRA run writes it, with random non-zero lora_B, and the transformer's
    weights with that LoRA merged in by PEFT."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    transformer = FluxPipeline.from_pretrained(base).transformer
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules))
    torch.manual_seed(5)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.3)
    lora = save_lora_weights(out / LORA_DIR, architecture="flux", transformer=transformer)
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    merged = {
        k.replace(".base_layer.", "."): v.detach().clone()
        for k, v in transformer.state_dict().items()
        if "lora_" not in k
    }
    return lora, merged


def converter_at_width(width: int, mlp: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """diffusers' own kohya FLUX converter with the widths of single blocks' linear1 changed.

    diffusers writes FLUX.1-dev's (3072, 12288) into the converter; the tiny transformer is narrower.
    """
    from diffusers.loaders import lora_conversion_utils

    source = inspect.getsource(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
    written = "dims=[3072, 3072, 3072, 12288]"
    assert written in source
    namespace = dict(vars(lora_conversion_utils))
    exec(textwrap.dedent(source.replace(written, f"dims=[{width}, {width}, {width}, {mlp}]")), namespace)
    converter: Callable[[dict[str, Any]], dict[str, Any]] = namespace["_convert_kohya_flux_lora_to_diffusers"]
    return converter


def fused_transformer(base: Path, lora_file: Path) -> tuple[dict[str, Any], Any]:
    """The transformer's weights with the LoRA fused in, and a 2-step image."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    image = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}, image


def assert_same(
    base: Path, lora: Path, merged: dict[str, Any], *, same_image: bool = True, skip: tuple[str, ...] = ()
) -> None:
    """The kohya file, loaded by diffusers and fused, gives PEFT's merged weights (and the image the
    diffusers file gives)."""
    from diffusers import FluxPipeline

    original = FluxPipeline.from_pretrained(base).transformer.state_dict()
    got, image = fused_transformer(base, lora / KOHYA_WEIGHTS)
    assert set(got) == set(merged)
    assert [k for k in merged if not torch.equal(merged[k], original[k])]  # the LoRA does something
    for key in set(merged) - set(skip):
        torch.testing.assert_close(got[key], merged[key], rtol=1e-5, atol=1e-6, msg=key)
    if same_image:
        _, expected_image = fused_transformer(base, lora / "pytorch_lora_weights.safetensors")
        assert abs(image - expected_image).max() < 1e-4


def test_the_kohya_file_of_an_attention_lora_gives_the_same_model(
    tiny_flux: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora, merged = make_flux_lora(tiny_flux, tmp_path, target_modules=ATTENTION)
    write_kohya_file(lora, architecture="flux")
    monkeypatch.setattr(
        "diffusers.loaders.lora_pipeline._convert_kohya_flux_lora_to_diffusers",
        converter_at_width(WIDTH, MLP),
    )
    assert_same(tiny_flux, lora, merged)


def test_a_double_block_lora_loads_with_diffusers_unchanged(tiny_flux: Path, tmp_path: Path) -> None:
    # Layers of double blocks only (txt q/k/v fused), so diffusers' converter runs as released.
    targets = ["to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    lora, merged = make_flux_lora(tiny_flux, tmp_path, target_modules=targets)
    write_kohya_file(lora, architecture="flux")
    # diffusers reads this diffusers file only in part (it mixes `lora.down` and `lora_A` names).
    assert_same(tiny_flux, lora, merged, same_image=False)


def test_feed_forward_and_modulation_layers_give_the_same_model(
    tiny_flux: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    targets = ["to_q", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    targets += ["norm1.linear", "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out"]
    lora, merged = make_flux_lora(tiny_flux, tmp_path, target_modules=targets, rank=2, alpha=2)
    write_kohya_file(lora, architecture="flux")
    monkeypatch.setattr(
        "diffusers.loaders.lora_pipeline._convert_kohya_flux_lora_to_diffusers",
        converter_at_width(WIDTH, MLP),
    )
    # diffusers' converter reads final_layer_linear as `proj_out` without the `transformer.` prefix,
    # and then leaves it out; the single blocks' proj_out (linear2) is checked.
    assert_same(tiny_flux, lora, merged, same_image=False, skip=("proj_out.weight",))
    with safe_open(str(lora / KOHYA_WEIGHTS), framework="pt") as handle:
        names = {k.split(".")[0] for k in handle.keys()}
    assert {"lora_unet_final_layer_linear", "lora_unet_single_blocks_0_linear2"} <= names
    assert {"lora_unet_double_blocks_0_img_mod_lin", "lora_unet_single_blocks_0_modulation_lin"} <= names


def test_bfl_names_fused_shapes_and_alphas(tiny_flux: Path, tmp_path: Path) -> None:
    lora, _ = make_flux_lora(tiny_flux, tmp_path, target_modules=ATTENTION, rank=4, alpha=8)
    path = write_kohya_file(lora, architecture="flux")
    with safe_open(str(path), framework="pt") as handle:
        kohya = {k: handle.get_tensor(k) for k in handle.keys()}
        assert handle.metadata()["ss_base_model_version"] == "flux1"
    names = {k.split(".")[0] for k in kohya}
    assert names == {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_double_blocks_0_txt_attn_proj",
        "lora_unet_single_blocks_0_linear1",
    }
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert kohya[f"{qkv}.lora_down.weight"].shape == (12, WIDTH)
    assert kohya[f"{qkv}.lora_up.weight"].shape == (3 * WIDTH, 12)
    assert kohya[f"{qkv}.alpha"].item() == 24  # 3 x 8: alpha / rank stays 2
    assert kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 8
    linear1 = "lora_unet_single_blocks_0_linear1"
    up = kohya[f"{linear1}.lora_up.weight"]
    assert up.shape == (3 * WIDTH + MLP, 16)
    assert kohya[f"{linear1}.alpha"].item() == 32
    assert not up[3 * WIDTH :].any() and not kohya[f"{linear1}.lora_down.weight"][12:].any()  # no MLP LoRA
    assert not up[:WIDTH, 4:].any()  # block-diagonal: q's rows use q's down only


def test_single_block_at_flux_dev_width_through_diffusers_converter() -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    torch.manual_seed(0)
    rank, alpha = 2, 1.0
    state = {}
    for name in ("to_q", "to_k", "to_v"):
        module = f"transformer.single_transformer_blocks.3.attn.{name}"
        state[f"{module}.lora_A.weight"] = torch.randn(rank, 3072)
        state[f"{module}.lora_B.weight"] = torch.randn(3072, rank)
    kohya = kohya_state_dict(state, architecture="flux", alphas={"transformer": alpha})
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for name in ("to_q", "to_k", "to_v"):
        module = f"transformer.single_transformer_blocks.3.attn.{name}"
        expected = state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"] * (alpha / rank)
        got = back[f"{module}.lora_B.weight"] @ back[f"{module}.lora_A.weight"]
        torch.testing.assert_close(got, expected)
    mlp = "transformer.single_transformer_blocks.3.proj_mlp"
    assert back[f"{mlp}.lora_B.weight"].shape == (12288, rank) and not back[f"{mlp}.lora_B.weight"].any()


def test_a_module_flux_checkpoints_lack_is_refused() -> None:
    state = {
        "transformer.pos_embed.proj.lora_A.weight": torch.zeros(1, 2),
        "transformer.pos_embed.proj.lora_B.weight": torch.zeros(2, 1),
    }
    with pytest.raises(ValueError, match="no counterpart"):
        kohya_state_dict(state, architecture="flux")
