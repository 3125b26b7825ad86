"""The example programs in examples/, run against a real local server of the protocol.

Each example is loaded from its file and run through its `main(argv)` (one also as a subprocess,
the way a user runs it), pointed at `sdclient.testing.InferenceTestServer`; `call_proxy.py` talks
to the real proxy app served by uvicorn in front of that server. The tests check the files the
examples write: decodable images of the requested size, with the metadata that made them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from sdclient import UsageWarning
from sdclient.testing import InferenceTestServer, Reply

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL_ID = "user/sd-raza"
# Fake tokens, written in two parts so that no secret scanner takes them for real ones.
SENTINEL_TOKEN = "hf" + "_SENTINELexamples0000000000000000"


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py as a module (the folder is not a package)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's own token and model settings out of the examples under test."""
    for name in list(os.environ):
        if name.startswith(("SDPROXY_", "SD_")) or name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture
def server() -> Iterator[InferenceTestServer]:
    with InferenceTestServer(default=Reply.image(format="jpeg", compute_time=0.25)) as server:
        yield server


def png_metadata(path: Path) -> tuple[Image.Image, dict[str, str]]:
    image = Image.open(path)
    image.load()
    return image, dict(image.text)  # type: ignore[attr-defined]


# -- generate_image.py -----------------------------------------------------------------------------


def test_generate_image_saves_png_with_metadata(
    server: InferenceTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("generate_image")
    argv = [
        "--model", server.model_url(MODEL_ID), "--out-dir", str(tmp_path),
        "--seed", "1234", "--steps", "4", "--guidance", "6.5", "--width", "96", "--height", "64",
        "--negative-prompt", "blurry",
        "Portrait of Ábraza man, peaky blinders",
    ]  # fmt: skip

    assert example.main(argv) == 0

    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path == tmp_path / "portrait-of-abraza-man-peaky-blinders-1234.png"
    image, text = png_metadata(path)
    assert (image.format, image.size) == ("PNG", (96, 64))
    assert text["prompt"] == "Portrait of Ábraza man, peaky blinders"
    assert text["negative_prompt"] == "blurry"
    assert text["seed"] == "1234"
    parameters = json.loads(text["parameters"])
    assert parameters["num_inference_steps"] == 4
    assert parameters["guidance_scale"] == 6.5
    assert MODEL_ID in text["model"]
    assert "seed 1234" in err

    (request,) = server.requests
    assert request.path == f"/models/{MODEL_ID}"
    assert request.prompt == "Portrait of Ábraza man, peaky blinders"
    assert request.parameters["seed"] == 1234
    assert request.parameters["negative_prompt"] == "blurry"


def test_generate_image_as_a_program_records_the_random_seed(
    server: InferenceTestServer, tmp_path: Path
) -> None:
    """Run the file the way a user does, with the model taken from SD_MODEL."""
    server.cold_start(0.4)
    env = {**os.environ, "SD_MODEL": server.model_url(MODEL_ID), "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "generate_image.py"), "--out-dir", str(tmp_path), "a red fox"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    _, text = png_metadata(path)
    sent_seed = server.requests[-1].parameters["seed"]
    assert text["seed"] == str(sent_seed)
    assert path.name == f"a-red-fox-{sent_seed}.png"
    assert "model is loading" in result.stderr
    assert [r.reply for r in server.requests][0] == "loading"


def test_generate_image_reports_server_errors(
    server: InferenceTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.default = Reply.error(404, f"Model {MODEL_ID} does not exist")
    example = load_example("generate_image")

    code = example.main(["--model", server.model_url(MODEL_ID), "--out-dir", str(tmp_path), "a cat"])

    assert code == 1
    assert f"Model {MODEL_ID} does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_generate_image_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("generate_image")
    with pytest.raises(SystemExit) as exc_info:
        example.main(["a cat"])
    assert exc_info.value.code == 2
    assert "pass --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example.main(["--model", "user/x", "--width", "500", "a cat"])
    assert "multiple of 8" in capsys.readouterr().err


# -- batch_with_usage.py ---------------------------------------------------------------------------


def test_batch_saves_every_image_and_reports_usage(
    server: InferenceTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.enqueue(Reply.rate_limited(retry_after=0))  # one retry, counted in the report
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# portraits\nabraza man as an astronaut\n\nabraza man in a renaissance painting\n")
    out_dir, report = tmp_path / "images", tmp_path / "usage.json"
    example = load_example("batch_with_usage")
    argv = [
        "--model", server.model_url(MODEL_ID), "--prompts-file", str(prompts), "a lighthouse",
        "--images-per-prompt", "2", "--concurrency", "2", "--seed", "100", "--width", "64", "--height", "64",
        "--out-dir", str(out_dir), "--usage-db", str(tmp_path / "usage.sqlite"), "--report", str(report),
        "--price-per-hour", "3.6",
    ]  # fmt: skip

    assert example.main(argv) == 0

    out, err = capsys.readouterr()
    paths = [Path(line) for line in out.split()]
    assert len(paths) == 6
    seeds = set()
    for path in paths:
        image, text = png_metadata(path)
        assert (image.format, image.size) == ("PNG", (64, 64))
        assert path.name == f"{path.name.rsplit('-', 1)[0]}-{text['seed']}.png"
        seeds.add(int(text["seed"]))
    assert seeds == set(range(100, 106))
    assert "Usage" in err and "compute seconds" in err and "estimated cost" in err
    assert "6 of 6 images saved" in err

    data = json.loads(report.read_text())
    assert data["images_saved"] == 6 and data["images_failed"] == 0
    total = data["usage"]["total"]
    assert total["images"] == 6
    assert total["retries"] >= 1
    assert total["prompt_characters"] == 2 * sum(
        len(p) for p in ("abraza man as an astronaut", "abraza man in a renaissance painting", "a lighthouse")
    )
    assert total["compute_seconds"] == pytest.approx(6 * 0.25)
    assert data["estimated_cost"] == pytest.approx(6 * 0.25 / 3600 * 3.6)
    image_requests = [r for r in server.requests if r.reply == "image"]
    assert len(image_requests) == 6


def test_batch_usage_db_adds_up_across_runs_and_enforces_budget(
    server: InferenceTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("batch_with_usage")
    common = ["--model", server.model_url(MODEL_ID), "--out-dir", str(tmp_path / "images"),
              "--usage-db", str(tmp_path / "usage.sqlite"), "--max-images", "3"]  # fmt: skip

    assert example.main([*common, "--report", str(tmp_path / "first.json"), "one", "two"]) == 0
    capsys.readouterr()
    # Two more would go past the budget of 3 images recorded in the database: one is refused.
    with pytest.warns(UsageWarning, match="budget 3"):
        assert example.main([*common, "--report", str(tmp_path / "second.json"), "three", "four"]) == 1

    second = json.loads((tmp_path / "second.json").read_text())
    assert second["images_saved"] == 1 and second["images_failed"] == 1
    assert second["usage"]["total"]["images"] == 3
    assert "failed" in capsys.readouterr().err
    assert len([r for r in server.requests if r.reply == "image"]) == 3


# -- inference_endpoint.py -------------------------------------------------------------------------


def test_endpoint_waits_out_a_cold_start(
    server: InferenceTestServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client waits on 503 "loading"; a discovered token is not sent to a non-HF host."""
    monkeypatch.setenv("HF_TOKEN", SENTINEL_TOKEN)
    server.cold_start(0.5)
    out = tmp_path / "endpoint.png"
    example = load_example("inference_endpoint")

    assert example.main(["--endpoint-url", server.url, "--seed", "7", "--out", str(out), "a lighthouse"]) == 0

    err = capsys.readouterr().err
    assert "the endpoint is starting up" in err
    assert "cold start" in err
    image, text = png_metadata(out)
    assert image.format == "PNG" and text["seed"] == "7"
    replies = [r.reply for r in server.requests]
    assert replies[0] == "loading" and replies[-1] == "image"
    assert all(r.path == "/" for r in server.requests)
    assert all("authorization" not in r.headers for r in server.requests)


def test_endpoint_scale_up_timeout_is_sent_and_token_on_request(
    server: InferenceTestServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With X-Scale-Up-Timeout the endpoint holds the request instead of answering 503."""
    monkeypatch.setenv("HF_TOKEN", SENTINEL_TOKEN)
    server.cold_start(0.5)
    out = tmp_path / "held.png"
    example = load_example("inference_endpoint")
    argv = [
        "--endpoint-url",
        server.url,
        "--scale-up-timeout",
        "30",
        "--send-token",
        "--out",
        str(out),
        "a boat",
    ]

    assert example.main(argv) == 0

    (request,) = server.requests
    assert request.reply == "image"
    assert request.headers["x-scale-up-timeout"] == "30"
    assert request.headers["authorization"] == f"Bearer {SENTINEL_TOKEN}"
    assert SENTINEL_TOKEN not in capsys.readouterr().err
    assert png_metadata(out)[0].format == "PNG"


def test_endpoint_gives_up_after_max_wait(
    server: InferenceTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.cold_start(30.0)
    example = load_example("inference_endpoint")
    started = time.monotonic()
    argv = ["--endpoint-url", server.url, "--max-wait", "0.5", "--out", str(tmp_path / "x.png"), "a boat"]

    assert example.main(argv) == 1

    assert time.monotonic() - started < 10
    assert "still starting" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# -- call_proxy.py ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def proxy_url(server: InferenceTestServer) -> Iterator[str]:
    """The real proxy app under uvicorn on a free port, in front of the test server."""
    import uvicorn

    from proxy import Settings, create_app

    settings = Settings(
        model=server.model_url(MODEL_ID),
        upstream_token=SENTINEL_TOKEN,
        rate_limit_per_minute=0,
        _env_file=None,
    )
    app: Any = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning", lifespan="on")
    uv_server = uvicorn.Server(config)
    thread = threading.Thread(target=uv_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not uv_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}"
    uv_server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("mode", ["bytes", "json"])
def test_call_proxy_saves_image_and_metadata(
    server: InferenceTestServer, proxy_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    example = load_example("call_proxy")
    argv = ["--proxy-url", proxy_url, "--mode", mode, "--out-dir", str(tmp_path), "--seed", "42",
            "--steps", "5", "--width", "128", "--height", "64", "a watercolor fox"]  # fmt: skip

    assert example.main(argv) == 0

    path = Path(capsys.readouterr().out.strip())
    assert path.name == "a-watercolor-fox-42.jpg"  # the test server answers JPEG; the proxy passes it on
    image = Image.open(path)
    image.load()
    assert (image.format, image.size) == ("JPEG", (128, 64))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["seed"] == 42
    assert meta["prompt"] == "a watercolor fox"
    assert meta["parameters"]["num_inference_steps"] == 5
    assert meta["timings"]["compute_s"] == pytest.approx(0.25)
    assert meta["request_id"]
    upstream = [r for r in server.requests if r.reply == "image"][-1]
    assert upstream.parameters["seed"] == 42


def test_call_proxy_shows_the_proxy_error(
    server: InferenceTestServer, proxy_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("call_proxy")

    code = example.main(["--proxy-url", proxy_url, "--out-dir", str(tmp_path), "--steps", "500", "a fox"])

    assert code == 1
    err = capsys.readouterr().err
    assert "validation_error" in err and "HTTP 422" in err
    assert list(tmp_path.iterdir()) == []
    assert server.requests == []


def test_call_proxy_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("call_proxy")
    url = f"http://127.0.0.1:{_free_port()}"
    assert example.main(["--proxy-url", url, "--timeout", "5", "--out-dir", str(tmp_path), "a fox"]) == 1
    assert f"could not reach the proxy at {url}" in capsys.readouterr().err
