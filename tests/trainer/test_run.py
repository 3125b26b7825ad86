"""The whole flow: photos -> class images -> training -> samples -> export -> publish -> serve."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open

from trainer.config import RunRecord, build_config
from trainer.errors import ConfigError, PhotoError
from trainer.loading import ModelLoadError, load_pipeline
from trainer.run import BaseModelInfo, base_model_license, inspect_base_model, prepare_run
from trainer.sample import read_png_text

SAMPLE_PROMPT = "a photo of sks toy on a beach"  # the shared run's (conftest)
pytestmark = pytest.mark.slow


def _image(pipe: object, seed: int = 3) -> np.ndarray:
    out = pipe(  # type: ignore[operator]
        SAMPLE_PROMPT,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    return np.asarray(out.images[0])


def test_run_writes_every_part_of_the_run_folder(trained_run_result: Any, tiny_sd1: Path) -> None:
    trained_run = trained_run_result.path
    for part in [
        "model/model_index.json",
        "model/unet/diffusion_pytorch_model.safetensors",
        "checkpoints/checkpoint-8/trainer_state.json",
        "samples/grid.png",
        "export/model.safetensors",
        "README.md",
        "run.json",
        *(f"samples/sample-{i:02d}.png" for i in range(4)),
        *(f"class_images/a-photo-of-a-toy/{i:05d}.png" for i in range(4)),
    ]:
        assert (trained_run / part).is_file(), part
    run = json.loads((trained_run / "run.json").read_text(encoding="utf-8"))
    assert run["base_model"] == str(tiny_sd1) and run["base_model_license"] is None
    assert run["resolution"] == 64  # unet.sample_size 32 x vae_scale_factor 2
    assert run["max_train_steps"] == 10 and run["prediction_type"] == "epsilon"
    assert run["mixed_precision"] == "no" and run["train_text_encoder"] is False
    assert run["with_prior_preservation"] is True and run["num_class_images"] == 4
    assert run["sample_prompt"] == SAMPLE_PROMPT and run["seed"] == 7 and run["learning_rate"] == 1e-4
    (concept,) = run["concepts"]
    assert concept["class_dir"] == str(trained_run / "class_images" / "a-photo-of-a-toy")
    assert run["num_instance_images"] == 4 and run["hub_repo"] == trained_run_result.hub_repo


def test_samples_carry_how_they_were_made(trained_run: Path) -> None:
    for i in range(4):
        text = read_png_text(trained_run / "samples" / f"sample-{i:02d}.png")
        assert text["prompt"] == SAMPLE_PROMPT and text["negative_prompt"] == ""
        assert text["seed"] == str(7 + i) and text["steps"] == "2" and text["guidance_scale"] == "7.5"
        assert json.loads(text["parameters"])["seed"] == 7 + i
    from PIL import Image

    with Image.open(trained_run / "samples" / "grid.png") as grid:
        assert grid.size == (128, 128)  # 2 x 2 samples of 64 px


def test_the_model_and_its_single_file_load_and_draw_alike(trained_run: Path) -> None:
    folder = load_pipeline(trained_run / "model", device="cpu")
    single = load_pipeline(
        trained_run / "export" / "model.safetensors", device="cpu", config=trained_run / "model"
    )
    with safe_open(str(trained_run / "export" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # --export-half by default
    a, b = _image(folder), _image(single)
    assert a.shape == (64, 64, 3)
    assert np.abs(a - b).mean() < 0.02  # fp16 weights: the same picture within rounding


def test_published_to_the_hub_with_the_token_kept_secret(trained_run_result: Any) -> None:
    hub, out = trained_run_result.hub, trained_run_result.path
    repo, token = trained_run_result.hub_repo, trained_run_result.token
    ((created,),) = [hub.created]
    assert created["repo_id"] == repo and created["private"] is True
    (commit,) = hub.commits
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md"} <= set(
        commit["paths"]
    )
    assert any(p.endswith(".safetensors") and "/" not in p for p in commit["paths"])  # the single file
    assert "samples/sample-00.png" in commit["paths"]
    assert f"Hub: https://huggingface.co/{repo}" in trained_run_result.output
    # The token reached the Hub client and nothing else: not the output, not a single file.
    assert created["token"] == token
    assert token not in trained_run_result.output
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning")
def test_inspect_base_model(tiny_sd1: Path, tiny_sd2: Path, tmp_path: Path) -> None:
    sd1, sd2 = inspect_base_model(str(tiny_sd1)), inspect_base_model(str(tiny_sd2))
    assert (sd1.resolution, sd1.prediction_type) == (64, "epsilon")
    assert (sd2.resolution, sd2.prediction_type) == (64, "v_prediction")
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        inspect_base_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a Hub id"):
        inspect_base_model("no-such-folder")
    with pytest.raises(ModelLoadError, match="Could not read the configuration of nobody/nothing"):
        inspect_base_model("nobody/nothing")  # HF_HUB_OFFLINE in tests: not in the cache


def test_base_model_license_from_the_model_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [x]\n---\n# Model\n")
    assert base_model_license(str(tmp_path)) == "creativeml-openrail-m"
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert base_model_license(str(tmp_path)) is None
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert base_model_license("stable-diffusion-v1-5/stable-diffusion-v1-5") is None  # offline: unknown


def test_default_steps_and_the_overfitting_warning(
    tiny_sd1: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = {
        "base_model": str(tiny_sd1),
        "instance_dir": photos,
        "instance_prompt": "x",
        "class_prompt": "y",
        "output_dir": tmp_path,
    }
    record = prepare_run(build_config(**options)).record
    assert record.max_train_steps == 500  # 4 photos: 100 each + 100 under 10 photos
    assert record.resolution == 64 and record.sample_prompt == "x" and record.sample_seed == record.seed
    assert "over-fit" not in capsys.readouterr().err
    prepare_run(build_config(**options, max_train_steps=2500))
    assert "2500 training steps is a lot: above 2000 DreamBooth tends to over-fit" in capsys.readouterr().err
    (photos / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(PhotoError, match="bad.jpg: not an image"):
        prepare_run(build_config(**options))


@pytest.mark.parametrize(
    ("architecture", "flag", "expected"),
    [
        ("sd1", None, True),
        ("sdxl", None, True),
        ("flux", None, False),
        ("flux", True, True),
        ("sd1", False, False),
    ],
)
def test_prior_preservation_is_decided_per_base(
    photos: Path, tmp_path: Path, architecture: str, flag: bool | None, expected: bool
) -> None:
    # On by default, as DreamBooth has it; off for FLUX (its trainers skip the class images).
    options: dict[str, Any] = {"base_model": "base", "instance_dir": photos, "instance_prompt": "x"}
    config = build_config(**options, class_prompt="y", output_dir=tmp_path, with_prior_preservation=flag)
    prediction = "flow_matching" if architecture == "flux" else "epsilon"
    info = BaseModelInfo(64, prediction, None, architecture)  # type: ignore[arg-type]
    record = prepare_run(config, info=info).record
    assert record.with_prior_preservation is expected
    assert record.max_train_steps == (1000 if architecture == "flux" else 500)  # 4 photos
    assert (record.concepts[0].class_dir is not None) is expected
    assert RunRecord.read(record.write(tmp_path / "run.json")).with_prior_preservation is expected


def test_prior_preservation_by_default_needs_a_class_prompt(photos: Path, tmp_path: Path) -> None:
    config = build_config(base_model="base", instance_dir=photos, instance_prompt="x", output_dir=tmp_path)
    flux = BaseModelInfo(64, "flow_matching", None, "flux")
    assert prepare_run(config, info=flux).record.with_prior_preservation is False
    with pytest.raises(ConfigError, match=r"concepts\[0\].class_prompt is required with prior preservation"):
        prepare_run(config, info=BaseModelInfo(64, "epsilon", None, "sd1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_the_trained_model_to_sdclient(trained_run: Path, tmp_path: Path) -> None:
    from sdclient import SDClient

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    env.pop("HF_TOKEN", None)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as sink:  # a file, not a pipe: a full pipe would block the server
        server = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "trainer.cli", "serve", str(trained_run)],
            *["--port", str(port), "--model-id", "test/sks-toy"],
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )

    def log() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + 120
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:  # until the socket answers (503 while the model loads is fine: SDClient waits)
                if server.returncode is not None or time.monotonic() > deadline:
                    pytest.fail(f"sdtrain serve did not start:\n{log()}")
                try:
                    await http.get(f"http://127.0.0.1:{port}/health")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
        url = f"http://127.0.0.1:{port}/models/test/sks-toy"
        async with SDClient(url, max_wait_for_model=120) as client:
            image = await client.generate(SAMPLE_PROMPT, num_inference_steps=2, seed=11, width=64, height=64)
        assert "test/sks-toy" in log()
        assert (image.width, image.height) == (64, 64)
        assert image.request.seed == 11
        assert image.to_pil().size == (64, 64)
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(server.wait(), timeout=30)
            except TimeoutError:
                server.kill()
                await server.wait()
