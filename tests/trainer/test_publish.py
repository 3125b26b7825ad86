"""Publishing against a fake Hub over real HTTP: one commit, the card, what is (not) uploaded, tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from hub_harness import READ_TOKEN, WRITE_TOKEN, FakeHub  # noqa: E402
from huggingface_hub import HfApi, ModelCard  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402

from trainer.export import export_single_file  # noqa: E402
from trainer.lora_files import KOHYA_WEIGHTS, LORA_WEIGHTS  # noqa: E402
from trainer.publish import LICENSE_SD1, LICENSE_SD2, PublishError, publish_run  # noqa: E402

SAMPLE_PROMPT = "a photo of sks toy on a beach"


@pytest.fixture
def no_saved_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


def _sample(path: Path, prompt: str, seed: int) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(seed))
    Image.new("RGB", (64, 64), (seed * 40 % 255, 90, 120)).save(path, pnginfo=info)


def _lora_run(run: Path, **record: str) -> Path:
    """A LoRA run folder with only what a card reads: run.json (``record`` added) and one sample."""
    (run / "samples").mkdir(parents=True)
    _sample(run / "samples" / "sample-00.png", "a photo of sks toy in snow", 1)
    fields = {
        "method": "lora",
        "concepts": [{"instance_prompt": "a photo of sks toy"}],
        "lora_rank": 16,
        "lora_alpha": 16,
        "sample_prompt": "a photo of sks toy in snow",
        **record,
    }
    (run / "run.json").write_text(json.dumps(fields))
    return run


def make_run(
    base: Path, run: Path, *, license: str | None = "creativeml-openrail-m", variant: str = "sd1"
) -> Path:
    """A finished run folder as `sdtrain run` lays it out (model, export, samples, checkpoints)."""
    shutil.copytree(base, run / "model")
    export_single_file(run / "model", run / "export" / "model.safetensors", half=True)
    (run / "samples").mkdir()
    for i in range(2):
        _sample(run / "samples" / f"sample-{i}.png", SAMPLE_PROMPT, i)
    _sample(run / "samples" / "grid.png", SAMPLE_PROMPT, 9)
    (run / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-10" / "optimizer.bin").write_bytes(b"\0" * 64)
    (run / "class_images").mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"
                if variant == "sd1"
                else str(base),
                "base_model_license": license,
                "concepts": [
                    {
                        "instance_prompt": "a photo of sks toy",
                        "class_prompt": "a photo of a toy",
                        "instance_dir": "/home/someone/photos",
                        "class_dir": str(run / "class_images"),
                    }
                ],
                "resolution": 64,
                "max_train_steps": 10,
                "train_text_encoder": True,
                "learning_rate": 1e-4,
                "seed": 7,
                "prediction_type": "epsilon" if variant == "sd1" else "v_prediction",
                "sample_prompt": SAMPLE_PROMPT,
                "mixed_precision": "no",
                "with_prior_preservation": True,
                "num_class_images": 4,
            }
        )
    )
    return run


@pytest.fixture
def run_dir(tiny_sd1: Path, tmp_path: Path) -> Path:
    return make_run(tiny_sd1, tmp_path / "run")


def test_one_private_commit_with_the_model_card(hub: FakeHub, run_dir: Path) -> None:
    api = HfApi(endpoint=hub.url)

    url = publish_run(run_dir, "me/sd-toy", token=WRITE_TOKEN, api=api)

    assert url == f"{hub.url}/me/sd-toy"
    assert hub.repos["me/sd-toy"]["private"] is True
    (commit,) = hub.commits("me/sd-toy")
    files = commit["files"]
    model_files = {
        p.relative_to(run_dir / "model").as_posix() for p in (run_dir / "model").rglob("*") if p.is_file()
    }
    assert model_files | {"sd-toy.safetensors", "README.md"} | {
        "samples/sample-0.png",
        "samples/sample-1.png",
        "samples/grid.png",
    } == set(files)
    assert (
        files["unet/diffusion_pytorch_model.safetensors"]
        == (run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert files["sd-toy.safetensors"] == (run_dir / "export" / "model.safetensors").read_bytes()
    assert not any(p.startswith(("checkpoints", "class_images")) or p == "run.json" for p in files)
    # The card that went up is the one written beside the run.
    assert files["README.md"] == (run_dir / "README.md").read_bytes()


def test_card_metadata_and_body(hub: FakeHub, run_dir: Path) -> None:
    publish_run(run_dir, "me/sd-toy", token=WRITE_TOKEN, api=HfApi(endpoint=hub.url))

    card = ModelCard.load(run_dir / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "text-to-image"
    assert data["library_name"] == "diffusers"
    assert data["license"] == "creativeml-openrail-m"
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["instance_prompt"] == "a photo of sks toy"
    assert {
        "stable-diffusion",
        "stable-diffusion-diffusers",
        "text-to-image",
        "diffusers",
        "dreambooth",
    } <= set(data["tags"])
    assert data["widget"] == [{"text": SAMPLE_PROMPT, "output": {"url": "samples/sample-0.png"}}]
    text = card.text
    assert "![sample-0](samples/sample-0.png)" in text and "![sample-1](samples/sample-1.png)" in text
    assert "| steps | 10 |" in text and "4 class images of `a photo of a toy`" in text
    assert 'StableDiffusionPipeline.from_pretrained("me/sd-toy"' in text
    assert "from sdclient import SDClient" in text and "sd-toy.safetensors" in text
    assert "/home/someone/photos" not in text


def test_license_falls_back_to_the_architecture(
    hub: FakeHub, tiny_sd1: Path, tiny_sd2: Path, tmp_path: Path
) -> None:
    sd1 = make_run(tiny_sd1, tmp_path / "sd1", license=None)
    sd2 = make_run(tiny_sd2, tmp_path / "sd2", license=None, variant="sd2")
    api = HfApi(endpoint=hub.url)

    publish_run(sd1, "me/one", token=WRITE_TOKEN, api=api)
    publish_run(sd2, "me/two", token=WRITE_TOKEN, api=api)

    card1, card2 = ModelCard.load(sd1 / "README.md"), ModelCard.load(sd2 / "README.md")
    assert card1.data.license == LICENSE_SD1 and card2.data.license == LICENSE_SD2
    assert "inferred from the architecture" in card2.text
    # A local base model is not a Hub id: no base_model metadata (the Hub would reject it).
    assert card2.data.to_dict().get("base_model") is None


def test_public_and_existing_repos(hub: FakeHub, run_dir: Path) -> None:
    api = HfApi(endpoint=hub.url)

    publish_run(run_dir, "me/public", private=False, token=WRITE_TOKEN, api=api)
    publish_run(run_dir, "me/public", token=WRITE_TOKEN, api=api)  # exists: a second commit

    assert hub.repos["me/public"]["private"] is False
    assert len(hub.commits("me/public")) == 2


def test_token_from_the_environment_is_never_written(
    hub: FakeHub, run_dir: Path, monkeypatch: pytest.MonkeyPatch, no_saved_token: None
) -> None:
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)

    publish_run(run_dir, "me/sd-toy")  # the default HfApi()

    assert {token for _, _, token in hub.requests if token} == {WRITE_TOKEN}, "found through get_token()"
    sentinel = b"SENTINEL"
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert sentinel not in path.read_bytes(), path
    for content in hub.commits("me/sd-toy")[0]["files"].values():
        assert sentinel not in content


def test_missing_token(hub: FakeHub, run_dir: Path, no_saved_token: None) -> None:
    with pytest.raises(PublishError, match=r"run `hf auth login` or set HF_TOKEN"):
        publish_run(run_dir, "me/sd-toy", api=HfApi(endpoint=hub.url))
    assert hub.requests == []


def test_read_only_token_new_repo(hub: FakeHub, run_dir: Path) -> None:
    with pytest.raises(PublishError, match="this token can't write") as info:
        publish_run(run_dir, "me/sd-toy", token=READ_TOKEN, api=HfApi(endpoint=hub.url))
    assert "https://huggingface.co/settings/tokens" in str(info.value)
    assert READ_TOKEN not in str(info.value)
    assert "me/sd-toy" not in hub.repos


def test_read_only_token_existing_repo(hub: FakeHub, run_dir: Path) -> None:
    hub.repos["me/sd-toy"] = {"private": True, "commits": []}

    # create_repo(exist_ok=True) accepts the existing repo; the commit is what gets refused.
    with pytest.raises(PublishError, match="this token can't write"):
        publish_run(run_dir, "me/sd-toy", token=READ_TOKEN, api=HfApi(endpoint=hub.url))
    assert hub.commits("me/sd-toy") == []


def test_invalid_token(hub: FakeHub, run_dir: Path) -> None:
    with pytest.raises(PublishError, match=r"rejected the token \(401\)") as info:
        publish_run(run_dir, "me/sd-toy", token="hf_not_a_real_token", api=HfApi(endpoint=hub.url))
    assert "hf_not_a_real_token" not in str(info.value)


def test_incomplete_runs_and_bad_repo_ids(hub: FakeHub, tmp_path: Path, run_dir: Path) -> None:
    api = HfApi(endpoint=hub.url)
    with pytest.raises(PublishError, match="model_index.json"):
        publish_run(tmp_path / "empty", "me/x", token=WRITE_TOKEN, api=api)
    with pytest.raises(PublishError, match="Invalid repo id"):
        publish_run(run_dir, "me/x/y", token=WRITE_TOKEN, api=api)
    (run_dir / "run.json").unlink()
    with pytest.raises(PublishError, match="run.json is missing"):
        publish_run(run_dir, "me/x", token=WRITE_TOKEN, api=api)
    assert hub.repos == {}


@pytest.mark.slow
def test_publishes_a_real_training_run(hub: FakeHub, trained_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(trained_run, tmp_path / "run")  # the shared run must stay untouched

    url = publish_run(run, "me/trained", token=WRITE_TOKEN, api=HfApi(endpoint=hub.url))

    assert url.endswith("/me/trained")
    files = hub.commits("me/trained")[0]["files"]
    assert "model_index.json" in files and "trained.safetensors" in files and "README.md" in files
    assert any(p.startswith("samples/") for p in files)
    assert not any(p.startswith(("checkpoints/", "class_images/")) for p in files)
    card = ModelCard.load(run / "README.md")
    assert card.data.pipeline_tag == "text-to-image"
    assert (
        card.data.to_dict()["instance_prompt"]
        == json.loads((run / "run.json").read_text())["concepts"][0]["instance_prompt"]
    )
    assert card.data.to_dict()["widget"][0]["output"]["url"] in files


# -- LoRA runs --------------------------------------------------------------------------------------

HUB_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture
def lora_run_dir(lora_run: Path, tmp_path: Path) -> Path:
    """A copy of the shared LoRA run whose run.json names a Hub base (the tiny base is local)."""
    run = shutil.copytree(lora_run, tmp_path / "lora-run")
    record = json.loads((run / "run.json").read_text())
    record["base_model"] = HUB_BASE
    (run / "run.json").write_text(json.dumps(record))
    return run


def test_lora_run_is_published_as_an_adapter(hub: FakeHub, lora_run_dir: Path) -> None:
    publish_run(lora_run_dir, "me/sks-lora", token=WRITE_TOKEN, api=HfApi(endpoint=hub.url))

    (commit,) = hub.commits("me/sks-lora")
    files = commit["files"]
    samples = sorted(p.name for p in (lora_run_dir / "samples").glob("*.png"))
    assert set(files) == {
        "pytorch_lora_weights.safetensors",
        "sks-lora_kohya.safetensors",
        "README.md",
        *(f"samples/{name}" for name in samples),
    }
    lora = lora_run_dir / "lora"
    assert files["pytorch_lora_weights.safetensors"] == (lora / LORA_WEIGHTS).read_bytes()
    assert files["sks-lora_kohya.safetensors"] == (lora / KOHYA_WEIGHTS).read_bytes()
    assert "adapter" in commit["message"].lower()


def test_lora_card_metadata(hub: FakeHub, lora_run_dir: Path) -> None:
    publish_run(lora_run_dir, "me/sks-lora", token=WRITE_TOKEN, api=HfApi(endpoint=hub.url))

    readme = hub.commits("me/sks-lora")[0]["files"]["README.md"].decode()
    card = ModelCard(readme)  # parse what the Hub received
    data = card.data.to_dict()
    record = json.loads((lora_run_dir / "run.json").read_text())
    assert data["base_model"] == HUB_BASE
    assert data["base_model_relation"] == "adapter"
    assert {"lora", "text-to-image", "diffusers", "template:sd-lora", "stable-diffusion"} <= set(data["tags"])
    assert data["pipeline_tag"] == "text-to-image"
    assert data["library_name"] == "diffusers"
    assert data["license"] == "creativeml-openrail-m"
    assert data["instance_prompt"] == record["concepts"][0]["instance_prompt"]
    samples = sorted(p.name for p in (lora_run_dir / "samples").glob("*.png") if p.stem != "grid")
    assert samples, "the shared LoRA run has samples"
    assert data["widget"] == [
        {"text": record["sample_prompt"], "output": {"url": f"samples/{name}"}} for name in samples
    ]
    files = hub.commits("me/sks-lora")[0]["files"]
    assert all(entry["output"]["url"] in files for entry in data["widget"])
    text = card.text
    assert f'from_pretrained("{HUB_BASE}"' in text and 'pipe.load_lora_weights("me/sks-lora")' in text
    assert 'InferenceClient(provider="fal-ai")' in text and 'model="me/sks-lora"' in text
    assert 'SDClient("me/sks-lora")' in text
    assert "`sks-lora_kohya.safetensors` | AUTOMATIC1111, ComfyUI" in text
    assert f"| LoRA rank | {record['lora_rank']} |" in text
    assert f"| LoRA alpha | {record['lora_alpha']} |" in text
    assert str(lora_run_dir) not in text


def test_lora_run_with_a_local_base_and_no_kohya_file(
    hub: FakeHub, lora_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = shutil.copytree(lora_run, tmp_path / "run")
    (run / "lora" / "pytorch_lora_weights_kohya.safetensors").unlink()
    export = run / "export"
    export.mkdir(exist_ok=True)
    (export / "model.safetensors").write_bytes(b"merged")  # as `sdtrain export --merge` leaves it

    publish_run(run, "me/local", token=WRITE_TOKEN, api=HfApi(endpoint=hub.url))

    files = hub.commits("me/local")[0]["files"]
    assert (run / "lora" / "pytorch_lora_weights_kohya.safetensors").is_file(), "written again"
    assert "local_kohya.safetensors" in files and "local.safetensors" not in files
    data = ModelCard(files["README.md"].decode()).data.to_dict()
    # A local base is no Hub id: neither base_model nor a relation (the Hub would reject them).
    assert data.get("base_model") is None and data.get("base_model_relation") is None
    assert "not a Hub id" in caplog.text


def test_published_adapter_loads_with_load_lora_weights(
    hub: FakeHub, lora_run_dir: Path, tiny_sd1: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    publish_run(lora_run_dir, "me/sks-lora", token=WRITE_TOKEN, api=HfApi(endpoint=hub.url))
    repo = tmp_path / "repo"  # the repo as a download of it would lay it out
    for path, content in hub.commits("me/sks-lora")[0]["files"].items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(content)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(repo))  # no weight_name: the root file is found by its standard name
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the adapter moved the UNet's weights"


def test_an_sd2_single_file_goes_up_with_its_yaml(hub: FakeHub, tiny_sd2: Path, tmp_path: Path) -> None:
    run = make_run(tiny_sd2, tmp_path / "sd2", variant="sd2")
    assert (run / "export" / "model.yaml").is_file()

    publish_run(run, "me/two", token=WRITE_TOKEN, api=HfApi(endpoint=hub.url))

    files = hub.commits("me/two")[0]["files"]
    assert files["two.yaml"] == (run / "export" / "model.yaml").read_bytes()
    assert "two.safetensors" in files
    text = ModelCard(files["README.md"].decode()).text
    assert "Download `two.yaml` too and keep it beside `two.safetensors`" in text


def test_the_publish_command_uploads_a_lora_run(
    hub: FakeHub, lora_run_dir: Path, monkeypatch: pytest.MonkeyPatch, no_saved_token: None
) -> None:
    from typer.testing import CliRunner

    from trainer.cli import app

    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    result = CliRunner().invoke(app, ["publish", str(lora_run_dir), "me/cli-lora", "--public"])

    assert result.exit_code == 0, result.output
    assert hub.repos["me/cli-lora"]["private"] is False
    files = hub.commits("me/cli-lora")[0]["files"]
    assert {"pytorch_lora_weights.safetensors", "cli-lora_kohya.safetensors", "README.md"} <= set(files)
    assert not any(p.startswith(("unet/", "lora/", "checkpoints/")) for p in files)


def test_an_sdxl_lora_card(tmp_path: Path) -> None:
    """The card of an SDXL LoRA (no training needed: the card reads run.json and the samples)."""
    from trainer.publish import build_model_card

    run = _lora_run(
        tmp_path / "xl", architecture="sdxl", base_model="stabilityai/stable-diffusion-xl-base-1.0"
    )

    card = build_model_card(run, "me/xl-toy")

    data = card.data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert data["base_model_relation"] == "adapter"
    assert {"lora", "stable-diffusion-xl", "stable-diffusion-xl-diffusers"} <= set(data["tags"])
    assert "stable-diffusion" not in data["tags"]
    assert data["license"] == LICENSE_SD2  # SDXL's CreativeML Open RAIL++-M, as SD 2.x
    assert data["widget"] == [
        {"text": "a photo of sks toy in snow", "output": {"url": "samples/sample-00.png"}}
    ]
    assert "StableDiffusionXLPipeline.from_pretrained" in card.text
    assert "providers such as fal-ai pick up LoRAs of the bases they host" in card.text


def test_a_flux_lora_card(tmp_path: Path) -> None:
    """A FLUX.1-dev LoRA's card: FLUX.1-dev's non-commercial license, FluxPipeline, fal-ai."""
    from trainer.publish import FLUX_DEV, FLUX_DEV_LICENSE_LINK, FLUX_DEV_LICENSE_NAME, build_model_card

    # "other": what FLUX.1-dev's card says.
    run = _lora_run(tmp_path / "flux", architecture="flux", base_model=FLUX_DEV, base_model_license="other")

    card = build_model_card(run, "me/flux-toy")

    reloaded = ModelCard(str(card))
    data = reloaded.data.to_dict()
    assert data["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert data["base_model_relation"] == "adapter"
    assert {"lora", "flux", "diffusers", "template:sd-lora", "text-to-image"} <= set(data["tags"])
    assert "stable-diffusion" not in data["tags"]
    assert data["license"] == "other"
    assert data["license_name"] == FLUX_DEV_LICENSE_NAME == "flux-1-dev-non-commercial-license"
    assert data["license_link"] == FLUX_DEV_LICENSE_LINK
    assert FLUX_DEV_LICENSE_LINK == "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"
    assert data["instance_prompt"] == "a photo of sks toy"
    assert data["widget"] == [
        {"text": "a photo of sks toy in snow", "output": {"url": "samples/sample-00.png"}}
    ]
    text = reloaded.text
    assert "**Non-commercial.**" in text and "non-commercial use only" in text
    assert 'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)' in text
    assert 'pipe.load_lora_weights("me/flux-toy")' in text
    assert "fal-ai/flux-lora" in text and 'InferenceClient(provider="fal-ai")' in text
    assert 'SDClient("me/flux-toy")' in text
    assert "me_flux-toy_kohya" not in text and "flux-toy_kohya.safetensors" in text
    assert "StableDiffusion" not in text and "AUTOMATIC1111" not in text


def test_a_flux_lora_card_of_a_local_base(tmp_path: Path) -> None:
    from trainer.publish import build_model_card

    run = tmp_path / "flux"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "method": "lora",
                "architecture": "flux",
                "base_model": str(tmp_path),  # a local copy: no base_model in the metadata
                "concepts": [{"instance_prompt": "a photo of sks toy"}],
            }
        )
    )
    card = build_model_card(run, "me/flux-toy")
    data = card.data.to_dict()
    assert "base_model" not in data
    assert data["license"] == "other" and data["license_name"] == "flux-1-dev-non-commercial-license"
    assert 'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev"' in card.text


def test_publishes_a_flux_lora_run_with_its_comfyui_file(hub: FakeHub, tmp_path: Path) -> None:
    from test_flux_lora_files import make_flux_lora

    from trainer.publish import FLUX_DEV
    from trainer.tiny import build_tiny_pipeline

    base = build_tiny_pipeline(tmp_path / "base", variant="flux")
    run = tmp_path / "run"
    make_flux_lora(base, run, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    (run / "run.json").write_text(
        json.dumps(
            {
                "method": "lora",
                "architecture": "flux",
                "base_model": FLUX_DEV,
                "concepts": [{"instance_prompt": "a photo of sks toy"}],
            }
        )
    )
    publish_run(run, "me/flux-toy", token=WRITE_TOKEN, api=HfApi(endpoint=hub.url))

    files = hub.commits("me/flux-toy")[0]["files"]
    assert {"pytorch_lora_weights.safetensors", "flux-toy_kohya.safetensors", "README.md"} <= set(files)
    from safetensors.torch import load

    kohya = load(files["flux-toy_kohya.safetensors"])
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya
    assert "license_name: flux-1-dev-non-commercial-license" in files["README.md"].decode()
