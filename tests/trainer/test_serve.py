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
from trainer.serve import DEFAULT_MAX_QUEUE, create_app, default_model_id, folder_sha  # noqa: E402

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
