"""The HTTP app's gate: who is calling (API key or loopback), what they may do (scopes), and how
much (per-key limits). An ASGI middleware, so it covers every route and mounted sub-app of the
app the Ingress serves, whether under `serve run`, `genserve serve` or KubeRay.

Every route needs a key unless it is on the public allow-list (`PUBLIC_PATHS`, `PUBLIC_PREFIXES`):
a route added later is protected without anyone remembering to protect it. Safe methods (GET,
HEAD) need `read`; every other method needs `generate`; `/v1/admin/` needs `admin` (which implies
the others); OPTIONS is a read. A job file URL signed by `sign_path` is served without a key until
it expires or the key that asked for it stops being usable, for browsers loading `<img src>`;
such downloads are limited per client address.

Without a keys file, only callers on this machine are answered (loopback, and not forwarded by a
proxy: `is_local`), as one local owner with every scope; others get 403 saying how to add keys.
`auth.allow_unauthenticated` answers every caller as that owner, without the admin scope.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from deployments.names import SCOPES
from serve_app.config import ClientLimits
from serve_app.security.keys import RESERVED_ID, KeyEntry, KeyLimits, KeyRing
from serve_app.security.limiter import KeyLimiter, LimitExceeded

logger = logging.getLogger("ray.serve")

# Liveness/readiness and the A2A Agent Card. Not /healthz: it asks every deployment for its info,
# and shows what they loaded (it needs `read`).
PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/.well-known/agent.json", "/.well-known/agent-card.json"})
# The docs pages and the schema they load: public while the app serves the docs (`auth.docs`, off by
# default with keys); otherwise the pages do not exist and the schema needs `admin`.
OPENAPI_PATH = "/openapi.json"
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", OPENAPI_PATH})
# The console's static files (GET only); the console calls /v1 with a key like any client.
PUBLIC_PREFIXES = ("/ui/",)
PUBLIC_GET_PATHS = frozenset({"/ui"})
SAFE_METHODS = frozenset({"GET", "HEAD"})
READ_METHODS = SAFE_METHODS | {"OPTIONS"}  # change nothing: the `read` scope, and never a synchronous request
ADMIN_PREFIX = "/v1/admin/"
JOBS_PREFIX = "/v1/jobs"
FILE_ROUTE = "/files/"
LOCAL_OWNER = RESERVED_ID  # the owner of jobs made without keys (on this machine, or allow_unauthenticated)

UNAUTHORIZED = "missing or invalid API key: send `Authorization: Bearer <key>`"
NO_KEYS = ("this service has no API keys configured, so it answers only clients on its own machine (loopback, "
           "not forwarded by a proxy). "
           "To serve other clients, create a key with `genserve keys create NAME --file keys.yaml` and set "
           "auth.keys_file: keys.yaml in the config (docs/security.md); or, on a network you trust, set "
           "auth.allow_unauthenticated: true.")


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a key id (or the local owner), its scopes and limits."""

    key_id: str
    scopes: frozenset[str]
    limits: KeyLimits = field(default_factory=KeyLimits)
    signed_url: bool = False  # a signed file URL: the signature, not a key, grants that one file
    group: str | None = None  # whose share of the GPU its work runs in (keys file `group`, else the key)

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def sees(self, owner: str | None) -> bool:
        """Whether this caller may see a job of `owner`: its own, or any with admin (or a signed URL)."""
        return self.admin or self.signed_url or owner == self.key_id

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or self.admin


LOCAL = Principal(LOCAL_OWNER, frozenset(SCOPES))  # a caller on this machine, without keys
# auth.allow_unauthenticated: every caller; never admin, since any of them may be anyone.
OPEN = Principal(LOCAL_OWNER, frozenset(SCOPES) - {"admin"})


def required_scope(method: str, path: str) -> str:
    if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/") or path == OPENAPI_PATH:
        return "admin"  # the schema is reached here only with the docs off (else it is public)
    return "read" if method in READ_METHODS else "generate"


def is_public(method: str, path: str, docs: bool = True) -> bool:
    """Whether `path` needs no key; `docs`: whether the app serves the docs pages (app.state.docs)."""
    if path in PUBLIC_PATHS or (docs and path in DOCS_PATHS):
        return True
    return method in SAFE_METHODS and (path in PUBLIC_GET_PATHS or path.startswith(PUBLIC_PREFIXES))


# Headers by which a proxy says it forwards another client's request (uvicorn, so also Ray's HTTP
# proxy, applies X-Forwarded-For sent from 127.0.0.1 and ::1 by default).
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})


def is_local(scope) -> bool:
    """A caller on this machine itself, which without keys may act as the local owner: its address
    is loopback and no proxy header says it speaks for another client. Without such a header no
    middleware has replaced the client, so the address is the TCP peer the server saw; with one,
    the request came through a proxy (nginx, a sidecar, a port-forward), and its client is not
    local whatever address the header names."""
    if any(name in FORWARDING_HEADERS for name, _ in scope.get("headers", ())):
        return False
    return is_loopback(scope.get("client"))


def is_loopback(client) -> bool:
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:  # a unix socket path, or a name: not an address we can vouch for
        return False


def principal(request) -> Principal:
    """The caller of a request (a FastAPI dependency); LOCAL when the app runs without the gate."""
    return getattr(request.state, "principal", None) or LOCAL


async def charge_images(request, images: int) -> None:
    """Charge a synchronous request's images (a video: its frames) to its key's daily budget."""
    auth = request_auth(request)
    if auth is not None:
        await auth.charge_images(principal(request), images)


def request_auth(request) -> "Auth | None":
    return getattr(request.app.state, "auth", None)


class Auth:
    """One Ingress replica's keys, limiter, URL signer and usage metrics."""

    def __init__(self, keys_file: str | None, allow_unauthenticated: bool = False, limits_storage: str = "memory://",
                 signed_url_ttl_s: float = 3600.0, metrics: bool = True, hold_s: float = 1200.0,
                 client_limits: ClientLimits | None = None, signed_downloads_per_minute: int | None = 600,
                 storage_password: str | None = None):
        self.keys = KeyRing(keys_file) if keys_file else None
        self.allow_unauthenticated = allow_unauthenticated
        self.client_limits = client_limits or ClientLimits()
        limited = self.client_limits.concurrent_requests is not None or self.client_limits.requests_per_minute is not None
        self.limiter = (KeyLimiter(limits_storage, hold_s=hold_s, password=storage_password)
                        if self.keys is not None or limited else None)
        self.signed_url_ttl_s = signed_url_ttl_s
        self.signed_downloads_per_minute = signed_downloads_per_minute
        self._requests = None
        if metrics and self.keys is not None:
            from ray.serve.metrics import Counter

            # Tagged by key id: bounded by the keys file, never by request data.
            self._requests = Counter("genserve_key_requests", description="API requests by key id and outcome.",
                                     tag_keys=("key_id", "outcome"))

    @classmethod
    def from_config(cls, config, limits_storage: str, metrics: bool = True, hold_s: float = 1200.0,
                    storage_password: str | None = None) -> "Auth":
        return cls(config.keys_file, config.allow_unauthenticated, limits_storage, config.signed_url_ttl_s,
                   metrics=metrics, hold_s=hold_s, client_limits=config.client_limits,
                   signed_downloads_per_minute=config.signed_downloads_per_minute,
                   storage_password=storage_password)

    def count(self, key_id: str, outcome: str) -> None:
        if self._requests is not None:
            self._requests.inc(tags={"key_id": key_id, "outcome": outcome})

    async def _limiter_call(self, function, *args):
        # memory:// is a dict under a lock; a network store is called off the event loop.
        if self.limiter.local:
            return function(*args)
        return await asyncio.to_thread(function, *args)

    async def admit(self, client: str, limits: KeyLimits, sync: bool, who: str = "this key") -> str | None:
        """Count a request of `client` (a key id, or `addr:<address>`) against its limits: its own
        `limits` on every request, and on a synchronous one the per-client limits (a key's own
        concurrent_requests replaces the default). Raises LimitExceeded; returns the concurrency
        hold to give back with `release` when the request ends (None: it holds none)."""
        if self.limiter is None:
            return None
        await self._limiter_call(self.limiter.hit_request, client, limits)
        if not sync:
            return None
        await self._limiter_call(self.limiter.hit_sync, client, self.client_limits.requests_per_minute)
        acquire = (self.limiter.acquire, client, limits, self.client_limits.concurrent_requests, who)
        if self.limiter.local:
            return acquire[0](*acquire[1:])
        taking = asyncio.ensure_future(asyncio.to_thread(*acquire))
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            # The request was cancelled (its client left) while the thread took the hold: the
            # thread goes on regardless, so give back whatever it takes, or the slot stays held.
            taking.add_done_callback(lambda done: self._give_back_late(client, done))
            raise

    def _give_back_late(self, client: str, taking: asyncio.Future) -> None:
        if not taking.cancelled() and taking.exception() is None and taking.result() is not None:
            asyncio.get_running_loop().run_in_executor(None, self.limiter.release, client, taking.result())

    async def release(self, client: str, hold: str) -> None:
        """Give back a concurrency hold `admit` returned."""
        await self._limiter_call(self.limiter.release, client, hold)

    async def admit_download(self, address: str) -> None:
        """Count a signed file download of a client address (raises LimitExceeded)."""
        if self.limiter is not None:
            await self._limiter_call(self.limiter.hit_download, address, self.signed_downloads_per_minute)

    async def charge_images(self, who: Principal, images: int) -> None:
        """Charge a request's images against its key's daily budget (raises LimitExceeded)."""
        if self.limiter is not None and who.key_id != LOCAL_OWNER:
            await self._limiter_call(self.limiter.charge_images, who.key_id, who.limits, images)

    async def refund_images(self, who: Principal, images: int) -> None:
        if self.limiter is not None and who.key_id != LOCAL_OWNER:
            await self._limiter_call(self.limiter.refund_images, who.key_id, who.limits, images)

    # Signed file URLs

    def _secret(self) -> bytes | None:
        return None if self.keys is None else self.keys.signing_secret()

    def sign_path(self, path: str, key_id: str, now: float | None = None) -> str:
        """`path` with `expires`, `kid` and `sig` query parameters; unchanged when there is nothing to
        sign with. The signature covers the key id that asked, so the URL dies with that key."""
        secret = self._secret()
        if secret is None:
            return path
        expires = int((time.time() if now is None else now) + self.signed_url_ttl_s)
        sig = _signature(secret, path, expires, key_id)
        return f"{path}?{urlencode({'expires': expires, 'kid': key_id, 'sig': sig})}"

    def signed(self, path: str, query: bytes, now: float | None = None) -> KeyEntry | None:
        """The key a valid signed URL was made for, while that key is usable and may read; else None.
        Nothing the query holds reaches `compare_digest` unless it is 64 hex digits (ASCII): any
        other str would make it raise TypeError, a 500 for a crafted URL."""
        secret = self._secret()
        if secret is None or not query:
            return None
        params = parse_qs(query.decode("latin-1"))
        try:
            expires = int(params["expires"][0])
            key_id = params["kid"][0]
            sig = params["sig"][0]
        except (KeyError, IndexError, ValueError):
            return None
        now = time.time() if now is None else now
        if expires < now or not _HEX64.fullmatch(sig):
            return None
        if not hmac.compare_digest(sig.lower().encode("ascii"), _signature(secret, path, expires, key_id).encode()):
            return None
        entry = self.keys.usable_entry(key_id, now)  # and it may still read what it signed
        return entry if entry is not None and {"read", "admin"} & set(entry.scopes) else None


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _signature(secret: bytes, path: str, expires: int, key_id: str) -> str:
    return hmac.new(secret, f"{path}\n{expires}\n{key_id}".encode(), hashlib.sha256).hexdigest()


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def route_path(scope) -> str:
    """The path the app routes on: without the root path Serve sets for a route prefix."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


async def _answer(send, status: int, body: dict, headers: dict[str, str] | None = None, scope=None) -> None:
    if scope is not None and scope["type"] == "websocket":
        # Refused before the handshake is accepted: the server answers the upgrade with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": body["detail"][:120]})
        return
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def limit_response_headers(error: LimitExceeded) -> dict[str, str]:
    return {"Retry-After": str(error.retry_after()), "RateLimit-Limit": str(error.value),
            "X-RateLimit-Reset": str(int(error.reset_at))}


class Guard:
    """ASGI middleware: authenticate, authorise and rate-limit every HTTP request (and WebSocket)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        auth: Auth | None = getattr(scope["app"].state, "auth", None) if "app" in scope else None
        method = scope.get("method", "GET")
        path = route_path(scope)
        # OPTIONS is a request like any other here. A CORS preflight, when auth.cors_origins is set,
        # is answered by CORSMiddleware outside this gate and never reaches it.
        docs = getattr(scope["app"].state, "docs", True) if "app" in scope else True
        if is_public(method, path, docs):
            return await self.app(scope, receive, send)
        keys = auth.keys if auth is not None else None
        sync = method not in READ_METHODS and not path.startswith((JOBS_PREFIX, ADMIN_PREFIX))
        if keys is None:
            if auth is not None and auth.allow_unauthenticated:
                who = OPEN
            elif is_local(scope):
                who = LOCAL
            else:
                return await _answer(send, 403, {"detail": NO_KEYS}, scope=scope)
            needed = required_scope(method, path)
            if not who.allows(needed):
                return await _answer(send, 403, {"detail": f"{method} {path} needs the {needed!r} scope, which "
                                                           "auth.allow_unauthenticated never grants; use API keys",
                                                 "scope": needed}, scope=scope)
            scope.setdefault("state", {})["principal"] = who
            if auth is None or auth.limiter is None:
                return await self.app(scope, receive, send)
            # No key to tell clients apart: each remote address is one client.
            return await self._limited(auth, client_address(scope), KeyLimits(), sync, "this client address",
                                       scope, receive, send)
        signer = (auth.signed(path, scope.get("query_string", b""))
                  if method in SAFE_METHODS and path.startswith(JOBS_PREFIX + "/") and FILE_ROUTE in path else None)
        if signer is not None:  # the signature is the grant, while the key that asked for it is usable
            scope.setdefault("state", {})["principal"] = Principal(signer.id, frozenset({"read"}), signed_url=True)
            try:
                await auth.admit_download(client_address(scope))
            except LimitExceeded as error:
                return await _answer(send, 429, error.body(), limit_response_headers(error), scope=scope)
            return await self.app(scope, receive, send)
        token = _bearer(scope.get("headers", []))
        entry = keys.authenticate(token) if token is not None else None
        if entry is None:
            auth.count("", "unauthorized")
            return await _answer(send, 401, {"detail": UNAUTHORIZED}, {"WWW-Authenticate": 'Bearer realm="genserve"'},
                                 scope=scope)
        needed = required_scope(method, path)
        who = Principal(entry.id, frozenset(entry.scopes), entry.limits, group=entry.fair_group)
        if not who.allows(needed):
            auth.count(entry.id, "forbidden")
            return await _answer(send, 403, {"detail": f"this API key lacks the {needed!r} scope, which "
                                                       f"{method} {path} needs", "scope": needed}, scope=scope)
        scope.setdefault("state", {})["principal"] = who
        return await self._limited(auth, who.key_id, who.limits, sync, "this key", scope, receive, send)

    async def _limited(self, auth: Auth, client: str, limits: KeyLimits, sync: bool, who: str, scope, receive, send):
        """Serve the request within `client`'s limits: 429 with Retry-After past one."""
        counted = "" if client.startswith(ADDRESS_PREFIX) else client  # metric tags: key ids only, never addresses
        try:
            hold = await auth.admit(client, limits, sync, who)
        except LimitExceeded as error:
            auth.count(counted, "limited")
            return await _answer(send, 429, error.body(), limit_response_headers(error), scope=scope)
        auth.count(counted, "allowed")
        try:
            await self.app(scope, receive, send)
        finally:
            if hold is not None:
                await auth.release(client, hold)


ADDRESS_PREFIX = "addr:"


def client_address(scope) -> str:
    """The limiter's name for a client without a key: its remote address (after trusted proxies'
    X-Forwarded-For, see auth.trusted_proxies). Key ids cannot contain ':', so the two never meet."""
    client = scope.get("client")
    return ADDRESS_PREFIX + (client[0] if client else "unknown")


def resolve_keys_file(path: str | None) -> str | None:
    """The keys file made absolute where the app is built (replicas run in other directories)."""
    return None if path is None else str(Path(path).expanduser().resolve())
