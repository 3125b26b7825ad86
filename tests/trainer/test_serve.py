"""``sdtrain serve`` over real sockets: loading 503s, images, parameters, errors, and real clients."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from trainer.loading import load_pipeline  # noqa: E402
from trainer.serve import DEFAULT_MAX_QUEUE, ServeLimits, create_app, default_model_id, folder_sha  # noqa: E402

MODEL_ID = "test/tiny-sd1"
FAST = {"num_inference_steps": 2}


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free loopback port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        assert thread.is_alive(), "uvicorn exited"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_ready(url: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/health", timeout=5)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
        assert response.json()["state"] == "loading", response.text
        time.sleep(0.05)
    raise AssertionError("the model did not finish loading")


@pytest.fixture(scope="module")
def served_app(tiny_sd1: Path) -> Iterator[tuple[str, Any]]:
    """The tiny SD 1 pipeline served as test/tiny-sd1 (loaded, ready): URL and app."""
    app = create_app(tiny_sd1, model_id=MODEL_ID, device="cpu")
    with running(app) as url:
        wait_ready(url)
        yield url, app


@pytest.fixture
def served(served_app: tuple[str, Any]) -> str:
    return served_app[0]


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer tests run with HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every request,
    # loopback included. These requests only go to 127.0.0.1.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def post(url: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/models/{MODEL_ID}", json=body, timeout=120, **kwargs)


@pytest.mark.slow
async def test_loading_503_then_the_image(tiny_sd1: Path) -> None:
    from sdclient import GenerationEvent, SDClient

    gate = threading.Event()

    def slow_loader() -> Any:
        assert gate.wait(60), "the test never opened the gate"
        return load_pipeline(tiny_sd1, device="cpu")

    app = create_app(tiny_sd1, model_id="me/gated", loader=slow_loader)
    with running(app) as url:
        async with httpx.AsyncClient(timeout=10) as http:
            started = time.monotonic()
            response = await http.post(f"{url}/models/me/gated", json={"inputs": "a photo of sks toy"})
            health = await http.get(f"{url}/health")
            assert time.monotonic() - started < 2, "the server answers while the model loads"

        assert response.status_code == 503
        body = response.json()
        assert body["error"] == "Model me/gated is currently loading"
        assert 0 < body["estimated_time"] < 60
        assert health.status_code == 503 and health.json()["state"] == "loading"

        # SDClient waits out the cold start and gets the image once loading is done; a request with
        # the legacy `x-wait-for-model: true` is held by the server instead of answered 503.
        events: list[GenerationEvent] = []
        async with (
            SDClient(f"{url}/models/me/gated", on_event=events.append, max_wait_for_model=90) as client,
            httpx.AsyncClient(timeout=90) as http,
        ):
            task = asyncio.create_task(client.generate("a photo of sks toy", seed=3, **FAST))
            held = asyncio.create_task(
                http.post(
                    f"{url}/models/me/gated",
                    json={"inputs": "a photo of sks toy", "parameters": {"seed": 3, **FAST}},
                    headers={"x-wait-for-model": "true"},
                )
            )
            await asyncio.sleep(0.5)
            assert not task.done() and not held.done()
            gate.set()
            image = await asyncio.wait_for(task, 90)
            waited = await asyncio.wait_for(held, 90)

    assert waited.status_code == 200 and waited.content == image.data

    assert image.format == "png" and (image.width, image.height) == (64, 64)
    assert any(e.kind == "loading" and e.eta_s is not None for e in events)
    assert image.timings.cold_start_wait_s > 0


@pytest.mark.slow
def test_png_by_default_with_the_protocol_headers(
    served: str, tiny_sd1: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = "a photo of sks toy, secret-ish words"
    with caplog.at_level(logging.INFO, logger="trainer.serve"):
        response = post(served, {"inputs": prompt, "parameters": {"seed": 1, **FAST}})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    assert float(response.headers["x-compute-time"]) > 0
    assert response.headers["x-compute-type"] == "cpu"
    assert response.headers["x-request-id"]
    assert response.headers["x-seed"] == "1"
    expected_sha = folder_sha(tiny_sd1)
    assert response.headers["x-sha"] == expected_sha
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"prompt of {len(prompt)} characters" in logged
    assert "secret-ish" not in logged, "prompts are never logged, only their length"


def test_folder_sha_changes_with_the_weights_not_only_the_index(tiny_sd1: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "retrained"
    shutil.copytree(tiny_sd1, copy)
    assert folder_sha(copy) == folder_sha(tiny_sd1)
    weights = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor: same index, same sizes, other weights
    weights.write_bytes(bytes(data))
    assert folder_sha(copy) != folder_sha(tiny_sd1)


@pytest.mark.slow
def test_size_jpeg_and_the_root_path(served: str) -> None:
    response = httpx.post(
        f"{served}/",
        json={"inputs": "a toy", "parameters": {"width": 48, "height": 32, **FAST}},
        headers={"Accept": "image/jpeg"},
        timeout=120,
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and image.size == (48, 32)
    assert int(response.headers["x-seed"]) >= 0  # a random seed, reported


@pytest.mark.slow
def test_seed_and_scheduler_are_honoured(served: str) -> None:
    def image(**params: Any) -> bytes:
        parameters = {"width": 32, "height": 32, **FAST, **params}
        response = post(served, {"inputs": "a photo of sks toy", "parameters": parameters})
        assert response.status_code == 200, response.text
        return response.content

    first = image(seed=11)
    assert image(seed=11) == first
    assert image(seed=12) != first
    euler = image(seed=11, scheduler="EulerDiscreteScheduler")
    assert euler != first
    assert image(seed=11) == first, "the pipeline's own scheduler is back after a swap"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"inputs": "x", "parameters": {"width": 63}},
            422,
            "Input should be a multiple of 8: `width` in `parameters`",
        ),
        ({"inputs": "x", "parameters": {"height": 0}}, 422, "`height` in `parameters`"),
        (
            {"inputs": "x", "parameters": {"num_inference_steps": 0}},
            422,
            "`num_inference_steps` in `parameters`",
        ),
        ({"inputs": "x", "parameters": {"guidance_scale": "high"}}, 422, "`guidance_scale` in `parameters`"),
        ({"inputs": "x", "parameters": {"strength": 0.5}}, 422, "Extra inputs are not permitted: `strength`"),
        ({"inputs": "x", "parameters": {"lora_scale": 1.0}}, 422, "is not a LoRA model"),
        ({"parameters": {}}, 400, "Missing `inputs`"),
        ({"inputs": ""}, 422, "`inputs`"),
        ({"inputs": 3}, 400, "`inputs` must be a string"),
        (
            {"inputs": "x", "parameters": {"scheduler": "NoSuchScheduler"}},
            422,
            "Unknown scheduler 'NoSuchScheduler'",
        ),
        (["not", "an", "object"], 400, "JSON object"),
    ],
)
def test_bad_requests_get_the_protocols_status_and_reason(
    served: str, body: Any, status: int, message: str
) -> None:
    response = post(served, body)

    assert response.status_code == status
    error = response.json()["error"]
    text = error if isinstance(error, str) else "\n".join(error)
    assert message in text


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "x", "parameters": {"width": "512"}},
        {"inputs": "x", "parameters": {"guidance_scale": "high"}},
        {"inputs": "x", "parameters": {"seed": -1}},
        {"parameters": {}},
        {"inputs": ""},
        ["not", "an", "object"],
    ],
)
def test_bad_requests_are_answered_like_the_test_server(
    served: str, inference_server: Any, body: Any
) -> None:
    # Both read bodies through sdclient.protocol: the same status and the same error (serve only
    # narrows the bounds, e.g. sides to multiples of 8 up to 2048).
    ours = post(served, body)
    theirs = httpx.post(inference_server.model_url(MODEL_ID), json=body, timeout=10)
    assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json())


@pytest.mark.slow
def test_a_body_that_is_not_json(served: str) -> None:
    response = httpx.post(f"{served}/models/{MODEL_ID}", content=b"inputs=cat", timeout=10)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/models/other/model", "/models/test", "/models/test/tiny-sd1/extra"])
def test_unknown_model_is_404(served: str, path: str) -> None:
    response = httpx.post(f"{served}{path}", json={"inputs": "x"}, timeout=10)
    assert response.status_code == 404
    assert response.json() == {"error": f"Model {path.removeprefix('/models/')} does not exist"}


@pytest.mark.slow
async def test_queue_is_bounded_and_the_loop_stays_responsive(served_app: tuple[str, Any]) -> None:
    url, app = served_app
    server = app.state.server
    server.max_queue = 0  # no room to wait: one request generating, the next one is refused
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"inputs": "a toy", "parameters": {"width": 32, "height": 32, "num_inference_steps": 6}}
            slow = asyncio.create_task(http.post(f"{url}/", json=body))
            deadline = time.monotonic() + 30
            while True:
                started = time.monotonic()
                health = (await http.get(f"{url}/health")).json()
                assert time.monotonic() - started < 1.0, "health answers while the worker generates"
                if health["pending"] == 1:
                    break
                assert time.monotonic() < deadline and not slow.done()
                await asyncio.sleep(0.01)
            rejected = await http.post(f"{url}/", json={"inputs": "another", "parameters": FAST})
            done = await slow
    finally:
        server.max_queue = DEFAULT_MAX_QUEUE
    assert rejected.status_code == 503
    assert "overloaded" in rejected.json()["error"]
    assert int(rejected.headers["retry-after"]) >= 1
    assert done.status_code == 200


@pytest.mark.slow
def test_inference_client_gets_an_image(served: str, hub_online: None) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=f"{served}/models/{MODEL_ID}", timeout=120)
    image = client.text_to_image("a photo of sks toy", width=64, height=48, num_inference_steps=2, seed=4)

    assert image.size == (64, 48)


@pytest.mark.slow
async def test_sdclient_gets_an_image(served: str, tiny_sd1: Path) -> None:
    from sdclient import SDClient

    async with SDClient(f"{served}/models/{MODEL_ID}") as client:
        image = await client.generate("a photo of sks toy", width=32, height=64, seed=9, **FAST)

    assert image.format == "png" and (image.width, image.height) == (32, 64)
    assert image.request.seed == 9
    assert image.compute_type == "cpu"
    assert image.model_sha == folder_sha(tiny_sd1)
    assert image.request_id and image.timings.compute_s is not None and image.timings.compute_s > 0
    again = post(
        served, {"inputs": "a photo of sks toy", "parameters": {"width": 32, "height": 64, "seed": 9, **FAST}}
    )
    assert again.content == image.data, "same seed, same bytes, whichever client asks"


@pytest.mark.slow
def test_serves_an_exported_single_file(tiny_sd1: Path, tmp_path: Path, served: str) -> None:
    from trainer.export import export_single_file

    checkpoint = export_single_file(tiny_sd1, tmp_path / "export" / "model.safetensors")
    body = {"inputs": "a photo of sks toy", "parameters": {"seed": 21, **FAST}}
    with running(create_app(checkpoint, config=tiny_sd1, model_id="me/single", device="cpu")) as url:
        wait_ready(url)
        response = httpx.post(f"{url}/models/me/single", json=body, timeout=120)

    assert response.status_code == 200, response.text
    assert response.headers["x-sha"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert response.content == post(served, body).content, "the single file makes the folder's image"


def test_a_model_that_fails_to_load_answers_500(tmp_path: Path) -> None:
    with running(create_app(tmp_path / "missing", model_id="me/missing")) as url:
        deadline = time.monotonic() + 60
        while (health := httpx.get(f"{url}/health", timeout=5).json())["state"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        response = httpx.post(f"{url}/models/me/missing", json={"inputs": "x"}, timeout=10)

    assert health["state"] == "failed"
    assert response.status_code == 500
    assert response.json()["error"].startswith("Model me/missing failed to load: ModelLoadError")


def test_default_model_ids(tmp_path: Path) -> None:
    run = tmp_path / "sd-me"
    (run / "model").mkdir(parents=True)
    (run / "export").mkdir()
    (run / "export" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "other.ckpt").write_bytes(b"x")

    assert default_model_id(run / "model") == "sd-me"
    assert default_model_id(run / "export" / "model.safetensors") == "sd-me"
    assert default_model_id(tmp_path / "other.ckpt") == "other"
    assert default_model_id("owner/name") == "owner/name"
    with pytest.raises(ValueError, match="at most one '/'"):
        create_app(run / "model", model_id="a/b/c")


# -- limits: one request cannot wedge the server -------------------------------------------------


class SlowSteps:
    """Wraps a pipeline's UNet so that each denoising step takes ``step_s`` and is counted."""

    def __init__(self, pipe: Any, step_s: float) -> None:
        self.calls = 0
        self.step_s = step_s
        pipe.unet.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.calls += 1
        time.sleep(self.step_s)


@pytest.fixture
def slow_app(tiny_sd1: Path) -> Iterator[tuple[str, SlowSteps, Any]]:
    """The tiny model with 50 ms denoising steps, a generous budget and a 5 s request timeout."""
    pipe = load_pipeline(tiny_sd1, device="cpu")
    slow = SlowSteps(pipe, 0.05)
    limits = ServeLimits(max_megapixel_steps=1000, request_timeout_s=5.0)
    app = create_app(tiny_sd1, model_id=MODEL_ID, loader=lambda: pipe, limits=limits)
    with running(app) as url:
        wait_ready(url)
        yield url, slow, app.state.server


def test_a_request_over_the_cost_budget_is_refused_naming_the_limit(served: str) -> None:
    # The tiny model draws 64 px: its default budget is 64 x 64 x 100 steps = 0.4 megapixel-steps.
    response = post(
        served, {"inputs": "x", "parameters": {"width": 512, "height": 512, "num_inference_steps": 4}}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert "512 x 512 x 4 = 1.0 megapixel-steps" in error and "--max-megapixel-steps" in error
    assert post(served, {"inputs": "x", "parameters": {"width": 64, "height": 64, **FAST}}).status_code == 200


def test_a_prompt_or_a_body_over_the_limits_is_refused(served: str) -> None:
    long = post(served, {"inputs": "a " * 1500})
    assert long.status_code == 422 and "--max-prompt-chars" in long.json()["error"]
    huge = httpx.post(f"{served}/models/{MODEL_ID}", content=b"{" + b" " * 200_000 + b"}", timeout=10)
    assert huge.status_code == 413 and "--max-body-bytes" in huge.json()["error"]


def test_a_client_that_leaves_stops_its_generation(slow_app: tuple[str, SlowSteps, Any]) -> None:
    url, slow, server = slow_app
    body = {"inputs": "a toy", "parameters": {"num_inference_steps": 200, "seed": 1}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/models/{MODEL_ID}", json=body, timeout=0.5)  # the client gives up
    deadline = time.monotonic() + 5
    while server.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.pending == 0, "the generation went on for nobody"
    assert slow.calls < 60  # stopped at the next step, not after 200 steps (and CFG doubles nothing here)
    assert post(url, {"inputs": "next", "parameters": FAST}).status_code == 200


def test_a_generation_past_the_request_timeout_stops_with_503(slow_app: tuple[str, SlowSteps, Any]) -> None:
    url, slow, _ = slow_app
    started = time.monotonic()
    response = post(url, {"inputs": "a toy", "parameters": {"num_inference_steps": 500}})
    assert response.status_code == 503
    assert "longer than this server's 5 s" in response.json()["error"]
    assert time.monotonic() - started < 8
    assert slow.calls < 200  # of 500


async def test_a_retry_joins_the_generation_in_flight(slow_app: tuple[str, SlowSteps, Any]) -> None:
    url, slow, _ = slow_app
    body = {"inputs": "a toy", "parameters": {"num_inference_steps": 4, "seed": 7}}
    async with httpx.AsyncClient(timeout=30) as http:
        alone = await http.post(f"{url}/models/{MODEL_ID}", json=body)
        one_generation, slow.calls = slow.calls, 0
        first, retry = await asyncio.gather(
            http.post(f"{url}/models/{MODEL_ID}", json=body), http.post(f"{url}/models/{MODEL_ID}", json=body)
        )
    assert alone.status_code == first.status_code == retry.status_code == 200
    assert first.content == retry.content == alone.content
    assert slow.calls == one_generation  # one generation for both, not two


def test_sigterm_stops_a_long_generation_within_seconds(tiny_sd1: Path) -> None:
    import signal
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "trainer.cli", "serve", str(tiny_sd1), "--port", str(port)]
    command += ["--model-id", MODEL_ID, "--max-megapixel-steps", "100000", "--request-timeout", "600"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "sdtrain serve did not become ready"
            time.sleep(0.1)
        body = {"inputs": "a toy", "parameters": {"width": 512, "height": 512, "num_inference_steps": 500}}
        long = threading.Thread(target=lambda: httpx.post(f"{url}/models/{MODEL_ID}", json=body, timeout=120))
        long.start()
        time.sleep(1.0)  # generating now: minutes of steps at 512 px on a CPU
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert time.monotonic() - stopped_at < 12, "SIGTERM waited for the generation to finish"
        long.join(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_serves_a_flux_model_with_its_guidance_and_size(tmp_path: Path) -> None:
    from trainer.tiny import build_tiny_pipeline

    flux = build_tiny_pipeline(tmp_path / "flux", variant="flux")
    app = create_app(flux, model_id="me/flux", device="cpu")
    with running(app) as url:
        health = wait_ready(url)
        assert health["state"] == "ready"

        def draw(**parameters: Any) -> httpx.Response:
            body = {
                "inputs": "a photo of sks cat",
                "parameters": {"num_inference_steps": 2, "seed": 5, **parameters},
            }
            return httpx.post(f"{url}/models/me/flux", json=body, timeout=60)

        first, again = draw(width=64, height=64), draw(width=64, height=64)
        assert first.status_code == 200, first.text
        assert Image.open(io.BytesIO(first.content)).size == (64, 64)
        assert first.content == again.content
        assert draw(width=64, height=64, guidance_scale=7.0).content != first.content
        # Its own default size (FLUX: the transformer's default sample size) sets the budget.
        assert Image.open(io.BytesIO(draw().content)).size == (256, 256)
        assert draw(width=2048, height=2048, num_inference_steps=50).status_code == 422
