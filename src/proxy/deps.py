"""What the routes depend on: the app's state, who the caller is, and the access checks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, TypedDict, TypeVar

from fastapi import Depends, Request

from .config import IPNetwork, Settings
from .errors import NotFound, NotReady, ProxyError, SecretRegistry, Unauthorized
from .limits import ClientLimiter
from .service import GenerationService
from .store import Admitted, Store

if TYPE_CHECKING:
    from .jobs import JobManager

T = TypeVar("T")

__all__ = [
    "AdminDep",
    "Admission",
    "AdmissionDep",
    "AppState",
    "ClientGone",
    "LifespanState",
    "StateDep",
    "StreamAdmissionDep",
    "admit",
    "admit_caller",
    "admit_settled",
    "client_ip",
    "client_network",
    "get_state",
    "identify_caller",
    "while_connected",
]


@dataclass
class AppState:
    """Everything one app instance (one worker process) holds while it runs."""

    settings: Settings
    store: Store
    service: GenerationService
    limiter: ClientLimiter
    jobs: JobManager
    secrets: SecretRegistry
    started: bool = False


class LifespanState(TypedDict):
    """What the app's lifespan yields: Starlette hands it to every request (`request.state`) and
    to the middleware (`scope["state"]`)."""

    proxy: AppState


# Dependencies are `async def` even where they do not await: FastAPI runs plain `def` dependencies
# in a thread pool, a thread hand-off per request for nothing.


async def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.state, "proxy", None)
    if state is None:
        raise NotReady("The proxy is not started yet.")
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _in_networks(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(request: Request, trusted_proxies: Sequence[IPNetwork]) -> str:
    """The caller's IP address.

    `X-Forwarded-For` is only believed when the direct peer is a trusted proxy; it is then read
    from the right, skipping trusted proxies: the first address that is not one is the client,
    so a client cannot pick its own address by sending the header itself. When every entry is
    trusted, the last one (written by the peer) is the client, never the first (which the client
    may have written).
    """
    peer = request.client.host if request.client else "unknown"
    if not trusted_proxies or not _in_networks(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for hop in request.headers.get("x-forwarded-for", "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _in_networks(hop, trusted_proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a garbled header: fall back to the proxy that sent it
    # Every entry is a trusted address (so a valid one): the client is inside a trusted range.
    # Only the last entry, written by the trusted peer, is believed; the client may have written
    # the ones before it.
    return str(ipaddress.ip_address(hops[-1])) if hops else peer


def client_network(address: str, ipv6_prefix: int) -> str:
    """What limits are kept under for a client address: an IPv4 address as it is, an IPv6 one as
    its network of `ipv6_prefix` bits (`2001:db8:1:2::/64`). One IPv6 host or home is given a
    whole /64 and may pick any address in it: per address, it would get a fresh bucket per request.
    An IPv4-mapped IPv6 address (`::ffff:203.0.113.7`) is its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


class ClientGone(ProxyError):
    """The caller closed its connection before the answer was ready (499, nginx's code: only
    logged, as nobody receives it)."""

    status_code, code = 499, "client_closed_request"

    def __init__(self) -> None:
        super().__init__("The caller closed the connection before the answer was ready.")


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Run `work` until it is done or the caller goes away, whichever comes first; in the second
    case `work` is cancelled (a generation nobody waits for stops and frees its slot, unless
    another request shares it). A streamed answer needs none of this: Starlette cancels the
    stream when its caller goes away.

    Raises:
        ClientGone: The caller closed the connection first.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        gone.cancel()
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return once the caller has closed the connection (the body was read before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _presented_key(request: Request, header: str) -> str | None:
    value = request.headers.get(header)
    if value:
        return value.strip()
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def _matches(presented: str, secret: str) -> bool:
    return hmac.compare_digest(presented.encode(), secret.encode())


def _client_address(request: Request, state: AppState) -> str:
    settings = state.settings
    return client_network(client_ip(request, settings.trusted_proxies), settings.ipv6_prefix)


async def _check_key(request: Request, state: AppState, header: str, secrets: Sequence[str]) -> str | None:
    """The presented key (None when there is none) if it is one of `secrets`; a wrong one counts
    against the client address's throttle on wrong keys, which applies first.

    Raises:
        RateLimitExceeded: The address sent too many wrong keys this minute.
        Unauthorized: The key is wrong.
    """
    address = _client_address(request, state)
    await state.limiter.check_auth_failures(address)
    presented = _presented_key(request, header)
    if presented is None:
        return None
    if not any(_matches(presented, secret) for secret in secrets):
        await state.limiter.auth_failed(address)
        raise Unauthorized("Unknown API key." if header == "x-api-key" else "The admin key is wrong.")
    return presented


async def identify_caller(request: Request, state: AppState) -> str:
    """The id that rate limits, quotas and counts are kept under: `key:<hash>` of the caller's API
    key when keys are configured (and a valid one is required), else `ip:<address>` (an IPv6
    client's network, see `client_network`).

    Raises:
        Unauthorized: Keys are configured and the request has none, or an unknown one.
        RateLimitExceeded: Keys are configured and the client's address sent too many wrong
            ones this minute (`SDPROXY_AUTH_FAILURES_PER_MINUTE`).
    """
    keys = state.settings.api_keys
    if keys:
        presented = await _check_key(request, state, "x-api-key", [key.get_secret_value() for key in keys])
        if presented is None:
            raise Unauthorized(
                "An API key is required: send it as `Authorization: Bearer <key>` or `X-API-Key`."
            )
        return "key:" + hashlib.sha256(presented.encode()).hexdigest()[:12]
    return "ip:" + _client_address(request, state)


async def require_admin(request: Request, state: StateDep) -> None:
    """Let the request through only with the admin key (`Authorization: Bearer` or `X-Admin-Key`).

    Raises:
        NotFound: No admin key is configured.
        Unauthorized: The key is missing or wrong.
        RateLimitExceeded: The client's address sent too many wrong keys this minute.
    """
    admin_key = state.settings.admin_key
    if admin_key is None:
        raise NotFound("This endpoint is disabled: set SDPROXY_ADMIN_KEY to enable it.")
    if await _check_key(request, state, "x-admin-key", [admin_key.get_secret_value()]) is None:
        raise Unauthorized("The admin key is missing or wrong.")


AdminDep = Depends(require_admin)


@dataclass
class Admission:
    """A generate call that passed the API-key check and the rate limit, and holds its images of
    the caller's quota and budget until `deliver()` (answered) or `release()` (not answered).
    Settling twice does nothing: an image is never charged twice."""

    state: AppState
    caller: str
    held: Admitted
    settled: bool = False

    async def deliver(self) -> None:
        """The images were answered: count them against the caller's quota."""
        if not self.settled:
            self.settled = True
            await self.state.limiter.deliver(self.held)

    async def release(self) -> None:
        """No image was answered: give the held images back."""
        if not self.settled:
            self.settled = True
            await self.state.limiter.release(self.held)


async def admit_caller(state: AppState, caller: str, images: int = 1) -> Admission:
    """Apply the caller's rate limit and hold `images` of its quota and budget (one store call).

    Raises:
        RateLimitExceeded: The caller's bucket is empty.
        QuotaExceeded: The caller has used today's images or its key's monthly budget.
        StoreUnavailable: The store cannot be reached (and fail-open is off).
    """
    return Admission(state, caller, await state.limiter.admit(caller, images))


async def admit(request: Request) -> Admission:
    """Identify the caller, count the request, apply its rate limit and hold one image of its
    daily quota. One flat dependency: each dependency FastAPI resolves costs time per request.
    (A full queue was answered before, by `LoadSheddingMiddleware`.)

    Raises:
        NotReady: The app has not started.
        Unauthorized: API keys are configured and the request has none, or an unknown one.
        RateLimitExceeded: The caller's bucket is empty.
        QuotaExceeded: The caller has used today's images.
        StoreUnavailable: The store cannot be reached (and fail-open is off).
    """
    state = await get_state(request)
    return await admit_caller(state, await identify_caller(request, state))


async def admit_settled(request: Request) -> AsyncIterator[Admission]:
    """`admit`, with the held image given back unless the route settled the admission: FastAPI
    validates the body *after* its dependencies, so a request answered 422 (or failing in any way
    before the route runs, or a stream ending without an image) is charged nothing of the quota.
    It was counted and rate limited like any other request: invalid requests cost a token."""
    admission = await admit(request)
    try:
        yield admission
    finally:
        await admission.release()


AdmissionDep = Annotated[Admission, Depends(admit_settled)]
"""For `/generate`, which settles the admission itself (`deliver` or `release`)."""

StreamAdmissionDep = Annotated[Admission, Depends(admit_settled)]
"""For `/generate/stream`: a dependency with teardown, as the stream outlives the route call."""
