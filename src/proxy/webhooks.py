"""Signed webhooks for finished jobs, the way Stripe and Replicate sign theirs.

Each delivery is a `POST` of a JSON body with the header

    Sdproxy-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body, keyed by the secret>

and `Sdproxy-Webhook-Id` (the job id: the same on every retry, for receivers that deduplicate).
A receiver recomputes the HMAC over the raw body with the deployment's `SDPROXY_WEBHOOK_SECRET`,
compares in constant time, and refuses timestamps older than a few minutes (replays): `verify()`
does exactly that, and examples/node-jobs/jobs.mjs does it in JavaScript.

Deliveries are retried with exponential back-off (and jitter) on connection errors, timeouts,
408, 425, 429 and 5xx; another 4xx means the receiver refused it and is not retried. Redirects are
not followed. Targets that resolve to loopback, private, link-local or reserved addresses are
refused unless `SDPROXY_WEBHOOK_ALLOW_PRIVATE` is set, both when the job is created and at each
delivery (a name may be re-pointed in between); each delivery resolves the name once and connects
to the address that was checked (`Host`, TLS SNI and the certificate check keep the name), so a
name re-pointed between the check and the connect (DNS rebinding) cannot reach a private address.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from .errors import InvalidInput

__all__ = [
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "WebhookRefused",
    "WebhookSender",
    "check_target",
    "sign",
    "verify",
]

logger = logging.getLogger("proxy.webhooks")

SIGNATURE_HEADER = "Sdproxy-Signature"
ID_HEADER = "Sdproxy-Webhook-Id"
TOLERANCE_S = 300
"""`verify()` refuses signatures older (or newer) than this: a captured delivery cannot be replayed."""
DELIVERY_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 60.0
_RETRY_STATUSES = frozenset({408, 425, 429})


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `Sdproxy-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: str, body: bytes, header: str, *, tolerance_s: float = TOLERANCE_S, now: float | None = None
) -> bool:
    """Whether `header` is a valid signature of `body` made less than `tolerance_s` ago."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class WebhookRefused(Exception):
    """The receiver answered a status that says not to try again."""


class _Retryable(Exception):
    """The receiver answered a status worth retrying."""


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_target(url: str, *, allow_private: bool) -> list[str]:
    """Refuse a webhook URL that is not http(s), or whose host resolves to a non-public address.

    Returns:
        The addresses the host resolved to, all public, in the resolver's order; empty when
        `allow_private` (nothing is resolved then).

    Raises:
        InvalidInput: The URL is unusable or points at a loopback/private/reserved address.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"webhook_url: {url!r} is not an http(s) URL")
    if allow_private:
        return []
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port or 443)
    except OSError:
        raise InvalidInput(f"webhook_url: the host {parts.hostname!r} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    private = sorted(address for address in addresses if not _is_public(address))
    if private:
        raise InvalidInput(
            f"webhook_url: {parts.hostname} resolves to a loopback, private or reserved address "
            f"({', '.join(private)}); webhooks go to public addresses only "
            "(the operator may allow others with SDPROXY_WEBHOOK_ALLOW_PRIVATE=true)"
        )
    if not addresses:
        raise InvalidInput(f"webhook_url: the host {parts.hostname!r} does not resolve")
    return addresses


def _pinned_request(url: str, address: str) -> tuple[httpx.URL, str, dict[str, Any]]:
    """`url` with its host replaced by the checked `address`, and what keeps the original name.

    Returns:
        The URL to connect to (an IPv6 address in brackets), the `Host` header (the original host,
        with its port when not the scheme's default) and the request extensions: for https,
        `sni_hostname`, which httpcore uses for TLS SNI and the certificate's hostname check.
    """
    original = httpx.URL(url)
    extensions: dict[str, Any] = {}
    if original.scheme == "https":
        extensions["sni_hostname"] = original.raw_host.decode("ascii")
    return original.copy_with(host=address), original.netloc.decode("ascii"), extensions


class WebhookSender:
    """Delivers signed webhooks with retries.

    Args:
        secret: The deployment's signing secret.
        allow_private: Allow loopback and private targets.
        max_attempts: Deliveries tried before giving up.
        backoff_s: First pause between attempts (doubled each time, with jitter, at most 60 s).
    """

    def __init__(self, secret: str, *, allow_private: bool, max_attempts: int, backoff_s: float) -> None:
        self.secret = secret
        self.allow_private = allow_private
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.delivered = 0
        self.failed = 0
        # No kept-alive connections: a pooled connection is keyed by the address, and must not
        # carry a delivery for another name (its TLS session was verified for the first one).
        self._http = httpx.AsyncClient(
            timeout=DELIVERY_TIMEOUT_S,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def deliver(self, url: str, webhook_id: str, payload: dict[str, Any]) -> bool:
        """POST `payload` to `url`, signed, retrying transient failures.

        Returns:
            Whether a delivery was accepted (2xx).
        """
        body = json.dumps(payload, separators=(",", ":")).encode()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential_jitter(
                multiplier=self.backoff_s, max=MAX_BACKOFF_S, jitter=self.backoff_s / 2
            ),
            retry=retry_if_exception_type((httpx.TransportError, _Retryable)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._send(url, webhook_id, body, attempt.retry_state.attempt_number)
        except (httpx.TransportError, _Retryable, WebhookRefused, InvalidInput) as exc:
            self.failed += 1
            logger.warning("webhook not delivered: %s", exc, extra={"webhook_id": webhook_id})
            return False
        self.delivered += 1
        return True

    async def _send(self, url: str, webhook_id: str, body: bytes, attempt: int) -> None:
        addresses = await check_target(url, allow_private=self.allow_private)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body, int(time.time())),
            ID_HEADER: webhook_id,
            "User-Agent": "sdproxy-webhook",
        }
        target: httpx.URL | str = url
        extensions: dict[str, Any] = {}
        if addresses:  # connect to the address that was checked, not to the name again
            target, headers["Host"], extensions = _pinned_request(url, addresses[0])
        response = await self._http.post(target, content=body, headers=headers, extensions=extensions)
        status = response.status_code
        if 200 <= status < 300:
            logger.info("webhook delivered", extra={"webhook_id": webhook_id, "attempt": attempt})
            return
        if status >= 500 or status in _RETRY_STATUSES:
            raise _Retryable(f"HTTP {status} on attempt {attempt}")
        raise WebhookRefused(f"the receiver refused it with HTTP {status}")
