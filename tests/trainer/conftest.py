"""Shared fixtures of the trainer tests: tiny pipelines, synthetic photos and one trained run.

Everything is built offline, once per session where possible: three tiny pipelines (``tiny_sd1``
epsilon, ``tiny_sd2`` v-prediction, ``tiny_sdxl``), a folder of photos, and one complete ``sdtrain run``
(``trained_run``) that several test modules inspect instead of training again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hub_harness import FakeHub, serve_fake_hub
from PIL import Image, ImageDraw

# Keep library chatter out of the logs (tests/conftest.py keeps every test off the Hub).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from trainer.tiny import build_tiny_pipeline  # noqa: E402

# The run every "trained" test shares: 64 px, prior preservation with 4 class images, 10 steps.
INSTANCE_PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of a toy"
SAMPLE_PROMPT = "a photo of sks toy on a beach"
TRAIN_STEPS = 10


def make_photos(
    folder: Path, count: int = 4, *, size: tuple[int, int] = (80, 96), seed: int = 0
) -> list[Path]:
    """Draw ``count`` distinct synthetic photos (coloured shapes on a background) as JPEG/PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(80, 220, 3))
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, min(size) // 2, 2))
            x1, y1 = x0 + int(rng.integers(10, 40)), y0 + int(rng.integers(10, 40))
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = folder / (f"photo-{i}.jpg" if i % 2 == 0 else f"photo-{i}.png")
        image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def run_args(base: Path, photos: Path, out: Path, **overrides: Any) -> list[str]:
    """``sdtrain run``/``train`` arguments for the shared tiny run, with ``--flag value`` overrides."""
    options: dict[str, Any] = {
        "method": "full",  # the shared run is a full fine-tune; LoRA runs pass method="lora"
        "base-model": base,
        "instance-dir": photos,
        "instance-prompt": INSTANCE_PROMPT,
        "class-prompt": CLASS_PROMPT,
        "output": out,
        "num-class-images": 4,
        "class-batch-size": 2,
        "class-image-steps": 2,
        "max-train-steps": TRAIN_STEPS,
        "checkpointing-steps": 4,
        "checkpoints-total-limit": 1,
        "learning-rate": 1e-4,  # the tiny model must visibly move in 10 steps
        "sample-prompt": SAMPLE_PROMPT,
        "num-samples": 4,
        "sample-steps": 2,
        "seed": 7,
    }
    options.update({k.replace("_", "-"): v for k, v in overrides.items()})
    args: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        if value is True:
            args.append(f"--{key}")
        else:
            args += [f"--{key}", str(value)]
    return args


@pytest.fixture(name="run_args", scope="session")
def run_args_fixture() -> Callable[..., list[str]]:
    """:func:`run_args`, for tests that start their own runs of the shared configuration."""
    return run_args


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Two shared cores: several torch threads per process only fight each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x-style pipeline (epsilon prediction, 64 px), built once per session."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1"), variant="sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 2.x-style pipeline (v-prediction, 64 px), built once per session."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"), variant="sd2")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev-architecture pipeline (CLIP + T5, flow matching, 64 px), built once."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux"), variant="flux")


@pytest.fixture(scope="session")
def flux_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two photos for the tiny FLUX runs."""
    folder = tmp_path_factory.mktemp("flux-photos")
    make_photos(folder, count=2)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-architecture pipeline (two text encoders, ``text_time`` UNet, 64 px), built once."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), variant="sdxl")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A fresh folder of 4 small synthetic photos (80x96, JPEG and PNG) the test may modify."""
    folder = tmp_path / "photos"
    make_photos(folder)
    return folder


@pytest.fixture(scope="session")
def session_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photos of the shared trained run (do not modify)."""
    folder = tmp_path_factory.mktemp("session-photos")
    make_photos(folder)
    return folder


HUB_REPO = "me/sd-sks-toy"
# Fake tokens, written in two parts so that no secret scanner takes them for real ones.
HUB_TOKEN = "hf" + "_SENTINELtokenNeverPrinted0123456789"


class FakeHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records the two calls publishing makes."""

    def __init__(self) -> None:
        self.token = None
        self.created: list[dict[str, Any]] = []
        self.commits: list[dict[str, Any]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
        from huggingface_hub import RepoUrl

        self.created.append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> None:
        self.commits.append(
            {"repo_id": repo_id, "paths": sorted(op.path_in_repo for op in operations), **kwargs}
        )


@dataclass
class TrainedRun:
    """The shared run: its folder, everything it printed, and what it sent to the (fake) Hub."""

    path: Path
    output: str
    hub: FakeHfApi
    hub_repo: str = HUB_REPO
    token: str = HUB_TOKEN
    sample_prompt: str = SAMPLE_PROMPT


@pytest.fixture(scope="session")
def trained_run_result(
    tiny_sd1: Path, session_photos: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainedRun:
    """One complete ``sdtrain run --hub-repo`` on the tiny SD 1 model, through the command line:
    photos -> 4 class images -> 10 steps -> 4 samples -> export -> publish to a fake Hub (token from
    ``HF_TOKEN``). Do not modify the folder."""
    import huggingface_hub
    from typer.testing import CliRunner

    from trainer.cli import app

    out = tmp_path_factory.mktemp("trained-run") / "run"
    hub = FakeHfApi()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", HUB_TOKEN)
        mp.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: hub)
        result = CliRunner().invoke(app, ["run", *run_args(tiny_sd1, session_photos, out, hub_repo=HUB_REPO)])
    if result.exit_code != 0:
        message = f"sdtrain run failed ({result.exit_code}):\n{result.output}"
        raise AssertionError(message) from result.exception
    return TrainedRun(out, result.output, hub)


# The shared LoRA run: rank 4 with alpha 8 (a scale of 2, so alpha handling is tested), with a
# text-encoder adapter, at 1e-3 (adapters start at zero and must visibly move in 10 steps), on the
# same photos and settings as the full run otherwise.
LORA_OPTIONS: dict[str, Any] = {
    "method": "lora",
    "lora_rank": 4,
    "lora_alpha": 8,
    "train_text_encoder": True,
    "learning_rate": 1e-3,
}


@pytest.fixture(name="lora_options", scope="session")
def lora_options_fixture() -> dict[str, Any]:
    """The options of the shared LoRA run (beside :func:`run_args`'s)."""
    return dict(LORA_OPTIONS)


@pytest.fixture(scope="session")
def lora_run(tiny_sd1: Path, session_photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete ``sdtrain run --method lora`` on the tiny SD 1 model through the command line:
    4 class images, 10 steps, 4 samples and the kohya file. Do not modify the folder."""
    from typer.testing import CliRunner

    from trainer.cli import app

    out = tmp_path_factory.mktemp("lora-run") / "run"
    result = CliRunner().invoke(app, ["run", *run_args(tiny_sd1, session_photos, out, **LORA_OPTIONS)])
    if result.exit_code != 0:
        message = f"sdtrain run --method lora failed ({result.exit_code}):\n{result.output}"
        raise AssertionError(message) from result.exception
    return out


@pytest.fixture(scope="session")
def trained_run(trained_run_result: TrainedRun) -> Path:
    """The folder of the shared trained run (model/, checkpoints/, samples/, export/, run.json)."""
    return trained_run_result.path


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake Hub on 127.0.0.1 that ``HfApi()`` talks to (as with ``HF_ENDPOINT``)."""
    import huggingface_hub.constants

    # The tests run with HF_HUB_OFFLINE=1 (no Hub). This fake lives on 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with serve_fake_hub() as fake:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake.url)
        yield fake
