"""Schemathesis against the proxy's own OpenAPI schema: whatever a client sends, no 5xx, and every
answer conforms to the schema (status codes, content types, bodies). The token never comes back."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from proxy_harness import MODEL_ID, SENTINEL

from proxy import Settings, create_app
from sdclient.testing import InferenceTestServer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The schema is loaded at import time, so the upstream's address is chosen now and the upstream
# itself starts with the module's tests (the proxy only connects when a request comes).
UPSTREAM_PORT = _free_port()
app = create_app(
    Settings(  # type: ignore[call-arg]
        model=f"http://127.0.0.1:{UPSTREAM_PORT}/models/{MODEL_ID}",
        upstream_token=SENTINEL,
        admin_key="admin-key-for-the-fuzz-test-0123",
        allowed_origins=["http://localhost:5173"],
        rate_limit_per_minute=0,
        daily_quota=0,
        # The schema cannot say width x height x steps; a budget above the largest schema-valid
        # request (1024 x 1024 x 150) keeps every such request acceptable (test_hardening.py).
        max_megapixel_steps=160,
        _env_file=None,
    )
)
# The job and OpenAI routes are tested by hand (test_jobs.py, test_openai.py): a schema-valid
# `webhook_url` is refused by design when webhooks are off, which the fuzzer takes for a fault.
schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path_regex="^/v1/")
# A body over the size limit is rejected with 413 before it is parsed: a rejection like 422.
_rejection = schema.config.checks.negative_data_rejection
_rejection.expected_statuses = [*_rejection.expected_statuses, "413"]


@pytest.fixture(scope="module", autouse=True)
def upstream_for_fuzz() -> Iterator[InferenceTestServer]:
    with InferenceTestServer(port=UPSTREAM_PORT, model_id=MODEL_ID, keep_records=False) as server:
        yield server


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema_and_never_fails_with_5xx(case: Any) -> None:
    response = case.call_and_validate()
    assert response.status_code < 500, response.text  # a healthy upstream: no 5xx of any kind
    assert SENTINEL.encode() not in response.content
    assert all(SENTINEL not in value for value in response.headers.values())
