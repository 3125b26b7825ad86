"""Structured logs: JSON lines with the request id, prompts as length + hash, never the token."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
from proxy_harness import SENTINEL, RunningProxy

from proxy.errors import SecretRegistry, current_secrets
from proxy.logs import JSONFormatter
from sdclient.testing import InferenceTestServer, Reply

PROMPT = "portrait of a secret person at their home address"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the proxy's log handler (`sdproxy serve`) writes during the test."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logging.getLogger().addHandler(handler)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_json_with_the_request_id_and_no_prompt_text(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer, json_lines: io.StringIO
) -> None:
    upstream.enqueue(Reply.image(), Reply.error(401, "Invalid credentials in Authorization header"))
    proxy = start_proxy()
    with proxy.client() as client:
        ok = client.post("/generate", json={"prompt": PROMPT, "seed": 1}, headers={"X-Request-ID": "req-ok"})
        failed = client.post("/generate", json={"prompt": PROMPT}, headers={"X-Request-ID": "req-failed"})
    assert ok.status_code == 200 and failed.status_code == 502
    records = _records(json_lines)
    text = json_lines.getvalue()
    assert PROMPT not in text
    assert SENTINEL not in text

    access = [r for r in records if r["logger"] == "proxy.access"]
    assert {(r["request_id"], r["status"]) for r in access} >= {("req-ok", 200), ("req-failed", 502)}
    assert all(isinstance(r["duration_ms"], float) for r in access)

    generated = next(r for r in records if r["msg"] == "generated")
    assert generated["request_id"] == "req-ok"
    assert generated["prompt_len"] == len(PROMPT)
    assert generated["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()[:16]
    assert generated["client"] == "ip:127.0.0.1"
    assert generated["seed"] == 1

    failure = next(r for r in records if r["logger"] == "proxy.generate" and r["level"] == "WARNING")
    assert failure["request_id"] == "req-failed"
    assert failure["code"] == "upstream_auth"


def test_prompt_text_is_logged_only_when_asked(
    start_proxy: Callable[..., RunningProxy], json_lines: io.StringIO
) -> None:
    proxy = start_proxy(log_prompts=True)
    with proxy.client() as client:
        client.post("/generate", json={"prompt": PROMPT})
    generated = next(r for r in _records(json_lines) if r["msg"] == "generated")
    assert generated["prompt"] == PROMPT


def test_formatter_masks_the_current_apps_secrets_as_a_last_line_of_defence() -> None:
    secrets = SecretRegistry()
    secrets.add("hf_secret_for_the_formatter_test")
    record = logging.LogRecord(
        "proxy", logging.ERROR, __file__, 1, "oops %s", ("hf_secret_for_the_formatter_test",), None
    )
    other = current_secrets.set(SecretRegistry())  # another app's registry knows nothing of it
    assert "hf_secret_for_the_formatter_test" in JSONFormatter().format(record)
    current_secrets.reset(other)
    token = current_secrets.set(secrets)
    try:
        line = JSONFormatter().format(record)
    finally:
        current_secrets.reset(token)
    assert "hf_secret_for_the_formatter_test" not in line
    assert json.loads(line)["msg"] == "oops ***"


def test_two_apps_in_one_process_each_mask_their_own_secrets(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    secret_of_a = "admin-key-of-app-a-0123456789"
    upstream.default = Reply.error(400, f"cannot use {secret_of_a} here")
    first, second = start_proxy(admin_key=secret_of_a), start_proxy()
    with first.client() as client:
        masked = client.post("/generate", json={"prompt": "a fox"}).json()["error"]["message"]
    with second.client() as client:
        passed = client.post("/generate", json={"prompt": "a fox"}).json()["error"]["message"]
    assert "cannot use *** here" in masked and secret_of_a not in masked
    assert secret_of_a in passed  # not the second app's secret: its registry does not hold it
