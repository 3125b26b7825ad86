"""Settings from the environment and `.env`; unsafe or incomplete configurations are refused."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import huggingface_hub
import pytest
from proxy_harness import SENTINEL

from proxy import ConfigError, Settings, create_app, load_settings
from sdclient.protocol import resolve_token


def test_environment_with_prefix_and_hf_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setenv("SDPROXY_MODEL", "user/sd-model")
    monkeypatch.setenv("SDPROXY_ALLOWED_ORIGINS", "https://app.example.com, http://localhost:5173")
    monkeypatch.setenv("SDPROXY_TRUSTED_PROXIES", '["10.0.0.0/8", "127.0.0.1"]')
    monkeypatch.setenv("SDPROXY_MAX_CONCURRENCY", "8")
    monkeypatch.setenv("SDPROXY_LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.hf_token is not None and settings.hf_token.get_secret_value() == SENTINEL
    assert settings.upstream_url == "https://router.huggingface.co/hf-inference/models/user/sd-model"
    assert settings.allowed_origins == ["https://app.example.com", "http://localhost:5173"]
    assert settings.trusted_proxies == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
    ]
    assert settings.max_concurrency == 8
    assert settings.log_level == "DEBUG"
    assert SENTINEL not in repr(settings) + str(settings)


def test_dotenv_file_is_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(
        f"HF_TOKEN={SENTINEL}\nSDPROXY_MODEL=user/from-dotenv\nSDPROXY_QUEUE_SIZE=3\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDPROXY_QUEUE_SIZE", "5")
    settings = load_settings()
    assert settings.model == "user/from-dotenv"
    assert settings.queue_size == 5
    assert settings.resolve_token() == SENTINEL


def test_token_saved_by_hf_login_is_used_for_hugging_face_hosts_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SENTINEL)
    assert load_settings(model="user/sd-model").resolve_token() == SENTINEL
    assert load_settings(model="https://abc.endpoints.huggingface.cloud").resolve_token() == SENTINEL
    assert load_settings(model="http://127.0.0.1:7860/models/demo").resolve_token() is None


def test_local_upstream_runs_without_a_token() -> None:
    settings = load_settings(model="http://127.0.0.1:7860/models/demo")
    assert settings.resolve_token() is None
    assert settings.upstream_url == "http://127.0.0.1:7860/models/demo"


def test_defaults_are_safe() -> None:
    settings = load_settings(model="http://127.0.0.1:7860/models/demo")
    assert settings.allowed_origins == []
    assert not settings.allow_credentials
    assert settings.trusted_proxies == []
    assert not settings.log_prompts
    assert settings.rate_limit_per_minute > 0 and settings.daily_quota > 0


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({}, "SDPROXY_MODEL is not set"),
        ({"model": "user/sd-model"}, "no Hugging Face token for router.huggingface.co"),
        ({"model": "not a model id"}, "neither a Hub model id"),
        ({"model": "ftp://example.com/x"}, "not an http(s) URL"),
        ({"model": "http://x.example/m", "base_url": "http://y.example"}, "unset one of them"),
        (
            {"model": "http://gpu.example.com/models/m", "upstream_token": SENTINEL},
            "refusing to send a token over plain http to gpu.example.com",
        ),
        (
            {"model": "http://127.0.0.1:1/m", "allowed_origins": ["*"], "allow_credentials": True},
            "SDPROXY_ALLOWED_ORIGINS contains '*' while SDPROXY_ALLOW_CREDENTIALS is true",
        ),
        (
            {"model": "http://127.0.0.1:1/m", "allowed_origins": ["http://localhost:5173/"]},
            "no path or trailing",
        ),
        ({"model": "http://127.0.0.1:1/m", "allowed_origins": ["localhost:5173"]}, "is not an origin"),
        ({"model": "http://127.0.0.1:1/m", "api_keys": ["short"]}, "SDPROXY_API_KEYS: every key must be"),
        ({"model": "http://127.0.0.1:1/m", "admin_key": "short"}, "SDPROXY_ADMIN_KEY must be at least 16"),
        ({"model": "http://127.0.0.1:1/m", "trusted_proxies": ["not-an-ip"]}, "SDPROXY_TRUSTED_PROXIES"),
        ({"model": "http://127.0.0.1:1/m", "max_concurrency": 0}, "SDPROXY_MAX_CONCURRENCY"),
        ({"model": "http://127.0.0.1:1/m", "static_dir": "/nonexistent"}, "has no index.html"),
    ],
)
def test_unsafe_or_incomplete_configuration_is_refused(overrides: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    message = str(caught.value)
    assert says in message
    assert message.startswith("invalid proxy configuration:")
    assert SENTINEL not in message


def test_create_app_reads_the_environment_and_refuses_a_bad_one(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="SDPROXY_MODEL is not set"):
        create_app()
    monkeypatch.setenv("SDPROXY_MODEL", "http://127.0.0.1:7860/models/demo")
    assert create_app().title == "sdproxy"


def test_settings_can_be_built_directly() -> None:
    settings = Settings(model="http://127.0.0.1:1/m", upstream_token=SENTINEL, _env_file=None)  # type: ignore[call-arg]
    assert settings.resolve_token() == SENTINEL
    assert "**********" in repr(settings.upstream_token)


def test_hf_token_follows_the_clients_rule_hugging_face_hosts_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    local = load_settings(model="http://127.0.0.1:7860/models/demo")
    assert local.resolve_token() is None  # a discovered token never goes to another host
    assert load_settings(model="user/sd-model").resolve_token() == SENTINEL
    assert load_settings(model="https://abc.endpoints.huggingface.cloud").resolve_token() == SENTINEL
    # The same rule as the client's, from the same function.
    for url in ("http://127.0.0.1:7860/models/demo", "https://abc.endpoints.huggingface.cloud"):
        assert load_settings(model=url).resolve_token() == resolve_token(None, url)
    explicit = load_settings(model="http://127.0.0.1:7860/models/demo", upstream_token="other-token")
    assert explicit.resolve_token() == "other-token"
