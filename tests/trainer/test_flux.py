"""DreamBooth LoRA on the tiny FLUX.1-dev-architecture model: the flow-matching objective, a whole
``sdtrain run``, loading the adapter with diffusers' own loader, resuming, serving, prior preservation
and the options FLUX refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file
from test_serve import running, wait_ready
from typer.testing import CliRunner

from conftest import make_photos
from trainer.cli import app
from trainer.config import FLUX_ATTENTION_EXTRA, LORA_TARGET_PRESETS
from trainer.lora_files import KOHYA_WEIGHTS, LORA_DIR, LORA_WEIGHTS

torch = pytest.importorskip("torch")

ADAPTER = Path(LORA_DIR) / LORA_WEIGHTS
PROMPT = "a photo of sks toy"
STEPS = 4


# Prior preservation on (FLUX's default is off) with two quick class images of "a photo of a toy".
WITH_TWO_CLASS_IMAGES = [
    "--prior-preservation",
    "--class-prompt",
    "a photo of a toy",
    "--num-class-images",
    "2",
    "--class-image-steps",
    "2",
]


def flux_image(base: Path, lora_dir: Path | None = None) -> np.ndarray:
    """A 64 px, 2-step image of the tiny FLUX base (with the diffusers adapter in ``lora_dir``)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS)
    out = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.images[0])


def flux_args(base: Path, photos: Path, out: Path, *extra: str) -> list[str]:
    """A short LoRA run at 64 px without prior preservation (FLUX's own defaults otherwise)."""
    return [
        "--base-model",
        str(base),
        "--instance-dir",
        str(photos),
        "--instance-prompt",
        PROMPT,
        "--output",
        str(out),
        "--resolution",
        "64",
        "--max-train-steps",
        str(STEPS),
        "--learning-rate",
        "1e-2",  # the tiny transformer must visibly move in a few steps
        "--lora-rank",
        "4",
        "--no-prior-preservation",
        "--num-samples",
        "1",
        "--sample-steps",
        "2",
        "--seed",
        "3",
        *extra,
    ]


@pytest.fixture(scope="module")
def flux_run(tiny_flux: Path, flux_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flux-run") / "run"
    result = CliRunner().invoke(app, ["run", *flux_args(tiny_flux, flux_photos, out)])
    assert result.exit_code == 0, result.output
    return out


def test_flow_matching_mixes_toward_noise_and_targets_the_velocity() -> None:
    from trainer.train_flux import flow_matching_pair

    latents = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) / 10
    noise = torch.linspace(-1, 1, 2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    sigmas = torch.tensor([0.25, 1.0])
    noisy, target = flow_matching_pair(latents, noise, sigmas)
    for i, sigma in enumerate(sigmas.tolist()):
        pairs = zip(latents[i].flatten().tolist(), noise[i].flatten().tolist(), strict=True)
        expected = [(1 - sigma) * x + sigma * n for x, n in pairs]
        assert torch.allclose(noisy[i].flatten(), torch.tensor(expected))
    assert torch.allclose(target, noise - latents)
    # sigma 1 is pure noise; following the velocity for the whole way back gives the image.
    assert torch.allclose(noisy[1], noise[1])
    assert torch.allclose(noisy[1] - target[1], latents[1])


def test_noise_levels_come_from_the_unshifted_training_grid() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trainer.train_flux import noise_levels

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # FLUX.1-dev's
    timesteps, sigmas = noise_levels(scheduler, torch.tensor([0.0, 0.5, 0.9999]))
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.5, 0.001]), atol=1e-6)
    assert torch.allclose(timesteps, 1000 * sigmas)


def test_flux_loss_weights_the_class_half() -> None:
    from trainer.train_flux import flux_loss

    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    weighting = torch.ones(2, 1, 1, 1)
    plain = flux_loss(pred, target, weighting, prior_preservation=False)
    assert plain.item() == pytest.approx((1 + 4) / 2)
    prior = flux_loss(pred, target, weighting, prior_preservation=True, prior_loss_weight=0.5)
    assert prior.item() == pytest.approx(1 + 0.5 * 4)


@pytest.mark.slow
def test_a_flux_lora_run_trains_samples_and_loads_in_diffusers(flux_run: Path, tiny_flux: Path) -> None:

    record = json.loads((flux_run / "run.json").read_text(encoding="utf-8"))
    assert record["architecture"] == "flux" and record["prediction_type"] == "flow_matching"
    assert record["lora_target_modules"] == LORA_TARGET_PRESETS["attention"] + FLUX_ATTENTION_EXTRA
    assert record["sample_guidance_scale"] == 3.5 and record["flux_guidance"] == 3.5
    keys = list(load_file(flux_run / ADAPTER))
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".attn.add_q_proj." in k for k in keys) and any("single_transformer_blocks" in k for k in keys)
    assert len(list((flux_run / "samples").glob("sample-*.png"))) == 1
    kohya = load_file(flux_run / LORA_DIR / KOHYA_WEIGHTS)  # the ComfyUI / Forge twin, in BFL's names
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya

    base, adapted = flux_image(tiny_flux), flux_image(tiny_flux, flux_run / LORA_DIR)
    assert np.abs(base - adapted).max() > 1e-3, "the adapter does not change the image"


@pytest.mark.slow
def test_a_resumed_flux_run_ends_with_the_uninterrupted_adapter(
    flux_run: Path, tiny_flux: Path, flux_photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = flux_args(tiny_flux, flux_photos, out, "--checkpointing-steps", "2")
    first = CliRunner().invoke(app, ["train", *args])
    assert first.exit_code == 0, first.output
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    (out / ADAPTER).unlink()
    resumed = CliRunner().invoke(app, ["train", *args, "--resume", "latest"])
    assert resumed.exit_code == 0, resumed.output
    assert f"(step 2 of {STEPS})" in resumed.output
    a, b = load_file(flux_run / ADAPTER), load_file(out / ADAPTER)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted run by {worst}"


@pytest.mark.slow
def test_serve_answers_an_image_from_a_flux_lora_run(flux_run: Path) -> None:
    from trainer.loading import resolve_run_model
    from trainer.serve import create_app

    base, lora = resolve_run_model(flux_run)  # what `sdtrain serve RUN` serves: base + adapter
    assert lora == flux_run / LORA_DIR
    with running(create_app(base, model_id="me/flux-lora", device="cpu", lora=lora)) as url:
        wait_ready(url)
        body: dict[str, Any] = {
            "inputs": PROMPT,
            "parameters": {"num_inference_steps": 2, "seed": 1, "width": 64, "height": 64},
        }
        response = httpx.post(f"{url}/models/me/flux-lora", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("image/")


@pytest.mark.slow
def test_flux_with_prior_preservation_generates_and_trains_on_class_images(
    tiny_flux: Path, flux_photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = flux_args(tiny_flux, flux_photos, out, "--max-train-steps", "2")
    args.remove("--no-prior-preservation")
    args += WITH_TWO_CLASS_IMAGES
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    assert len(list((out / "class_images" / "a-photo-of-a-toy").glob("*.png"))) == 2
    assert (out / ADAPTER).is_file()


@pytest.mark.parametrize("option", [["--method", "full"], ["--method", "lora", "--train-text-encoder"]])
def test_flux_trains_a_transformer_lora_only(
    tiny_flux: Path, flux_photos: Path, tmp_path: Path, option: list[str]
) -> None:
    result = CliRunner().invoke(app, ["train", *flux_args(tiny_flux, flux_photos, tmp_path / "o"), *option])
    assert result.exit_code != 0
    assert "FLUX: LoRA on the transformer only" in " ".join(result.output.split())


@pytest.mark.slow
def test_publishing_a_flux_run(flux_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import huggingface_hub.constants

    from trainer.publish import planned_uploads

    run = tmp_path / "run"  # a copy: planning writes the kohya file beside the adapter
    shutil.copytree(flux_run, run, ignore=shutil.ignore_patterns("checkpoints", "class_images"))
    uploads = {name for _, name in planned_uploads(run, "me/flux-lora")}
    assert {LORA_WEIGHTS, "flux-lora_kohya.safetensors"} <= uploads
    kohya = load_file(run / LORA_DIR / KOHYA_WEIGHTS)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_single_blocks_0_linear1.alpha" in kohya

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    result = CliRunner().invoke(app, ["publish", str(run), "me/flux-lora"])
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "FLUX.1-dev's license is non-commercial" in output
    assert "No Hugging Face token found" in output


# -- aspect-ratio buckets ----------------------------------------------------------------------------


def _tall_and_wide(folder: Path) -> Path:
    """One tall (64x110) and one wide (110x64) photo: FLUX's 64 px buckets 48x80 and 80x48."""
    make_photos(folder, 1, size=(64, 110))
    (wide,) = make_photos(folder.parent / f"{folder.name}-wide", 1, size=(110, 64), seed=1)
    wide.rename(folder / "wide.jpg")
    return folder


class TransformerCalls:
    """Records what the transformer is given while it trains: the packed latents and their ids."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from diffusers import FluxTransformer2DModel

        original = FluxTransformer2DModel.forward
        calls = self.calls

        def forward(model: Any, *args: Any, **kwargs: Any) -> Any:
            ids = kwargs["img_ids"]
            calls.append(
                {
                    "packed": tuple(kwargs["hidden_states"].shape),
                    "rows": int(ids[:, 1].max()) + 1,
                    "columns": int(ids[:, 2].max()) + 1,
                }
            )
            return original(model, *args, **kwargs)

        monkeypatch.setattr(FluxTransformer2DModel, "forward", forward)


def _bucket_args(base: Path, photos: Path, out: Path, steps: int) -> list[str]:
    args = flux_args(base, photos, out, "--train-batch-size", "2", "--checkpointing-steps", "2")
    args[args.index("--max-train-steps") + 1] = str(steps)
    return args


@pytest.fixture(scope="module")
def flux_bucket_run(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``sdtrain train`` on a tall and a wide photo, batches of 2, buckets on (FLUX's default)."""
    tmp = tmp_path_factory.mktemp("flux-buckets")
    photos = _tall_and_wide(tmp / "photos")
    calls = TransformerCalls()
    with pytest.MonkeyPatch.context() as mp:
        calls.install(mp)
        result = CliRunner().invoke(app, ["train", *_bucket_args(tiny_flux, photos, tmp / "run", STEPS)])
    assert result.exit_code == 0, result.output
    return {"path": tmp / "run", "output": result.output, "calls": calls.calls, "photos": photos}


@pytest.mark.slow
def test_a_flux_run_trains_each_photo_in_its_bucket(flux_bucket_run: dict[str, Any], tiny_flux: Path) -> None:
    record = json.loads((flux_bucket_run["path"] / "run.json").read_text(encoding="utf-8"))
    assert record["aspect_buckets"] is True and record["train_batch_size"] == 2
    output = " ".join(flux_bucket_run["output"].split())
    assert "Aspect-ratio buckets: 1 photo at 48x80, 1 photo at 80x48 (width x height)" in output
    assert "at 64 px in aspect-ratio buckets" in output
    vae = json.loads((tiny_flux / "vae" / "config.json").read_text(encoding="utf-8"))
    scale = 2 ** (len(vae["block_out_channels"]) - 1)  # the tiny VAE's: 2 (FLUX.1-dev's: 8)
    # 2 x 2 latent patches of each bucket, as (rows, columns): tall 80 x 48 px, wide 48 x 80 px.
    tall, wide = (80 // scale // 2, 48 // scale // 2), (48 // scale // 2, 80 // scale // 2)
    calls = flux_bucket_run["calls"]
    assert len(calls) == STEPS
    shapes = [(call["rows"], call["columns"]) for call in calls]
    assert set(shapes) == {tall, wide}  # each epoch: one batch of each bucket
    for call, (rows, columns) in zip(calls, shapes, strict=True):
        batch, tokens, channels = call["packed"]
        assert batch == 2 and tokens == rows * columns and channels == 64  # 16 latent channels x 2 x 2
    assert (flux_bucket_run["path"] / ADAPTER).is_file()


@pytest.mark.slow
def test_a_resumed_flux_bucket_run_ends_with_the_uninterrupted_adapter(
    flux_bucket_run: dict[str, Any], tiny_flux: Path, tmp_path: Path
) -> None:
    out, photos = tmp_path / "run", flux_bucket_run["photos"]
    first = CliRunner().invoke(app, ["train", *_bucket_args(tiny_flux, photos, out, 3)])  # checkpoint at 2
    assert first.exit_code == 0, first.output
    resumed = CliRunner().invoke(
        app, ["train", *_bucket_args(tiny_flux, photos, out, STEPS), "--resume", "latest"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert f"(step 2 of {STEPS})" in resumed.output
    a, b = load_file(flux_bucket_run["path"] / ADAPTER), load_file(out / ADAPTER)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted run by {worst}"
    # Turning buckets off does not continue a checkpoint made with them.
    square = CliRunner().invoke(
        app, ["train", *_bucket_args(tiny_flux, photos, out, 6), "--no-aspect-buckets", "--resume", "latest"]
    )
    assert square.exit_code == 1
    assert "aspect_buckets: True -> None" in " ".join(square.output.split())
