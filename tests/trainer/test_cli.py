"""The ``sdtrain`` command line: help, exit codes, clear errors before anything slow, each step."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from trainer.cli import app
from trainer.sample import read_png_text

COMMANDS = ["run", "train", "check", "class-images", "sample", "export", "publish", "serve", "tiny-model"]


def invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def _flow_args(base: object, photos: Path) -> list[object]:
    return ["--base-model", base, "--instance-dir", photos, "--instance-prompt", "x", "--class-prompt", "y"]


def flat(result: Result) -> str:
    """The output with rich's line breaks and box drawing folded away, for substring checks."""
    return " ".join(result.output.replace("│", " ").split())


def test_top_level_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    assert "Fine-tune Stable Diffusion on your photos" in flat(result)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_summary_and_examples(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    text = flat(result)
    assert f"Usage: sdtrain {command}" in text
    assert "Examples:" in text and f"sdtrain {command}" in text.split("Examples:")[1]


def test_run_help_groups_its_options() -> None:
    text = flat(invoke("run", "--help"))
    for panel in ["Input and output", "Training", "Prior preservation", "Memory and speed", "Checkpoints"]:
        assert panel in text
    assert "100 per photo, +100 under 10 photos" in text
    assert "5e-06" in text and "--resume" in text and "--hub-repo" in text


def test_module_entry_point_for_accelerate_launch() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_check_lists_good_photos(photos: Path) -> None:
    result = invoke("check", photos, "--resolution", 64)
    assert result.exit_code == 0, result.output
    assert "photo-0.jpg" in result.output and "80x96" in result.output
    assert "All 4 photos are usable." in result.output


def test_check_reports_every_bad_photo_with_exit_code_1(photos: Path) -> None:
    (photos / "notes.txt").write_text("hello")
    (photos / "cut.jpg").write_bytes((photos / "photo-0.jpg").read_bytes()[:200])
    result = invoke("check", photos, "--resolution", 96)
    assert result.exit_code == 1
    text = flat(result)
    assert "notes.txt: not an image" in text and "cut.jpg: corrupt or truncated" in text
    assert "80x96 px is smaller than the training resolution 96x96" in text  # every photo: 80 < 96
    assert "Traceback" not in result.output


def test_check_takes_folders_and_resolution_from_a_config(
    photos: Path, tiny_sd1: Path, tmp_path: Path
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        f'base_model = "{tiny_sd1}"\noutput_dir = "out"\n'
        f'[[concepts]]\ninstance_prompt = "x"\nclass_prompt = "y"\ninstance_dir = "{photos}"\n',
        encoding="utf-8",
    )
    result = invoke("check", "--config", config)
    assert result.exit_code == 0, result.output
    assert "64 px training size" in flat(result)  # from the tiny base model


def test_check_without_folders_says_what_to_give() -> None:
    result = invoke("check")
    assert result.exit_code == 2 and "Give photo folders" in result.output


def test_invalid_options_exit_2_naming_the_field(photos: Path, tmp_path: Path) -> None:
    result = invoke(
        "run",
        *["--base-model", "a/b", "--instance-dir", photos, "--instance-prompt", "x", "--class-prompt", "y"],
        *["--output", tmp_path / "out", "--learning-rate", "-1", "--mixed-precision", "fp32"],
    )
    assert result.exit_code == 2
    text = flat(result)
    assert "Invalid options:" in text
    assert "learning_rate: Input should be greater than 0 (got -1.0)" in text
    assert "mixed_precision: Input should be 'auto', 'no', 'fp16' or 'bf16' (got 'fp32')" in text
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_bad_photos_stop_the_run_before_anything_is_written(
    photos: Path, tiny_sd1: Path, tmp_path: Path
) -> None:
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    result = invoke("run", *_flow_args(tiny_sd1, photos), "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert "broken.png: not an image" in flat(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--attention", "xformers"], "xformers"),
        (["--use-8bit-adam"], "bitsandbytes"),
        (["--mixed-precision", "fp16"], "fp16 mixed precision needs a CUDA GPU"),
    ],
)
def test_unusable_features_fail_fast(
    flag: list[str], message: str, photos: Path, tiny_sd1: Path, tmp_path: Path
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("these features may work on this machine")
    result = invoke("run", *_flow_args(tiny_sd1, photos), "--output", tmp_path / "out", *flag)
    assert result.exit_code == 1
    assert message in flat(result)
    assert not (tmp_path / "out").exists()  # nothing generated or trained


def test_publishing_without_a_token_fails_before_training(
    photos: Path, tiny_sd1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token saved by `hf auth login`
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    result = invoke(
        "run", *_flow_args(tiny_sd1, photos), "--output", tmp_path / "out", "--hub-repo", "me/model"
    )
    assert result.exit_code == 2
    text = flat(result)
    assert "Publishing to me/model needs a Hugging Face write token" in text
    assert "HF_TOKEN" in text and "hf auth login" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tiny_model_command(tmp_path: Path) -> None:
    result = invoke("tiny-model", tmp_path / "v", "--variant", "sd2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v" / "model_index.json").is_file()
    assert '"v_prediction"' in (tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text()
    bad = invoke("tiny-model", tmp_path / "w", "--variant", "sd3")
    assert bad.exit_code == 2 and "--variant must be one of sd1, sd2, sdxl" in bad.output


@pytest.mark.slow
def test_sample_command_on_a_run_folder(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    result = invoke(
        "sample", trained_run, "--prompt", "sks toy in space", "--num-images", 2, "--steps", 2, "--seed", 40,
        "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample-00.png", "sample-01.png"]
    text = read_png_text(out / "sample-01.png")
    assert text["prompt"] == "sks toy in space" and text["seed"] == "41" and text["steps"] == "2"
    assert text["model"] == str(trained_run / "model")


def test_sample_needs_a_prompt_outside_a_run_folder(tiny_sd1: Path) -> None:
    result = invoke("sample", tiny_sd1)
    assert result.exit_code == 2 and "Give --prompt" in result.output


@pytest.mark.slow
def test_export_command(trained_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "me.safetensors"
    result = invoke("export", trained_run, "--output", target, "--full")
    assert result.exit_code == 0, result.output
    assert (
        target.stat().st_size > (trained_run / "export" / "model.safetensors").stat().st_size
    )  # fp32 > fp16
    missing = invoke("export", trained_run / "model")
    assert missing.exit_code == 2 and "Give --output" in missing.output


@pytest.mark.slow
def test_publish_command_without_a_token(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "class_images"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    result = invoke("publish", run, "me/other")
    assert result.exit_code == 1
    assert "No Hugging Face token found" in flat(result)


def test_class_images_command_needs_a_prompt_and_folder(tmp_path: Path) -> None:
    result = invoke("class-images", "--base-model", "a/b", "--class-prompt", "x")
    assert result.exit_code == 2 and "Give both --class-prompt and --class-dir" in result.output


@pytest.mark.slow
def test_class_images_command(tiny_sd1: Path, tmp_path: Path) -> None:
    args = [
        "class-images",
        "--base-model",
        tiny_sd1,
        "--class-prompt",
        "a toy",
        "--class-dir",
        tmp_path / "c",
    ]
    args += ["--num-class-images", 2, "--class-image-steps", 2]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "2 generated, 0 reused" in flat(first)
    second = invoke(*args)
    assert "0 generated, 2 reused" in flat(second)


# -- user-controlled names are shown literally ---------------------------------------------------


@pytest.mark.parametrize("name", ["a[/]b", "[bold]x", "[red]y[/red]"])
def test_check_shows_folder_names_that_look_like_markup_literally(photos: Path, name: str) -> None:
    folder = photos.parent / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    photos.rename(folder)
    result = invoke("check", folder, "--resolution", 64)
    assert result.exit_code == 0, result.output
    assert f"{folder} (4 photos" in flat(result)

    (folder / "notes.txt").write_text("hello")
    result = invoke("check", folder, "--resolution", 64)
    assert result.exit_code == 1, result.output
    assert f"in {folder} cannot be used" in flat(result)
    assert f"{folder / 'notes.txt'}: not an image" in flat(result)
    assert "Traceback" not in result.output


def test_run_names_a_markup_like_photo_folder_literally(photos: Path, tiny_sd1: Path, tmp_path: Path) -> None:
    folder = tmp_path / "[bold]x" / "a[/]b"
    folder.parent.mkdir(parents=True)
    photos.rename(folder)
    (folder / "[bold]broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    result = invoke("run", *_flow_args(tiny_sd1, folder), "--output", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert f"{folder / '[bold]broken.png'}: not an image" in flat(result)
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_control_characters_in_file_names_are_shown_as_escapes(photos: Path) -> None:
    (photos / "photo-1.png").rename(photos / "\x1b[31mred.png")
    (photos / "photo-2.jpg").rename(photos / "two\nlines.jpg")
    result = invoke("check", photos, "--resolution", 64)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\\x1b[31mred.png" in result.output
    assert "two\\nlines.jpg" in result.output

    (photos / "bad\x1b]0;title\x07\u202e.txt").write_text("hello")
    result = invoke("check", photos, "--resolution", 64)
    assert result.exit_code == 1, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output and "\u202e" not in result.output
    assert "bad\\x1b]0;title\\x07\\u202e.txt: not an image" in result.output


def test_check_refuses_photos_over_the_pixel_limit(photos: Path) -> None:
    result = invoke("check", photos, "--resolution", 64, "--max-megapixels", 0.005)
    assert result.exit_code == 1
    assert "photo-0.jpg: too large: 80 x 96 px" in flat(result)
    assert "resize it below 0.005 megapixels" in flat(result)


def test_run_takes_the_pixel_limit_as_an_option(photos: Path, tiny_sd1: Path, tmp_path: Path) -> None:
    result = invoke(
        "run", *_flow_args(tiny_sd1, photos), "--output", tmp_path / "out", "--max-megapixels", 0.005
    )
    assert result.exit_code == 1, result.output
    assert "photo-0.jpg: too large: 80 x 96 px" in flat(result)
    assert not (tmp_path / "out").exists()
