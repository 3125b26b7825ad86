"""The `sdclient` command, run through typer's CliRunner against the real test server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from client_harness import MODEL_ID, SENTINEL
from PIL import Image
from rich.progress import Progress
from typer.testing import CliRunner

from sdclient import GenerationEvent, UsageTracker
from sdclient._cli import _event_hook, _StatusColumn, app
from sdclient.testing import InferenceTestServer, Reply

runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def test_generate_writes_named_pngs_with_metadata(server: InferenceTestServer, tmp_path: Path):
    out, usage = tmp_path / "out", tmp_path / "usage.sqlite"

    result = run(
        "generate", "A red fox, in snow!", "--model", server.model_url(MODEL_ID), "-n", "3", "--seed", "40",
        "--negative-prompt", "blurry", "--width", "48", "--height", "32", "--steps", "4", "--guidance", "6",
        "--concurrency", "2", "-o", str(out), "--usage-file", str(usage),
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a-red-fox-in-snow-40.png", "a-red-fox-in-snow-41.png", "a-red-fox-in-snow-42.png"]
    assert sorted(Path(line).name for line in result.stdout.split()) == names  # paths on stdout
    with Image.open(out / names[1]) as image:
        assert image.size == (48, 32)
        assert image.text["seed"] == "41"  # type: ignore[attr-defined]
        assert image.text["negative_prompt"] == "blurry"  # type: ignore[attr-defined]
    assert {r.parameters["seed"] for r in server.requests} == {40, 41, 42}
    assert server.requests[0].parameters["num_inference_steps"] == 4
    assert server.requests[0].parameters["guidance_scale"] == 6.0
    assert UsageTracker(usage).snapshot().total.images == 3


def test_generate_through_a_cold_start(server: InferenceTestServer, tmp_path: Path):
    server.cold_start(0.5)
    result = run(
        "generate", "fox", "-m", server.model_url(MODEL_ID), "-n", "2", "-o", str(tmp_path), "--no-usage"
    )
    assert result.exit_code == 0, result.output
    assert "waited" in result.stderr  # the final display says the images waited for the model
    assert len(list(tmp_path.glob("fox-*.png"))) == 2


def test_progress_shows_the_cold_start_countdown():
    progress = Progress(_StatusColumn())
    task = progress.add_task("image 1", total=1, status="queued")
    hook = _event_hook(progress, task)

    hook(GenerationEvent(kind="loading", model="m", attempt=1, eta_s=40.4, message="loading"))
    assert str(_StatusColumn().render(progress.tasks[0])) == "model loading, ~40 s left"
    progress.tasks[0].fields["ready_at"] = time.monotonic() + 12.2  # time passes
    assert str(_StatusColumn().render(progress.tasks[0])) == "model loading, ~12 s left"

    hook(
        GenerationEvent(
            kind="retrying", model="m", attempt=2, delay_s=2.0, message="HTTP 429 from m: slow down"
        )
    )
    assert str(_StatusColumn().render(progress.tasks[0])) == "retrying in 2.0 s: HTTP 429 from m: slow down"
    hook(GenerationEvent(kind="sending", model="m", attempt=3))
    assert str(_StatusColumn().render(progress.tasks[0])) == "generating (attempt 3)"


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (Reply.error(404, "Model user/sd-model does not exist"), "spelled right"),
        (Reply.error(401, "Invalid credentials in Authorization header"), "HF_TOKEN"),
        (Reply.error(410, "no longer supported"), "router"),
    ],
)
def test_errors_are_one_clear_line_without_traceback(
    server: InferenceTestServer, tmp_path: Path, reply: Reply, words: str
):
    server.default = reply
    result = run("generate", "fox", "-m", server.model_url(MODEL_ID), "-o", str(tmp_path), "-q", "--no-usage")

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert words in lines[0]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_partial_failure_saves_the_rest_and_exits_non_zero(server: InferenceTestServer, tmp_path: Path):
    server.enqueue(Reply.image(), Reply.error(400, "bad"), Reply.image())
    result = run(
        "generate", "fox", "-m", server.model_url(MODEL_ID), "-n", "3", "--concurrency", "1",
        "-o", str(tmp_path), "-q", "--no-usage",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "1 of 3 images failed" in result.stderr
    assert len(list(tmp_path.glob("*.png"))) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "fox", "-m", "not a model"], "Hub model id"),
        (["generate", "  ", "-m", "user/m"], "the prompt is empty"),
        (["generate", "fox", "-m", "user/m", "--token-env", "NOPE_NOT_SET"], "NOPE_NOT_SET"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], message: str, tmp_path: Path):
    result = run(*args, "-o", str(tmp_path), "--no-usage")
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_there_is_no_token_flag():
    result = run("generate", "fox", "-m", "user/m", "--token", SENTINEL)
    assert result.exit_code == 2
    assert "No such option" in result.output


def test_token_env_sends_that_token(server: InferenceTestServer, tmp_path: Path):
    result = run(
        "generate", "fox", "-m", server.model_url(MODEL_ID), "--token-env", "MY_TOKEN",
        "-o", str(tmp_path), "-q", "--no-usage", env={"MY_TOKEN": SENTINEL},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert server.requests[0].headers["authorization"] == f"Bearer {SENTINEL}"
    assert SENTINEL not in result.output


def test_model_from_the_environment(server: InferenceTestServer, tmp_path: Path):
    result = run(
        "generate", "fox", "-o", str(tmp_path), "-q", env={"SDCLIENT_MODEL": server.model_url(MODEL_ID)}
    )
    assert result.exit_code == 0, result.output


def test_usage_prints_a_table(server: InferenceTestServer, tmp_path: Path):
    usage = tmp_path / "usage.sqlite"
    run(
        "generate",
        "fox",
        "-m",
        server.model_url(MODEL_ID),
        "-n",
        "2",
        "-o",
        str(tmp_path),
        "--usage-file",
        str(usage),
    )

    result = run("usage", "--file", str(usage))

    assert result.exit_code == 0, result.output
    assert "images" in result.stdout and "compute seconds" in result.stdout
    assert server.model_url(MODEL_ID)[:20] in result.stdout
    as_json = json.loads(run("usage", "--file", str(usage), "--json").stdout)
    assert as_json["total"]["images"] == 2
    assert as_json["total"]["requests"] == 2


def test_usage_shows_short_compute_times(tmp_path: Path):
    usage = tmp_path / "usage.sqlite"
    tracker = UsageTracker(usage)
    tracker.record("user/fast", requests=1, images=1, compute_seconds=0.043)
    tracker.record("user/slow", requests=1, images=1, compute_seconds=12.46)
    tracker.close()
    result = run("usage", "--file", str(usage))
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "compute seconds" in line)
    assert "0.043" in line and "12.5" in line


def test_usage_uses_the_default_file(server: InferenceTestServer, tmp_path: Path):
    # conftest points SDCLIENT_USAGE_FILE into tmp_path.
    run("generate", "fox", "-m", server.model_url(MODEL_ID), "-o", str(tmp_path), "-q")
    result = run("usage", "--json")
    assert json.loads(result.stdout)["total"]["images"] == 1


def test_usage_without_a_file(tmp_path: Path):
    result = run("usage", "--file", str(tmp_path / "missing.sqlite"))
    assert result.exit_code == 1
    assert "no usage file" in result.stderr
    assert not (tmp_path / "missing.sqlite").exists()


def test_usage_of_a_file_that_is_not_a_database(tmp_path: Path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello " * 100)
    result = run("usage", "--file", str(bad))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot read usage")


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("sdclient ")
