"""SDXL runs on the tiny SDXL model: the conditioning the UNet gets (both encoders, the pooled
embedding, each photo's size and crop ids), LoRA and full fine-tunes end to end, resuming, the VAE's
precision, serving and ``export --merge``.

The shared SDXL LoRA run trains on photos of two shapes, so that the size and crop ids differ from
photo to photo: tall 80x96 ones (resized to 64x77, cropped 6 px from the top) and wide 120x70 ones
(resized to 110x64, cropped 23 px from the left). At 64 px SDXL's buckets (sides in multiples of
64) are the square alone; a run at 128 px trains in its tall and wide buckets.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hub_harness import WRITE_TOKEN, FakeHub
from PIL import Image
from safetensors.torch import load_file
from test_serve import running, wait_ready
from typer.testing import CliRunner

from conftest import CLASS_PROMPT, INSTANCE_PROMPT, LORA_OPTIONS, make_photos, run_args

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from trainer.cli import app  # noqa: E402
from trainer.config import RunRecord  # noqa: E402
from trainer.lora_files import KOHYA_WEIGHTS, LORA_DIR, LORA_WEIGHTS  # noqa: E402
from trainer.photos import crop_geometry, load_photo_with_geometry, prepare_image  # noqa: E402
from trainer.sample import read_png_text  # noqa: E402

# (original h, original w, crop top, crop left, target h, target w) of each photo shape at 64 px.
TALL_IDS = (96, 80, 6, 0, 64, 64)
WIDE_IDS = (70, 120, 0, 23, 64, 64)
CLASS_IDS = (64, 64, 0, 0, 64, 64)  # class images are generated at the training size
STEPS = 10


def _sdxl(base: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe: Any, seed: int = 3) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(INSTANCE_PROMPT, num_inference_steps=2, generator=generator, output_type="np")
    return np.asarray(out.images[0])


class UNetCalls:
    """Records what the UNet is given while it trains (calls under inference mode are left out)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from diffusers import UNet2DConditionModel

        original = UNet2DConditionModel.forward
        calls = self.calls

        def forward(unet: Any, sample: Any, timestep: Any, encoder_hidden_states: Any, **kwargs: Any) -> Any:
            if not torch.is_inference_mode_enabled():
                added = kwargs.get("added_cond_kwargs") or {}
                calls.append(
                    {
                        "time_ids": [tuple(int(v) for v in row) for row in added["time_ids"].tolist()],
                        "time_ids_dtype": added["time_ids"].dtype,
                        "text_embeds": tuple(added["text_embeds"].shape),
                        "hidden": tuple(encoder_hidden_states.shape),
                        "latents": tuple(sample.shape),
                    }
                )
            return original(unet, sample, timestep, encoder_hidden_states, **kwargs)

        monkeypatch.setattr(UNet2DConditionModel, "forward", forward)


def _fp16_safe_vae(base: Path, out: Path) -> Path:
    """The base model's VAE as a folder of its own whose config says it is safe in fp16."""
    shutil.copytree(base / "vae", out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    (out / "config.json").write_text(json.dumps({**config, "force_upcast": False}), encoding="utf-8")
    return out


def _mixed_photos(folder: Path) -> Path:
    """Two tall (80x96) and two wide (120x70) photos."""
    make_photos(folder, 2, size=(80, 96))
    wide = make_photos(folder.parent / f"{folder.name}-wide", 2, size=(120, 70), seed=1)
    for path in wide:
        path.rename(folder / f"wide-{path.name}")
    return folder


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise AssertionError(f"sdtrain {args[0]} failed ({result.exit_code}):\n{result.output}") from (
            result.exception
        )
    return result.output


@dataclass
class SdxlRun:
    """The shared SDXL LoRA run: its folder, what it printed, the UNet's training calls, its photos."""

    path: Path
    output: str
    calls: list[dict[str, Any]]
    photos: Path


@pytest.fixture(scope="module")
def sdxl_lora_run(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdxlRun]:
    """``sdtrain run --method lora --train-text-encoder`` on the tiny SDXL: 4 class images, 10 steps,
    samples and the kohya file, with every training call of the UNet recorded."""
    tmp = tmp_path_factory.mktemp("sdxl-lora")
    photos = _mixed_photos(tmp / "photos")
    calls = UNetCalls()
    with pytest.MonkeyPatch.context() as mp:
        calls.install(mp)
        output = _invoke(["run", *run_args(tiny_sdxl, photos, tmp / "run", **LORA_OPTIONS)])
    yield SdxlRun(tmp / "run", output, calls.calls, photos)


def test_crop_geometry_is_where_prepare_image_crops() -> None:
    assert crop_geometry(80, 96, 64).time_ids == TALL_IDS
    assert crop_geometry(120, 70, 64).time_ids == WIDE_IDS
    assert crop_geometry(64, 64, 64).time_ids == CLASS_IDS
    # The crop is exactly the one the geometry describes.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (70, 120, 3), dtype=np.uint8))
    geometry = crop_geometry(*image.size, 64)
    top, left = geometry.crop_top_left
    resized = image.resize(geometry.resized_size[::-1], Image.Resampling.LANCZOS)
    expected = np.asarray(resized)[top : top + 64, left : left + 64]
    np.testing.assert_array_equal(np.asarray(prepare_image(image, 64)), expected)


def test_photo_geometry_follows_exif_rotation(tmp_path: Path) -> None:
    image = Image.new("RGB", (120, 70), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the upright photo is 70 wide, 120 tall
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded, geometry = load_photo_with_geometry(tmp_path / "rotated.jpg", 64)
    assert loaded.size == (64, 64)
    assert geometry.time_ids == (120, 70, 23, 0, 64, 64)


def test_prompt_encoding_is_what_the_sdxl_pipeline_conditions_on(tiny_sdxl: Path) -> None:
    from trainer.train import _tokenize, encode_prompt

    pipe = _sdxl(tiny_sdxl)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(
            INSTANCE_PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        ids = [_tokenize(t, [INSTANCE_PROMPT]) for t in (pipe.tokenizer, pipe.tokenizer_2)]
        hidden, pooled = encode_prompt([pipe.text_encoder, pipe.text_encoder_2], ids)
    assert hidden.shape == (1, 77, 32 + 64)  # both encoders' features side by side
    assert pooled is not None and pooled.shape == (1, 64)
    torch.testing.assert_close(hidden, want, rtol=0, atol=0)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=0)


@pytest.mark.slow
def test_the_unet_gets_each_photos_size_and_crop_ids(sdxl_lora_run: SdxlRun) -> None:
    calls = sdxl_lora_run.calls
    assert len(calls) == STEPS
    for call in calls:
        # Batch 1 with prior preservation: the instance photo, then a class image.
        instance, prior = call["time_ids"]
        assert instance in (TALL_IDS, WIDE_IDS), instance
        assert prior == CLASS_IDS
        assert call["time_ids_dtype"] == torch.float32  # sizes such as 4032 are not exact in fp16
        assert call["text_embeds"] == (2, 64) and call["hidden"] == (2, 77, 96)
    # 4 photos, 10 steps: every photo was trained on, with its own ids.
    seen = [call["time_ids"][0] for call in calls]
    assert seen.count(TALL_IDS) >= 2 and seen.count(WIDE_IDS) >= 2


@pytest.mark.slow
def test_an_sdxl_lora_run_makes_every_part_of_the_run_folder(sdxl_lora_run: SdxlRun) -> None:
    run = sdxl_lora_run.path
    assert "Base model: SDXL (epsilon, 64 px)" in " ".join(sdxl_lora_run.output.split())
    record = RunRecord.read(run / "run.json")
    assert record.architecture == "sdxl" and record.resolution == 64 and record.method == "lora"
    assert len(list(record.concepts[0].class_dir.glob("*.png"))) == 4  # type: ignore[union-attr]
    class_text = read_png_text(next(record.concepts[0].class_dir.glob("*.png")))  # type: ignore[union-attr]
    assert class_text["prompt"] == CLASS_PROMPT

    keys = list(load_file(run / LORA_DIR / LORA_WEIGHTS))
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(run / LORA_DIR / KOHYA_WEIGHTS)
    assert {re.sub(r"_.*", "", k.removeprefix("lora_")) for k in kohya} == {"unet", "te1", "te2"}
    assert "lora_te2_text_model_encoder_layers_9_self_attn_q_proj.alpha" in kohya

    samples = sorted((run / "samples").glob("sample-*.png"))
    assert len(samples) == 4 and (run / "samples" / "grid.png").is_file()
    with Image.open(samples[0]) as image:
        assert image.size == (64, 64)
        assert np.asarray(image).std() > 0  # not a black (NaN) image
    assert read_png_text(samples[0])["prompt"] == "a photo of sks toy on a beach"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-8"]


@pytest.mark.slow
def test_diffusers_loads_the_sdxl_adapter_and_it_changes_the_image(
    sdxl_lora_run: SdxlRun, tiny_sdxl: Path
) -> None:
    base = _image(_sdxl(tiny_sdxl))
    with_lora = _sdxl(tiny_sdxl)
    with_lora.load_lora_weights(str(sdxl_lora_run.path / LORA_DIR), weight_name=LORA_WEIGHTS)
    image = _image(with_lora)
    assert np.abs(image - base).max() > 5e-3, "the trained adapter made no difference"
    # Both text encoders got their adapter.
    assert with_lora.text_encoder.peft_config and with_lora.text_encoder_2.peft_config

    from_kohya = _sdxl(tiny_sdxl)
    from_kohya.load_lora_weights(str(sdxl_lora_run.path / LORA_DIR), weight_name=KOHYA_WEIGHTS)
    np.testing.assert_allclose(_image(from_kohya), image, atol=1e-5)


@pytest.mark.slow
def test_a_resumed_sdxl_lora_run_ends_with_the_uninterrupted_adapter(
    sdxl_lora_run: SdxlRun, tiny_sdxl: Path, tmp_path: Path
) -> None:
    record = RunRecord.read(sdxl_lora_run.path / "run.json")
    out = tmp_path / "run"

    def args(steps: int) -> list[str]:
        options = {**LORA_OPTIONS, "max_train_steps": steps, "class_dir": record.concepts[0].class_dir}
        return run_args(tiny_sdxl, sdxl_lora_run.photos, out, **options)

    # Stop after 6 steps (a checkpoint at 4), then continue from the checkpoint to 10.
    _invoke(["train", *args(6)])
    output = _invoke(["train", *args(STEPS), "--resume", "latest"])
    assert "Resuming from" in output and "checkpoint-4 (step 4 of 10)" in " ".join(output.split())
    want = load_file(sdxl_lora_run.path / LORA_DIR / LORA_WEIGHTS)
    got = load_file(out / LORA_DIR / LORA_WEIGHTS)
    assert want.keys() == got.keys()
    worst = max(float((want[k] - got[k]).abs().max()) for k in want)
    assert worst <= 1e-6, f"the resumed adapter differs from the uninterrupted one by {worst}"


@pytest.mark.slow
def test_serve_an_sdxl_lora_run(sdxl_lora_run: SdxlRun) -> None:
    from trainer.loading import resolve_run_model
    from trainer.serve import create_app

    base, lora = resolve_run_model(sdxl_lora_run.path)  # what `sdtrain serve RUN` loads
    assert lora == sdxl_lora_run.path / LORA_DIR

    def png(url: str, **parameters: Any) -> bytes:
        body = {"inputs": INSTANCE_PROMPT, "parameters": {"num_inference_steps": 2, "seed": 5, **parameters}}
        response = httpx.post(f"{url}/models/me/sdxl", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.content

    with running(create_app(base, model_id="me/sdxl", device="cpu", lora=lora)) as url:
        health = wait_ready(url)
        full, off = png(url), png(url, lora_scale=0.0)
    assert health["state"] == "ready"
    assert full != off
    with Image.open(io.BytesIO(full)) as image:
        assert image.size == (64, 64)


@pytest.mark.slow
def test_serve_with_the_vae_a_run_trained_with(tiny_sdxl: Path, tmp_path: Path) -> None:
    from trainer.serve import create_app

    vae_dir = _fp16_safe_vae(tiny_sdxl, tmp_path / "vae-fp16-fix")
    app_ = create_app(tiny_sdxl, model_id="me/sdxl", device="cpu", vae=str(vae_dir))
    with running(app_) as url:
        wait_ready(url)
    assert app_.state.server.pipe.vae.config.force_upcast is False


@pytest.mark.slow
def test_export_merge_fuses_the_sdxl_adapter(sdxl_lora_run: SdxlRun, tiny_sdxl: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    run = tmp_path / "run"
    shutil.copytree(sdxl_lora_run.path, run)
    output = _invoke(["export", "--merge", str(run), "--full"])
    assert "adapter fused" in output
    path = run / "export" / "model.safetensors"
    assert infer_diffusers_model_type(load_file(path)) == "xl_base"

    merged = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tiny_sdxl), local_files_only=True
    )
    merged.set_progress_bar_config(disable=True)
    fused = _sdxl(tiny_sdxl)
    fused.load_lora_weights(str(run / LORA_DIR), weight_name=LORA_WEIGHTS)
    fused.fuse_lora()
    np.testing.assert_allclose(_image(merged), _image(fused), atol=1e-4)


@pytest.mark.slow
def test_a_full_sdxl_fine_tune_trains_both_text_encoders(
    sdxl_lora_run: SdxlRun, tiny_sdxl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = RunRecord.read(sdxl_lora_run.path / "run.json")
    out = tmp_path / "full"
    calls = UNetCalls()
    calls.install(monkeypatch)
    options = {
        "method": "full",
        "max_train_steps": 2,
        "train_text_encoder": True,
        "no_cache_latents": True,  # photos encoded every step: the ids come from that path too
        "num_samples": 1,
        "class_dir": record.concepts[0].class_dir,
    }
    _invoke(["run", *run_args(tiny_sdxl, sdxl_lora_run.photos, out, **options)])
    assert len(calls.calls) == 2
    assert all(
        c["time_ids"][0] in (TALL_IDS, WIDE_IDS) and c["time_ids"][1] == CLASS_IDS for c in calls.calls
    )

    index = json.loads((out / "model" / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    trained, base = _sdxl(out / "model"), _sdxl(tiny_sdxl)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        before, after = getattr(base, name).state_dict(), getattr(trained, name).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{name} was not trained"
    assert (out / "export" / "model.safetensors").is_file()
    assert (out / "model" / "tokenizer_2" / "vocab.json").is_file()
    # What samples and `sdtrain serve RUN` load for a full run: the SDXL pipeline in RUN/model.
    from diffusers import StableDiffusionXLPipeline

    from trainer.loading import load_run_pipeline

    assert isinstance(load_run_pipeline(out, device="cpu"), StableDiffusionXLPipeline)


@pytest.mark.slow
@pytest.mark.parametrize("fp16_safe_vae", [False, True])
def test_the_sdxl_vae_stays_in_fp32_unless_it_is_fp16_safe(
    sdxl_lora_run: SdxlRun,
    tiny_sdxl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fp16_safe_vae: bool,
) -> None:
    """bf16 training on the CPU stands in for fp16 on a GPU: the same rule decides the VAE's dtype."""
    from diffusers import AutoencoderKL

    record = RunRecord.read(sdxl_lora_run.path / "run.json")
    dtypes: list[Any] = []
    original = AutoencoderKL.encode

    def encode(vae: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        dtypes.append((x.dtype, vae.dtype))
        return original(vae, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    options: dict[str, Any] = {
        **LORA_OPTIONS,
        "max_train_steps": 1,
        "mixed_precision": "bf16",
        "class_dir": record.concepts[0].class_dir,
    }
    if fp16_safe_vae:
        options["vae"] = _fp16_safe_vae(tiny_sdxl, tmp_path / "vae-fp16-fix")
    from accelerate.state import AcceleratorState

    # accelerate keeps one mixed-precision setting per process: start and end with a fresh state.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        _invoke(["train", *run_args(tiny_sdxl, sdxl_lora_run.photos, tmp_path / "run", **options)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    want = torch.bfloat16 if fp16_safe_vae else torch.float32
    assert dtypes and all(d == (want, want) for d in dtypes), dtypes
    # Samples of the run (and `sdtrain sample RUN`) draw with the run's VAE.
    from trainer.loading import load_run_pipeline

    pipe = load_run_pipeline(tmp_path / "run", device="cpu")
    assert pipe.vae.config.force_upcast is (not fp16_safe_vae)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs a CUDA GPU")
def test_fp16_sdxl_training_and_sampling_give_no_nan(
    sdxl_lora_run: SdxlRun, tiny_sdxl: Path, tmp_path: Path
) -> None:
    from accelerate.state import AcceleratorState

    record = RunRecord.read(sdxl_lora_run.path / "run.json")
    options = {**LORA_OPTIONS, "mixed_precision": "fp16", "class_dir": record.concepts[0].class_dir}
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        output = _invoke(["run", *run_args(tiny_sdxl, sdxl_lora_run.photos, tmp_path / "run", **options)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "loss nan" not in output.lower()
    for sample in sorted((tmp_path / "run" / "samples").glob("sample-*.png")):
        with Image.open(sample) as image:
            assert np.asarray(image).std() > 0, f"{sample.name} is a blank (NaN) image"


def test_a_hub_id_is_loaded_with_the_class_its_index_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from diffusers import StableDiffusionXLPipeline

    from trainer.loading import _pipeline_class

    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}), encoding="utf-8")
    asked: list[tuple[str, str]] = []

    def download(repo_id: str, filename: str, **kwargs: Any) -> str:
        asked.append((repo_id, filename))
        return str(index)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert _pipeline_class("stabilityai/stable-diffusion-xl-base-1.0") is StableDiffusionXLPipeline
    assert asked == [("stabilityai/stable-diffusion-xl-base-1.0", "model_index.json")]

    def offline(repo_id: str, filename: str, **kwargs: Any) -> str:
        raise OSError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert _pipeline_class("someone/unknown") is None  # from_pretrained then reports the problem


def test_sdxl_base_trains_at_1024_px_by_default(tmp_path: Path) -> None:
    """The released SDXL base's configs (as ``tiny.py``'s full size writes them), no weights."""
    from trainer.run import inspect_base_model
    from trainer.tiny import _configs

    configs = _configs("sdxl", "full", 49408)
    classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
    for name, config in (("unet", configs.unet), ("vae", configs.vae), ("scheduler", configs.scheduler)):
        (tmp_path / name).mkdir()
        body = {"_class_name": classes.get(name), **config} if name in classes else config
        (tmp_path / name / ("scheduler_config.json" if name == "scheduler" else "config.json")).write_text(
            json.dumps(body), encoding="utf-8"
        )
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"}), encoding="utf-8"
    )
    info = inspect_base_model(str(tmp_path))
    assert (info.architecture, info.resolution, info.prediction_type) == ("sdxl", 1024, "epsilon")
    assert info.describe() == "SDXL (epsilon, 1024 px)"


@pytest.mark.slow
def test_sdtrain_serve_passes_a_lora_runs_vae(
    sdxl_lora_run: SdxlRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.serve

    run = tmp_path / "run"
    (run / LORA_DIR).mkdir(parents=True)
    shutil.copy(sdxl_lora_run.path / LORA_DIR / LORA_WEIGHTS, run / LORA_DIR / LORA_WEIGHTS)
    record = json.loads((sdxl_lora_run.path / "run.json").read_text(encoding="utf-8"))
    (run / "run.json").write_text(json.dumps({**record, "vae": "me/sdxl-vae-fp16-fix"}), encoding="utf-8")
    served: list[dict[str, Any]] = []

    def serve(model: str, **kwargs: Any) -> None:
        served.append({"model": model, **kwargs})

    monkeypatch.setattr(trainer.serve, "serve", serve)

    _invoke(["serve", str(run)])
    (call,) = served
    assert call["model"] == record["base_model"] and call["lora"] == run / LORA_DIR
    assert call["vae"] == "me/sdxl-vae-fp16-fix"


@pytest.mark.slow
def test_publish_an_sdxl_lora_as_an_adapter_that_loads_from_the_repo(
    sdxl_lora_run: SdxlRun, tiny_sdxl: Path, hub: FakeHub, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi, ModelCard

    from trainer.publish import publish_run

    run = shutil.copytree(sdxl_lora_run.path, tmp_path / "run")
    record = json.loads((run / "run.json").read_text())
    record["base_model"] = "stabilityai/stable-diffusion-xl-base-1.0"  # as a real run names its base
    (run / "run.json").write_text(json.dumps(record))

    publish_run(run, "me/xl-toy", token=WRITE_TOKEN, api=HfApi(endpoint=hub.url))

    files = hub.commits("me/xl-toy")[0]["files"]
    assert {"pytorch_lora_weights.safetensors", "xl-toy_kohya.safetensors", "README.md"} <= set(files)
    assert any(k.startswith("lora_te2_") for k in _safetensors_keys(files["xl-toy_kohya.safetensors"]))
    card = ModelCard(files["README.md"].decode())
    data = card.data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert data["base_model_relation"] == "adapter"
    assert {"lora", "stable-diffusion-xl", "text-to-image"} <= set(data["tags"])
    assert data["instance_prompt"] == INSTANCE_PROMPT
    assert "StableDiffusionXLPipeline.from_pretrained" in card.text

    repo = tmp_path / "repo"  # the repo as a download of it lays it out
    for path, content in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(content)
    pipe = _sdxl(tiny_sdxl)
    before = _draw(pipe)
    pipe.load_lora_weights(str(repo))
    assert not torch.equal(before, _draw(pipe)), "the published adapter changes the image"


def _safetensors_keys(data: bytes) -> list[str]:
    from safetensors.torch import load

    return list(load(data))


def _draw(pipe: Any) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    out = pipe(INSTANCE_PROMPT, num_inference_steps=2, generator=generator, output_type="pt")
    image: torch.Tensor = out.images[0]
    return image


# (original h, original w, crop top, crop left, target h, target w) at 128 px in buckets: a tall
# 128x200 photo in the 128x192 bucket (resized to 128x200, 4 px cut at the top), a wide one in
# 192x128, and the class images, one generated at each bucket's size, uncropped.
BUCKET_TALL_IDS = (200, 128, 4, 0, 192, 128)
BUCKET_WIDE_IDS = (128, 200, 0, 4, 128, 192)
CLASS_IN_TALL_IDS = (192, 128, 0, 0, 192, 128)
CLASS_IN_WIDE_IDS = (128, 192, 0, 0, 128, 192)


@pytest.mark.slow
def test_sdxl_trains_in_buckets_with_each_images_true_size_and_crop_ids(
    tiny_sdxl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, 1, size=(128, 200))
    (wide,) = make_photos(tmp_path / "wide", 1, size=(200, 128), seed=1)
    wide.rename(photos / "wide.jpg")
    calls = UNetCalls()
    calls.install(monkeypatch)
    options = {**LORA_OPTIONS, "resolution": 128, "max_train_steps": 2, "num_class_images": 2}
    output = _invoke(["train", *run_args(tiny_sdxl, photos, tmp_path / "run", **options)])
    assert "Aspect-ratio buckets: 1 photo at 128x192, 1 photo at 192x128" in " ".join(output.split())
    assert RunRecord.read(tmp_path / "run" / "run.json").aspect_buckets is True  # SDXL's default

    # The ids are those of the files' own preprocessing at their bucket.
    tall_photo = next(p for p in photos.iterdir() if p.name != "wide.jpg")
    assert load_photo_with_geometry(tall_photo, (192, 128))[1].time_ids == BUCKET_TALL_IDS
    class_sizes = []
    for class_image in sorted((tmp_path / "run" / "class_images").rglob("*.png")):
        with Image.open(class_image) as image:
            class_sizes.append(image.size)
    assert class_sizes == [(192, 128), (128, 192)]  # width x height: one per bucket, as the photos
    vae = json.loads((tiny_sdxl / "vae" / "config.json").read_text(encoding="utf-8"))
    scale = 2 ** (len(vae["block_out_channels"]) - 1)  # the tiny VAE's: 2 (SDXL's: 8)

    assert len(calls.calls) == 2
    seen = []
    for call in calls.calls:
        instance, prior = call["time_ids"]
        seen.append(instance)
        if instance == BUCKET_TALL_IDS:
            assert prior == CLASS_IN_TALL_IDS and call["latents"] == (2, 4, 192 // scale, 128 // scale)
        else:
            assert instance == BUCKET_WIDE_IDS, instance
            assert prior == CLASS_IN_WIDE_IDS and call["latents"] == (2, 4, 128 // scale, 192 // scale)
    assert sorted(seen) == sorted([BUCKET_TALL_IDS, BUCKET_WIDE_IDS])  # one epoch: each photo once
