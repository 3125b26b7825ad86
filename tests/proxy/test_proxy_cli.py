"""`sdproxy`: help, configuration errors, `check`, and `serve` as a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from proxy_harness import MODEL_ID, SENTINEL
from typer.testing import CliRunner

from proxy.cli import app
from sdclient.testing import InferenceTestServer

runner = CliRunner()


def test_help_lists_the_commands_and_options() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "serve" in result.output and "check" in result.output
    serve_help = runner.invoke(app, ["serve", "--help"], terminal_width=120)
    for option in ("--host", "--port", "--model", "--provider", "--workers", "--static-dir", "--warmup"):
        assert option in serve_help.output


def test_unsafe_configuration_exits_2_with_a_readable_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDPROXY_MODEL", "http://127.0.0.1:7860/models/demo")
    monkeypatch.setenv("SDPROXY_ALLOWED_ORIGINS", "*")
    monkeypatch.setenv("SDPROXY_ALLOW_CREDENTIALS", "true")
    result = runner.invoke(app, ["serve"], terminal_width=200)
    assert result.exit_code == 2
    assert "SDPROXY_ALLOWED_ORIGINS contains '*'" in result.output
    missing = runner.invoke(app, ["check"], env={"SDPROXY_MODEL": ""}, terminal_width=200)
    assert missing.exit_code == 2
    assert "SDPROXY_MODEL is not set" in missing.output


def test_check_prints_the_configuration_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDPROXY_MODEL", "http://127.0.0.1:7860/models/demo")
    monkeypatch.setenv("SDPROXY_UPSTREAM_TOKEN", SENTINEL)
    monkeypatch.setenv("SDPROXY_ADMIN_KEY", "admin-key-0123456789abcdef")
    result = runner.invoke(app, ["check"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:7860/models/demo" in result.output
    assert "SDPROXY_MAX_CONCURRENCY" in result.output
    assert SENTINEL not in result.output
    assert "admin-key-0123456789abcdef" not in result.output


def test_serve_takes_the_model_and_provider_and_hands_them_to_the_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    started: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(kwargs))
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    for name in ("SDPROXY_MODEL", "SDPROXY_PROVIDER"):
        monkeypatch.setenv(name, "")  # ignored when empty; removed again after the test
    result = runner.invoke(app, ["serve", "--model", "user/model", "--provider", "fal-ai", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert started and started[0]["workers"] == 2
    # Each worker builds its app from the environment: the options travel that way.
    assert os.environ["SDPROXY_MODEL"] == "user/model"
    assert os.environ["SDPROXY_PROVIDER"] == "fal-ai"


def test_check_takes_the_model_as_an_option() -> None:
    result = runner.invoke(app, ["check", "--model", "http://127.0.0.1:7860/models/demo"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:7860/models/demo" in result.output


def test_serve_refuses_a_provider_for_a_url_and_an_unknown_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://127.0.0.1:7860/models/demo"
    for_url = runner.invoke(app, ["serve", "--model", url, "--provider", "fal-ai"], terminal_width=200)
    unknown = runner.invoke(app, ["serve", "--model", "user/model", "--provider", "acme"], terminal_width=200)
    assert for_url.exit_code == unknown.exit_code == 2
    assert "SDPROXY_PROVIDER=fal-ai applies to Hub ids" in for_url.output
    assert "SDPROXY_PROVIDER" in unknown.output and "fal-ai" in unknown.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_runs_uvicorn_with_json_logs(tmp_path: Path, upstream: InferenceTestServer) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<title>studio</title>")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPROXY_") and k != "HF_TOKEN"}
    env.update({"SDPROXY_UPSTREAM_TOKEN": SENTINEL, "NO_COLOR": "1"})
    command = [
        sys.executable,
        "-m",
        "proxy.cli",
        "serve",
        "--model",  # what a newcomer types first: no SDPROXY_MODEL in the environment
        upstream.model_url(MODEL_ID),
        "--port",
        str(port),
        "--static-dir",
        str(tmp_path / "site"),
    ]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "sdproxy serve did not start"
            time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        image = httpx.post(
            f"{base}/generate", json={"prompt": "a fox"}, headers={"X-Request-ID": "cli-1"}, timeout=10
        )
        page = httpx.get(f"{base}/app/", timeout=5)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=15)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert "server" not in image.headers  # no server banner
    assert "studio" in page.text
    assert SENTINEL not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), stderr[:500]
    assert any('"request_id": "cli-1"' in line and '"proxy.access"' in line for line in lines)
    assert not any("a fox" in line for line in lines)  # prompts are logged as length + hash
