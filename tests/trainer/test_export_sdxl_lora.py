"""SDXL single files (the sgm layout of sd_xl_base_1.0) and LoRA runs fused into their base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from trainer.export import (  # noqa: E402
    ExportError,
    export_merged,
    export_single_file,
    load_model_parts,
    restore_diffusers_state_dicts,
)
from trainer.lora_files import LORA_DIR, LORA_WEIGHTS  # noqa: E402


def make_lora_run(
    base: Path, out: Path, *, text_encoders: bool = False, rank: int = 4, alpha: int = 8
) -> Path:
    """A LoRA run folder as training writes it: run.json + lora/ in diffusers format, with random
    (nonzero) lora_B so that fusing changes the model, and alpha != rank so the scale matters."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(base)
    torch.manual_seed(3)
    unet_config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )
    pipe.unet.add_adapter(unet_config)
    layers = {
        "unet_lora_layers": get_peft_model_state_dict(pipe.unet),
        "unet_lora_adapter_metadata": unet_config.to_dict(),
    }
    names = ["text_encoder", "text_encoder_2"] if hasattr(pipe, "text_encoder_2") else ["text_encoder"]
    if text_encoders:
        text_config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        )
        for name in names:
            inject_adapter_in_model(text_config, getattr(pipe, name))
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, name))
            layers[f"{name}_lora_adapter_metadata"] = text_config.to_dict()
    type(pipe).save_lora_weights(out / LORA_DIR, **layers)
    record = {
        "base_model": str(base),
        "method": "lora",
        "lora_rank": rank,
        "lora_alpha": alpha,
        "train_text_encoder": text_encoders,
        "architecture": "sdxl" if len(names) == 2 else "sd1",
        "concepts": [{"instance_prompt": "a photo of sks toy", "class_prompt": "a photo of a toy"}],
    }
    (out / "run.json").write_text(json.dumps(record), encoding="utf-8")
    return out


def _image(pipe: object, seed: int = 7) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe("a photo of sks toy", num_inference_steps=2, generator=generator, output_type="np")  # type: ignore[operator]
    return np.asarray(out.images[0])


def _components(pipe: object) -> dict[str, dict[str, torch.Tensor]]:
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    return {n: getattr(pipe, n).state_dict() for n in names if getattr(pipe, n, None) is not None}


def _assert_same_tensors(a: object, b: object) -> None:
    left, right = _components(a), _components(b)
    assert left.keys() == right.keys()
    for name, state in left.items():
        assert state.keys() == right[name].keys(), name
        for key, tensor in state.items():
            assert torch.equal(tensor, right[name][key]), f"{name}: {key}"


def test_sdxl_uses_the_sgm_layout_and_round_trips(tiny_sdxl: Path, tmp_path: Path) -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    path = export_single_file(tiny_sdxl, tmp_path / "model.safetensors")
    state = load_file(path)

    assert infer_diffusers_model_type(state) == "xl_base"
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.label_emb.0.0.weight" in state  # add_embedding
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.bias" in state
    bigg = "conditioner.embedders.1.model."
    assert f"{bigg}transformer.resblocks.9.attn.in_proj_weight" in state
    parts = load_model_parts(tiny_sdxl)
    assert parts.text_encoder_2 is not None
    # open_clip multiplies by the projection: the file holds the transposed Linear weight.
    assert torch.equal(state[f"{bigg}text_projection"], parts.text_encoder_2["text_projection.weight"].T)

    restored = restore_diffusers_state_dicts(
        state,
        unet_config=parts.unet_config,
        vae_config=parts.vae_config,
        text_encoder_config=parts.text_encoder_config,
        text_encoder_2_config=parts.text_encoder_2_config,
    )
    for name, want in parts.components().items():
        want = {
            k: v for k, v in want.items() if not (name == "text_encoder_2" and k.endswith("position_ids"))
        }
        assert restored[name].keys() == want.keys(), name
        assert all(torch.equal(restored[name][k], v) for k, v in want.items()), name


@pytest.mark.slow
def test_sdxl_single_file_loads_in_diffusers(tiny_sdxl: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    path = export_single_file(tiny_sdxl, tmp_path / "model.safetensors", half=False)
    from_folder = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    from_file = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tiny_sdxl), local_files_only=True
    )

    _assert_same_tensors(from_folder, from_file)
    # Same weights, but not the same memory alignment (an mmap'd file vs. converted copies): CPU
    # matmul kernels may then differ in the last bit, so images are compared to 1e-5.
    np.testing.assert_allclose(_image(from_folder), _image(from_file), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "text_encoders"), [("sd1", True), ("sdxl", True)])
def test_merge_fuses_the_adapter_like_diffusers(
    request: pytest.FixtureRequest, tmp_path: Path, variant: str, text_encoders: bool
) -> None:
    from diffusers import DiffusionPipeline

    base = Path(request.getfixturevalue(f"tiny_{variant}"))
    run = make_lora_run(base, tmp_path / "run", text_encoders=text_encoders)
    path = export_merged(run, run / "export" / "model.safetensors")

    # What diffusers itself gives: the base with the adapter loaded and fused.
    fused = DiffusionPipeline.from_pretrained(base)
    plain = DiffusionPipeline.from_pretrained(base)
    fused.load_lora_weights(run / LORA_DIR)
    fused.fuse_lora()
    fused.unload_lora_weights()
    from_file = type(fused).from_single_file(str(path), config=str(base), local_files_only=True)

    _assert_same_tensors(fused, from_file)
    changed = _components(plain), _components(from_file)
    for name in ("unet", "text_encoder"):
        before, after = changed[0][name], changed[1][name]
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{name} unchanged by the merge"
    np.testing.assert_allclose(_image(fused), _image(from_file), atol=1e-5)
    assert not np.allclose(_image(plain), _image(from_file), atol=1e-3)


def test_merge_refuses_runs_without_an_adapter(tiny_sd1: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ExportError, match="run.json is missing"):
        export_merged(run, tmp_path / "out.safetensors")
    (run / "run.json").write_text(json.dumps({"base_model": str(tiny_sd1)}), encoding="utf-8")
    with pytest.raises(ExportError, match=LORA_WEIGHTS):
        export_merged(run, tmp_path / "out.safetensors")
    with pytest.raises(ExportError, match=r"\.safetensors or \.ckpt"):
        export_merged(run, tmp_path / "out.bin")


@pytest.mark.slow
def test_export_merge_command(tiny_sd1: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trainer.cli import app

    run = make_lora_run(tiny_sd1, tmp_path / "run")
    result = CliRunner().invoke(app, ["export", "--merge", str(run), "--full"])
    assert result.exit_code == 0, result.output
    assert "adapter fused" in result.output
    state = load_file(run / "export" / "model.safetensors")
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dtype == torch.float32

    bad = CliRunner().invoke(app, ["export", "--merge", str(tmp_path)])
    assert bad.exit_code == 1 and "run.json is missing" in bad.output
