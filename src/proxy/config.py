"""Settings of the proxy, read from the environment and `.env`.

Every setting is an environment variable named `SDPROXY_<FIELD>` (for example `SDPROXY_MODEL`),
except the Hugging Face token, which keeps its usual name `HF_TOKEN`. A `.env` file in the working
directory is read too; real environment variables win over it. docs/proxy.md has the full table.

`load_settings()` turns pydantic's validation errors into one `ConfigError` whose message names
the environment variable to fix: the CLI prints it and exits instead of starting an unsafe proxy.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sdclient import ProviderName
from sdclient.protocol import (
    DEFAULT_BASE_URL,
    HUB_ENDPOINT,
    HUB_ID,
    ROUTER_URL,
    is_hf_host,
    is_loopback,
    resolve_token,
)

__all__ = ["ENV_PREFIX", "ConfigError", "IPNetwork", "Settings", "load_settings"]

ENV_PREFIX = "SDPROXY_"
"""Prefix of every environment variable of the proxy, except `HF_TOKEN`."""

MIN_KEY_LENGTH = 16
"""Client API keys and the admin key must be at least this long (they are bearer secrets)."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """The configuration is incomplete or unsafe; the message says which variable to fix and how."""


def _split_list(value: Any) -> Any:
    """Accept a JSON list (`["a", "b"]`) or a comma-separated string (`a,b`) for list settings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Configuration of one proxy process (see docs/proxy.md for the table of variables)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
    )

    hf_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("HF_TOKEN", "hf_token"),
        description="Hugging Face token (env HF_TOKEN), else the one saved by `hf auth login`: "
        "sent to Hugging Face hosts only.",
    )
    upstream_token: SecretStr | None = Field(
        default=None,
        description="Token sent to the upstream whatever its host (a self-hosted server behind "
        "auth); wins over HF_TOKEN.",
    )
    model: str | None = Field(
        default=None,
        description="Hub model id (`user/model`) or the full URL of an endpoint that speaks the protocol.",
    )
    provider: ProviderName = Field(
        default="auto",
        description="Who serves a Hub id: `auto` (the first provider the Hub lists for the model), "
        "or one of `hf-inference`, `fal-ai`, `replicate`, `wavespeed`, `together`, `nscale`.",
    )
    base_url: str | None = Field(
        default=None,
        description="A server of the hf-inference protocol that Hub ids are sent to instead of the "
        f"router ({DEFAULT_BASE_URL}/models/<id> is what `hf-inference` means).",
    )
    router_url: str = Field(default=ROUTER_URL, description="The Inference Providers router.")
    hub_url: str = Field(default=HUB_ENDPOINT, description="The Hub that says which providers serve a model.")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS (`https://app.example.com`); empty: same origin only.",
    )
    allow_credentials: bool = Field(
        default=False, description="Let browsers send cookies/HTTP auth cross-origin (never with `*`)."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="If set, every generate call needs one (`Authorization: Bearer` or `X-API-Key`).",
    )
    admin_key: SecretStr | None = Field(default=None, description="Key for `GET /usage`; unset: disabled.")
    trusted_proxies: Annotated[list[IPNetwork], NoDecode] = Field(
        default_factory=list,
        description="Reverse proxies (IPs/CIDRs) whose `X-Forwarded-For` is believed.",
    )
    ipv6_prefix: int = Field(
        default=64,
        ge=1,
        le=128,
        description="IPv6 clients are one client per network of this prefix length (a /64 is one "
        "home or one host's range), for rate limits, quotas and API-key failures.",
    )
    auth_failures_per_minute: int = Field(
        default=10,
        ge=0,
        description="Wrong API keys a client may send a minute; then every call of that client is "
        "429 `rate_limited` until the minute ends (0: no throttle).",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a connection has to send a request's headers, from its opening or the "
        "previous answer; then it is closed (`sdproxy serve`).",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a request has to send its whole body once its headers are in; then the "
        "connection is closed (`sdproxy serve`).",
    )
    keep_alive_timeout_s: int = Field(
        default=5, ge=1, description="Seconds an idle keep-alive connection is kept (`sdproxy serve`)."
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Connections (or requests in progress) per worker; a request beyond is answered "
        "503 (`sdproxy serve`, uvicorn's `limit_concurrency`).",
    )
    rate_limit_per_minute: float = Field(
        default=10.0, ge=0, description="Token-bucket refill per client, requests a minute (0: off)."
    )
    rate_limit_burst: int = Field(default=5, ge=1, description="Token-bucket size: requests in a burst.")
    daily_quota: int = Field(default=200, ge=0, description="Images per client per UTC day (0: unlimited).")
    max_concurrency: int = Field(default=4, ge=1, description="Upstream calls in flight at once.")
    queue_size: int = Field(default=32, ge=0, description="Requests that may wait for a slot; more: 503.")
    upstream_timeout: float = Field(
        default=120.0, gt=0, description="Seconds to wait for one upstream answer."
    )
    max_wait_for_model: float = Field(
        default=60.0, gt=0, description="Seconds a request may wait for a cold model to load."
    )
    max_retries: int = Field(
        default=2, ge=0, le=10, description="Upstream re-sends after transient failures."
    )
    http_backend: Literal["httpx", "aiohttp"] = Field(
        default="httpx",
        description="What sends upstream: httpx, or aiohttp's connection pool (the `aiohttp` extra).",
    )
    max_body_bytes: int = Field(default=16_384, ge=1024, description="Largest accepted request body.")
    max_megapixel_steps: float = Field(
        default=31.5,
        gt=0,
        description="Cost budget of one request: n x width x height x num_inference_steps / 10^6; "
        "unset fields count as 1024 px and 30 steps, so the default is one 1024x1024 image at 30 "
        "steps (the proxy does not know the model's own resolution).",
    )
    max_images_per_request: int = Field(  # at most schemas.MAX_IMAGES
        default=4, ge=1, le=4, description="Images one request may ask for (`n`)."
    )
    max_prompt_length: int = Field(  # at most schemas.MAX_PROMPT_LENGTH
        default=2000, ge=1, le=2000, description="Longest prompt or negative prompt, in characters."
    )
    cache_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, description="Bytes of images kept for seeded repeats (0: off)."
    )
    coalesce: bool = Field(
        default=True, description="Share one upstream call between identical seeded calls."
    )
    log_prompts: bool = Field(default=False, description="Log prompt text (default: length and hash only).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO")
    static_dir: Path | None = Field(default=None, description="Built web app served at `/app/`.")
    warmup: bool = Field(default=False, description="Send one tiny request at start-up to wake the model.")
    usage_db: Path | None = Field(
        default=None, description="SQLite file for upstream usage (shared by workers)."
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="Keep limits, quotas, cache, coalescing and jobs in Redis, shared by every "
        "instance (`redis://host:6379/0`); unset: in this process's memory.",
    )
    redis_prefix: str = Field(default="sdproxy:", min_length=1, description="Start of every Redis key.")
    fail_open: bool = Field(
        default=False,
        description="When Redis is down, let requests through without rate limits, quotas and the "
        "global cap (logged) instead of answering 503 `store_unavailable`.",
    )
    cache_ttl_s: float = Field(default=3600.0, gt=0, description="Seconds an image stays cached after use.")
    global_max_concurrency: int = Field(
        default=0, ge=0, description="Upstream calls at once over every instance sharing Redis (0: off)."
    )
    key_monthly_budget: int = Field(
        default=0, ge=0, description="Images per API key per calendar month, UTC (0: unlimited)."
    )
    job_ttl_s: float = Field(
        default=3600.0, gt=0, description="Seconds jobs and their images are kept (`/v1/jobs`, `/v1/images`)."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Signs job webhooks (HMAC-SHA256); unset: `webhook_url` is refused."
    )
    webhook_allow_private: bool = Field(
        default=False, description="Allow webhooks to loopback and private addresses (tests, intranets)."
    )
    webhook_max_attempts: int = Field(default=5, ge=1, le=20, description="Deliveries tried per webhook.")
    webhook_backoff_s: float = Field(
        default=1.0, gt=0, description="First pause between webhook attempts; doubles, at most 60 s."
    )

    # -- parsing ---------------------------------------------------------------------------------

    @field_validator("allowed_origins", "api_keys", "trusted_proxies", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
                raise ValueError(
                    f"{origin!r} is not an origin: write scheme://host[:port] with no path or trailing "
                    "slash, e.g. https://app.example.com or http://localhost:5173"
                )
        return origins

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, list):
            try:
                return [ipaddress.ip_network(str(item), strict=False) for item in value]
            except ValueError as exc:
                raise ValueError(f"{exc}; write IP addresses or CIDR blocks such as 10.0.0.0/8") from None
        return value

    # -- safety ----------------------------------------------------------------------------------

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        problems: list[str] = []
        if not self.model:
            problems.append(
                f"{ENV_PREFIX}MODEL is not set: give a Hub model id (user/model) or an endpoint URL "
                "(https://xxxx.endpoints.huggingface.cloud, http://127.0.0.1:7860/models/demo), "
                "in the environment or as `sdproxy serve --model ...`"
            )
        elif "://" in self.model:
            parts = urlsplit(self.model)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problems.append(f"{ENV_PREFIX}MODEL {self.model!r} is not an http(s) URL")
            if self.base_url is not None:
                problems.append(
                    f"{ENV_PREFIX}BASE_URL is set while {ENV_PREFIX}MODEL is a full URL: unset one of them"
                )
            if self.provider not in ("auto", "hf-inference"):
                problems.append(
                    f"{ENV_PREFIX}PROVIDER={self.provider} applies to Hub ids; {ENV_PREFIX}MODEL is a URL "
                    "(one server of the protocol): unset the provider"
                )
        elif self.base_url is not None and self.provider not in ("auto", "hf-inference"):
            problems.append(
                f"{ENV_PREFIX}BASE_URL is a server of the hf-inference protocol: it cannot be used "
                f"with {ENV_PREFIX}PROVIDER={self.provider}; unset one of them"
            )
        elif not HUB_ID.match(self.model):
            problems.append(
                f"{ENV_PREFIX}MODEL {self.model!r} is neither a Hub model id (user/model) nor an http(s) URL"
            )
        if self.base_url is not None:
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problems.append(f"{ENV_PREFIX}BASE_URL {self.base_url!r} is not an http(s) URL")
        if "*" in self.allowed_origins and self.allow_credentials:
            problems.append(
                f"{ENV_PREFIX}ALLOWED_ORIGINS contains '*' while {ENV_PREFIX}ALLOW_CREDENTIALS is true: "
                "any web site could then call the proxy with its visitors' credentials. List the origins "
                "of your web app instead, or turn credentials off"
            )
        for key in self.api_keys:
            if len(key.get_secret_value()) < MIN_KEY_LENGTH:
                problems.append(
                    f"{ENV_PREFIX}API_KEYS: every key must be at least {MIN_KEY_LENGTH} characters "
                    "(generate one with `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
                )
                break
        if self.admin_key is not None and len(self.admin_key.get_secret_value()) < MIN_KEY_LENGTH:
            problems.append(
                f"{ENV_PREFIX}ADMIN_KEY must be at least {MIN_KEY_LENGTH} characters "
                "(generate one with `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
            )
        if self.redis_url is not None:
            parts = urlsplit(self.redis_url.get_secret_value())
            if parts.scheme not in ("redis", "rediss", "unix"):
                problems.append(
                    f"{ENV_PREFIX}REDIS_URL is not a Redis URL: write redis://host:6379/0 "
                    "(rediss:// for TLS, redis://:password@host:6379/0 with a password)"
                )
        if self.webhook_secret is not None and len(self.webhook_secret.get_secret_value()) < MIN_KEY_LENGTH:
            problems.append(
                f"{ENV_PREFIX}WEBHOOK_SECRET must be at least {MIN_KEY_LENGTH} characters "
                "(generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        if self.static_dir is not None and not (self.static_dir / "index.html").is_file():
            problems.append(
                f"{ENV_PREFIX}STATIC_DIR {str(self.static_dir)!r} has no index.html: "
                "point it at the folder of a built web app (e.g. examples/react-app/dist)"
            )
        if self.model and not problems:
            host = urlsplit(self.upstream_url).hostname or ""
            token = self.resolve_token()
            if token is None and is_hf_host(host):
                problems.append(
                    f"no Hugging Face token for {host}: set HF_TOKEN in the environment or in .env, "
                    "or run `hf auth login` as the user that runs the proxy"
                )
            if token is not None and urlsplit(self.upstream_url).scheme == "http" and not is_loopback(host):
                problems.append(
                    f"refusing to send a token over plain http to {host}: use an https URL, "
                    f"or unset {ENV_PREFIX}UPSTREAM_TOKEN for an upstream that needs no token"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- derived values --------------------------------------------------------------------------

    @property
    def upstream_url(self) -> str:
        """The URL that receives the POSTs (the model itself when it is a URL)."""
        model = self.model or ""
        if "://" in model:
            return model
        if self.base_url is not None:
            return f"{self.base_url.rstrip('/')}/models/{model}"
        if self.provider in ("auto", "hf-inference"):
            # `auto` asks the Hub which provider serves the model; hf-inference is the guess shown.
            return f"{self.router_url.rstrip('/')}/hf-inference/models/{model}"
        return f"{self.router_url.rstrip('/')}/{self.provider}"

    @property
    def upstream_is_hf(self) -> bool:
        """Whether the upstream is a Hugging Face host (where a discovered token may be sent)."""
        return is_hf_host(self.upstream_url)

    def resolve_token(self) -> str | None:
        """The token to send upstream, by the client's rule (`sdclient.protocol.resolve_token`):
        `SDPROXY_UPSTREAM_TOKEN` to any upstream; else `HF_TOKEN` (environment or `.env`) or the
        token saved by `hf auth login`, to Hugging Face hosts only.

        Returns:
            The token, or None when there is none for this upstream.
        """
        explicit = self.upstream_token.get_secret_value() if self.upstream_token is not None else None
        env = self.hf_token.get_secret_value() if self.hf_token is not None else None
        return resolve_token(explicit, self.upstream_url, hf_token=env)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment and `.env`, with `overrides` on top.

    Args:
        **overrides: Field values that win over the environment (the CLI's options).

    Returns:
        The validated settings.

    Raises:
        ConfigError: The configuration is incomplete or unsafe; the message names the variables.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            field = str(error["loc"][0])
            name = "HF_TOKEN" if field in ("hf_token", "HF_TOKEN") else ENV_PREFIX + field.upper()
            lines.append(f"{name}: {message}")
        else:
            lines.extend(message.splitlines())
    return "invalid proxy configuration:\n  - " + "\n  - ".join(lines)
