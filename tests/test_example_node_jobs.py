"""examples/node-jobs/jobs.mjs run with `node` against the real proxy under uvicorn: it starts a
job, receives the signed webhook on its own `node:http` server, verifies it and saves the image.
Its `verifySignature` is also checked against signatures computed here with `hmac`."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdclient.testing import InferenceTestServer, Reply

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "node-jobs" / "jobs.mjs"
NODE = shutil.which("node")
SECRET = "whsec-node-0123456789abcdef0123"
API_KEY = "node-client-key-0123456789abcdef"
MODEL_ID = "user/sd-raza"


@pytest.fixture(autouse=True)
def _require_node() -> None:
    """Skip without `node` (fail instead where CI requires every example, as redis_harness does)."""
    if NODE is not None:
        return
    reason = "node is not installed (the example needs Node 18 or later)"
    if os.environ.get("SDCLIENT_REQUIRE_BROWSER") == "1" or os.environ.get("CI"):
        pytest.fail(f"the Node example's tests are required here: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def proxy_url() -> Iterator[tuple[str, InferenceTestServer]]:
    """The proxy with webhooks on (loopback allowed) and an API key, in front of the test server."""
    import uvicorn

    from proxy import Settings, create_app

    with InferenceTestServer(default=Reply.image(format="jpeg", delay=0.3)) as upstream:
        settings = Settings(
            model=upstream.model_url(MODEL_ID),
            rate_limit_per_minute=0,
            api_keys=[API_KEY],
            webhook_secret=SECRET,
            webhook_allow_private=True,
            _env_file=None,
        )
        app: Any = create_app(settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{config.port}", upstream
        finally:
            server.should_exit = True
            thread.join(timeout=10)


def test_node_script_runs_a_job_and_verifies_its_webhook(
    proxy_url: tuple[str, InferenceTestServer], tmp_path: Path
) -> None:
    url, upstream = proxy_url
    out = tmp_path / "fox.jpg"
    command = [str(NODE), str(SCRIPT), "--proxy", url, "--api-key", API_KEY, "--seed", "42"]
    run = subprocess.run(
        [*command, "--out", str(out), "a", "watercolor", "fox"],
        env={"SDPROXY_WEBHOOK_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["verified"] is True and summary["seed"] == 42
    assert summary["job"].startswith("job_")
    assert out.read_bytes()[:2] == b"\xff\xd8" and summary["bytes"] == out.stat().st_size
    (request,) = [r for r in upstream.requests if r.method == "POST"]
    assert request.prompt == "a watercolor fox" and request.parameters["seed"] == 42


def _sign(body: bytes, timestamp: int, secret: str = SECRET) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def test_node_verify_signature_accepts_only_fresh_untampered_deliveries() -> None:
    body = b'{"id":"job_x","status":"succeeded"}'
    now = int(time.time())
    cases = [
        (body, _sign(body, now), True),
        (body.replace(b"succeeded", b"failed"), _sign(body, now), False),  # body altered
        (body, _sign(body, now, secret="another-secret-0123456789"), False),
        (body, _sign(body, now - 3600), False),  # an old delivery replayed
        (body, "t=abc,v1=00", False),
        (body, "", False),
    ]
    script = (
        f"import {{ verifySignature }} from {json.dumps(SCRIPT.as_uri())};"
        "const cases = JSON.parse(process.argv[1]);"
        "console.log(JSON.stringify(cases.map(([b, h]) => verifySignature("
        f"{json.dumps(SECRET)}, Buffer.from(b, 'utf8'), h))));"
    )
    payload = json.dumps([[b.decode(), header] for b, header, _ in cases])
    run = subprocess.run(
        [str(NODE), "--input-type=module", "-e", script, payload],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [expected for _, _, expected in cases]
