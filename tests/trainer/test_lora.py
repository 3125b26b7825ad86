"""LoRA runs: the adapter files (diffusers and kohya), what run.json records, loading them with
diffusers' own loaders, resuming, serving with ``lora_scale``, and the architecture detection."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from test_serve import running, wait_ready  # the uvicorn-in-a-thread helpers of the serve tests
from typer.testing import CliRunner

from trainer.checkpoints import find_checkpoints
from trainer.cli import app
from trainer.config import RunRecord
from trainer.lora_files import KOHYA_WEIGHTS, LORA_DIR, LORA_WEIGHTS, kohya_state_dict
from trainer.run import detect_architecture, inspect_base_model

torch = pytest.importorskip("torch")

ADAPTER = Path(LORA_DIR) / LORA_WEIGHTS
PROMPT = "a photo of sks toy"


def _pipeline(base: Path, lora: Path | None = None, weight_name: str = LORA_WEIGHTS) -> Any:
    """diffusers' own loaders: the base pipeline, plus ``load_lora_weights`` of ``lora``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), weight_name=weight_name)
    return pipe


def _image(pipe: Any, **kwargs: Any) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)
    out = pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="np", **kwargs)
    return np.asarray(out.images[0])


def _adapter_state(pipe: Any) -> dict[str, Any]:
    """The adapter weights diffusers loaded into the UNet and the text encoder (PEFT's names)."""
    from peft.utils import get_peft_model_state_dict

    state = {}
    for part, model in (("unet", pipe.unet), ("te", pipe.text_encoder)):
        (name,) = model.peft_config  # the one adapter load_lora_weights added
        state |= {f"{part}.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    return state


@pytest.mark.slow
def test_a_lora_run_writes_the_adapter_and_records_how_it_was_made(lora_run: Path) -> None:
    record = json.loads((lora_run / "run.json").read_text(encoding="utf-8"))
    assert record["method"] == "lora" and record["architecture"] == "sd1"
    assert (record["lora_rank"], record["lora_alpha"], record["lora_dropout"]) == (4, 8, 0.0)
    assert record["lora_target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert record["train_text_encoder"] is True and record["learning_rate"] == 1e-3
    assert not (lora_run / "model").exists()  # no 2-7 GB pipeline for a LoRA run

    keys = list(load_file(lora_run / ADAPTER))
    assert keys and all(k.startswith(("unet.", "text_encoder.text_model.")) for k in keys)
    assert any(".attn2.to_out.0.lora.down.weight" in k for k in keys)
    assert any(".self_attn.q_proj." in k for k in keys)
    # A checkpoint holds the adapters, not the UNet: a few tens of kB here.
    ((_, checkpoint),) = find_checkpoints(lora_run / "checkpoints")
    assert sorted(p.name for p in checkpoint.glob("adapter_*.safetensors")) == [
        "adapter_0.safetensors",
        "adapter_1.safetensors",
    ]
    assert not list(checkpoint.glob("model*.safetensors"))
    assert len(list((lora_run / "samples").glob("sample-*.png"))) == 4


@pytest.mark.slow
def test_diffusers_loads_the_adapter_and_it_changes_the_image(lora_run: Path, tiny_sd1: Path) -> None:
    base = _image(_pipeline(tiny_sd1))
    with_lora = _pipeline(tiny_sd1, lora_run / LORA_DIR)
    image = _image(with_lora)
    assert np.abs(image - base).max() > 5e-3, "the trained adapter made no difference"
    # Scale 0 switches the adapter off: the base model's image again.
    np.testing.assert_allclose(_image(with_lora, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-5)


@pytest.mark.slow
def test_kohya_file_converts_back_with_diffusers_own_converter(lora_run: Path, tiny_sd1: Path) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    kohya = load_file(lora_run / LORA_DIR / KOHYA_WEIGHTS)
    names = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(names.match(k) for k in kohya), [k for k in kohya if not names.match(k)][:3]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in kohya
    alphas = [float(v) for k, v in kohya.items() if k.endswith(".alpha")]
    assert alphas and set(alphas) == {8.0}

    converted, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert len(converted) == len(load_file(lora_run / ADAPTER))  # every down/up weight, none left over
    assert set(network_alphas.values()) == {8.0}

    # Loaded by diffusers from either file: the same adapter tensors and the same image.
    from_diffusers = _pipeline(tiny_sd1, lora_run / LORA_DIR)
    from_kohya = _pipeline(tiny_sd1, lora_run / LORA_DIR, weight_name=KOHYA_WEIGHTS)
    a, b = _adapter_state(from_diffusers), _adapter_state(from_kohya)
    assert a.keys() == b.keys() and any(k.startswith("te.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    np.testing.assert_allclose(_image(from_kohya), _image(from_diffusers), atol=1e-5)


def test_kohya_names_for_sdxl_and_a_clear_error_for_foreign_keys() -> None:
    down, up = torch.ones(2, 8), torch.ones(8, 2)
    state = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": down,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.down.weight": down,
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.up.weight": up,
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.down.weight": down,
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.up.weight": up,
    }
    kohya = kohya_state_dict(state, architecture="sdxl", alphas={"unet": 1.0})
    assert float(kohya["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 1.0
    assert float(kohya["lora_te1_text_model_encoder_layers_0_self_attn_k_proj.alpha"]) == 2.0  # = rank
    assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight" in kohya
    with pytest.raises(ValueError, match="is not a diffusers LoRA weight"):
        kohya_state_dict({"unet.conv_in.weight": down}, architecture="sd1")


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_adapter_of_an_uninterrupted_run(
    lora_run: Path,
    tiny_sd1: Path,
    session_photos: Path,
    tmp_path: Path,
    run_args: Callable[..., list[str]],
    lora_options: dict[str, Any],
) -> None:
    class_dir = RunRecord.read(lora_run / "run.json").concepts[0].class_dir  # same data, nothing to make
    out = tmp_path / "run"
    args = run_args(
        tiny_sd1, session_photos, out, class_dir=class_dir, checkpointing_steps=1000, **lora_options
    )
    log = tmp_path / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "train", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 240
    while f"Training {10} steps" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    ((step, checkpoint),) = find_checkpoints(out / "checkpoints")
    assert 1 <= step < 10 and not (out / LORA_DIR).exists()

    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    assert f"Resuming from {checkpoint} (step {step} of {10})" in " ".join(result.output.split())
    a, b = load_file(lora_run / ADAPTER), load_file(out / ADAPTER)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted run by {worst}"


@pytest.mark.slow
def test_serve_a_lora_run_with_lora_scale(lora_run: Path, tiny_sd1: Path) -> None:
    from trainer.serve import create_app

    def png(url: str, **parameters: Any) -> bytes:
        body = {"inputs": PROMPT, "parameters": {"num_inference_steps": 2, "seed": 5, **parameters}}
        response = httpx.post(f"{url}/models/me/lora", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.content

    with running(create_app(tiny_sd1, model_id="me/lora", device="cpu", lora=lora_run / LORA_DIR)) as url:
        wait_ready(url)
        full, off, default = png(url, lora_scale=1.0), png(url, lora_scale=0.0), png(url)
        bad = httpx.post(f"{url}/models/me/lora", json={"inputs": "x", "parameters": {"lora_scale": -1}})
    assert full == default and full != off
    assert bad.status_code == 422 and "lora_scale" in bad.text
    with running(create_app(tiny_sd1, model_id="me/base", device="cpu")) as url:
        wait_ready(url)
        body = {"inputs": PROMPT, "parameters": {"num_inference_steps": 2, "seed": 5}}
        base = httpx.post(f"{url}/models/me/base", json=body, timeout=120)
        refused = httpx.post(f"{url}/models/me/base", json={"inputs": "x", "parameters": {"lora_scale": 1}})
    assert base.content == off  # scale 0 is the base model
    assert refused.status_code == 422 and "not a LoRA model" in refused.text


def test_architecture_is_detected_from_the_unet_config(tiny_sd1: Path, tiny_sd2: Path) -> None:
    assert inspect_base_model(str(tiny_sd1)).architecture == "sd1"
    info = inspect_base_model(str(tiny_sd2))
    assert info.architecture == "sd2" and info.describe() == "SD 2.x (v_prediction, 64 px)"
    sdxl_unet = {
        "addition_embed_type": "text_time",
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
    }
    assert detect_architecture(sdxl_unet) == "sdxl"
    assert detect_architecture({"cross_attention_dim": 768}) == "sd1"


def test_unknown_lora_target_modules_fail_with_the_fix(
    tiny_sd1: Path, photos: Path, tmp_path: Path, run_args: Callable[..., list[str]]
) -> None:
    args = run_args(tiny_sd1, photos, tmp_path / "out", method="lora", lora_target_modules="to_qq")
    result = CliRunner().invoke(app, ["train", *args, "--no-prior-preservation"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "--lora-target-modules to_qq" in text and "preset 'attention'" in text


def test_lora_adapter_metadata_is_in_the_file(lora_run: Path) -> None:
    with safe_open(str(lora_run / ADAPTER), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata is not None and "lora_adapter_metadata" in metadata
