"""Webhooks and A2A push notifications: a job's end told to its receivers, durably and signed.

- A job's targets (its `webhook`, its A2A push configs) live on the job record. When the job ends,
  the store records one pending delivery per target in the same step as the end (`model.new_deliveries`),
  so an end is never without its deliveries, whatever stops the runner after.
- The lease holder's `Deliverer` attempts the deliveries due: each attempt renders the body from
  the job as it is (fresh signed result URLs, never the images), signs it with the Standard
  Webhooks scheme (`webhook-id`: the delivery's id, the same on every retry; a fresh
  `webhook-timestamp`; `webhook-signature`: HMAC-SHA256 with the owner's `whsec_` secret) and
  POSTs it. A 2xx ends it; anything else is retried with doubling waits until `give_up_after_s`
  after the job's end. The attempt is recorded compare-and-set on its number and fenced by the
  lease, so a runner killed mid-attempt leaves the delivery pending for the next one: at least
  once, each time with the same id.
- Safety (`UrlPolicy`): https only unless `allow_http`; no loopback, private, link-local,
  reserved or metadata address unless its host is in `allowed_hosts`, checked on the resolved
  addresses at submit (422) and again before each attempt, which then connects to the address
  checked (pinned: a name cannot resolve elsewhere in between); redirects are not followed; each
  attempt has a timeout and reads at most `max_response_bytes` of the answer; each API key has at
  most `max_in_flight_per_key` deliveries in flight.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

from serve_app.jobs.model import DELIVERED, GAVE_UP, PENDING, SUCCEEDED, Job, dumps
from serve_app.jobs.results import with_urls
from serve_app.jobs.store import JobStore, LeaseLost

logger = logging.getLogger("ray.serve")

# Cloud metadata services that are not link-local (169.254.169.254 and fe80::/10 are refused as such).
METADATA = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))
# Seconds: a receiver on loopback answers in milliseconds; a slow one across the world in seconds.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]

Resolver = Callable[[str, int], Awaitable[list[str]]]
# What a target kind's body is: (job, delivery, file URL of a job file name) -> the JSON body.
Renderer = Callable[[Job, dict, Callable[[str], str]], dict]


def sign(secret: str, msg_id: str, timestamp: float, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (the `standardwebhooks` package signs)."""
    from standardwebhooks import Webhook

    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=timezone.utc), body)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(timestamp)), "webhook-signature": signature}


class WebhookRefused(ValueError):
    """A receiver URL the policy does not allow; the message says why (never a secret)."""


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not be delivered to, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA:
        return "a cloud metadata address"
    for name, flag in (("loopback", address.is_loopback), ("link-local", address.is_link_local),
                       ("private", address.is_private), ("multicast", address.is_multicast),
                       ("unspecified", address.is_unspecified), ("reserved", address.is_reserved)):
        if flag:
            return f"a {name} address"
    return None


@dataclass(frozen=True)
class Target:
    """A URL checked by the policy: where to connect (`address`, pinned) and what to ask for."""

    url: str
    host: str
    port: int
    address: str


@dataclass
class UrlPolicy:
    allow_http: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    resolve: Resolver = system_resolve

    @classmethod
    def of(cls, config, resolve: Resolver = system_resolve) -> UrlPolicy:
        return cls(config.allow_http, frozenset(host.lower() for host in config.allowed_hosts), resolve)

    async def check(self, url: str) -> Target:
        """The URL's target if it may be delivered to; else WebhookRefused saying why."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as error:
            raise WebhookRefused(f"not a URL: {error}") from None
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in schemes:
            raise WebhookRefused(f"the scheme must be {' or '.join(schemes)}"
                                 + ("" if self.allow_http else " (jobs.webhooks.allow_http allows http)"))
        host = (parts.hostname or "").lower()
        if not host:
            raise WebhookRefused("the URL has no host")
        if parts.username or parts.password:
            raise WebhookRefused("the URL may not hold credentials")
        try:
            addresses = [host] if _is_ip(host) else await self.resolve(host, port)
        except OSError as error:
            raise WebhookRefused(f"{host} does not resolve ({type(error).__name__})") from None
        if not addresses:
            raise WebhookRefused(f"{host} does not resolve")
        if host not in self.allowed_hosts:
            for address in addresses:
                why = _forbidden(ipaddress.ip_address(address))
                if why is not None and address not in self.allowed_hosts:
                    shown = host if host == address else f"{host} resolves to {address},"
                    raise WebhookRefused(f"{shown} is {why}; list the host in jobs.webhooks.allowed_hosts to "
                                         "deliver there")
        return Target(url, host, port, addresses[0])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def pinned(target: Target) -> tuple[str, dict[str, str], dict]:
    """The URL with the checked address in place of its host, the Host header and the TLS name:
    the connection goes where the policy looked, and TLS still verifies the host name."""
    parts = urlsplit(target.url)
    address = f"[{target.address}]" if ":" in target.address else target.address
    netloc = f"{address}:{target.port}"
    default = 443 if parts.scheme == "https" else 80
    host_header = target.host if target.port == default else f"{target.host}:{target.port}"
    extensions = {"sni_hostname": target.host} if parts.scheme == "https" else {}
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), {"Host": host_header}, extensions


def webhook_body(job: Job, delivery: dict, file_url: Callable[[str], str]) -> dict:
    """A job webhook's body: the event, and the job's id, state and result with signed file URLs."""
    data = {"job_id": job.id, "kind": job.kind, "state": job.state, "error": job.error,
            "finished_at": job.finished_at}
    if job.state == SUCCEEDED and job.result is not None:
        data["result"] = with_urls(job.kind, job.result, file_url)
    return {"type": delivery["event"], "timestamp": datetime.fromtimestamp(time.time(), tz=timezone.utc).isoformat(),
            "data": data}


@dataclass
class Outcome:
    delivered: bool
    status: int | None = None
    error: str | None = None
    final: bool = False  # not worth retrying (the URL is refused now)


class Deliverer:
    """Attempts the deliveries due, while its dispatcher holds the store's lease (see the module
    docstring). `secret_of(owner)`: the signing secret of a job's owner; `file_url(job, name)`: a
    signed URL of a job's file; `renderers`: the body of each target kind."""

    def __init__(self, store: JobStore, config, secret_of: Callable[[str | None], str | None],
                 file_url: Callable[[Job, str], str], renderers: dict[str, Renderer] | None = None,
                 resolve: Resolver = system_resolve, metrics: bool = False, transport=None):
        self.store, self.config = store, config
        self.policy = UrlPolicy.of(config, resolve)
        self.secret_of, self.file_url = secret_of, file_url
        self.renderers: dict[str, Renderer] = {"webhook": webhook_body, **(renderers or {})}
        self._transport = transport  # tests: an httpx transport instead of the network
        self._in_flight: dict[str, asyncio.Task] = {}
        self._per_owner: dict[str | None, int] = {}
        self._wakeup = asyncio.Event()
        self._deliveries = self._latency = None
        if metrics:
            from ray.serve.metrics import Counter, Histogram

            self._deliveries = Counter("genserve_webhook_deliveries", tag_keys=("kind", "outcome"),
                                       description="Delivery attempts of webhooks and A2A push notifications, by "
                                                   "outcome: delivered, retry (will be tried again), failed (gave up).")
            self._latency = Histogram("genserve_webhook_delivery_seconds", boundaries=LATENCY_BUCKETS,
                                      tag_keys=("kind",), description="Time of one delivery attempt.")

    def wake(self) -> None:
        self._wakeup.set()

    async def run_forever(self, lost: asyncio.Event) -> None:
        """Start the due deliveries every poll interval (sooner when woken) until cancelled or the
        lease is lost (`lost` is set then); attempts in flight end with it."""
        try:
            while not lost.is_set():
                self._wakeup.clear()
                try:
                    await self.start_due(lost)
                except LeaseLost:
                    lost.set()
                    return
                except Exception:
                    logger.exception("could not read the deliveries due; trying again")
                try:
                    async with asyncio.timeout(self.config.poll_interval_s):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
        finally:
            tasks = list(self._in_flight.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def start_due(self, lost: asyncio.Event | None = None) -> int:
        """Start an attempt for each due delivery not in flight, within its owner's limit."""
        started = 0
        for delivery in await asyncio.to_thread(self.store.due_deliveries, time.time()):
            owner = delivery["owner"]
            if delivery["id"] in self._in_flight or self._per_owner.get(owner, 0) >= self.config.max_in_flight_per_key:
                continue
            self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
            task = asyncio.create_task(self._attempt(delivery, lost))
            self._in_flight[delivery["id"]] = task
            task.add_done_callback(lambda _, d=delivery: self._done(d))
            started += 1
        return started

    def _done(self, delivery: dict) -> None:
        self._in_flight.pop(delivery["id"], None)
        self._per_owner[delivery["owner"]] -= 1
        if not self._per_owner[delivery["owner"]]:
            del self._per_owner[delivery["owner"]]
        self._wakeup.set()  # its owner's next one may start

    async def _attempt(self, delivery: dict, lost: asyncio.Event | None) -> None:
        kind = delivery["target"].get("kind", "webhook")
        started = time.monotonic()
        outcome = await self._send(delivery)
        if self._latency is not None:
            self._latency.observe(time.monotonic() - started, tags={"kind": kind})
        record = self._record_of(delivery, outcome)
        try:
            recorded = await asyncio.to_thread(self.store.record_delivery, delivery["id"], delivery["attempts"] + 1,
                                               record)
        except LeaseLost:
            if lost is not None:
                lost.set()
            return
        except Exception:  # still pending in the store: attempted again when next due (same id)
            logger.exception("delivery %s: could not record attempt %d", delivery["id"], delivery["attempts"] + 1)
            return
        if recorded is not None and self._deliveries is not None:
            name = {DELIVERED: "delivered", GAVE_UP: "failed"}.get(record["state"], "retry")
            self._deliveries.inc(tags={"kind": kind, "outcome": name})

    def _record_of(self, delivery: dict, outcome: Outcome) -> dict:
        now = time.time()
        if outcome.delivered:
            return {"state": DELIVERED, "next_at": None, "last_status": outcome.status, "last_error": None,
                    "delivered_at": now}
        wait = min(self.config.max_retry_s, self.config.first_retry_s * 2 ** delivery["attempts"])
        next_at = now + wait * random.uniform(0.8, 1.0)  # jitter: retries of many jobs do not land in step
        give_up = outcome.final or next_at > delivery["created_at"] + self.config.give_up_after_s
        return {"state": GAVE_UP if give_up else PENDING, "next_at": None if give_up else next_at,
                "last_status": outcome.status, "last_error": outcome.error, "delivered_at": None}

    async def _send(self, delivery: dict) -> Outcome:
        """One attempt: render, check the URL again, sign, POST; never raises."""
        import httpx

        target = delivery["target"]
        try:
            job = await asyncio.to_thread(self.store.get, delivery["job_id"])
            if job is None:
                return Outcome(False, error="the job expired before it was delivered", final=True)
            renderer = self.renderers.get(target.get("kind", "webhook"))
            if renderer is None:
                return Outcome(False, error=f"no renderer for {target.get('kind')} deliveries here", final=True)
            body = dumps(renderer(job, delivery, lambda name: self.file_url(job, name))).encode()
            secret = self.secret_of(delivery["owner"])
            if secret is None and target.get("kind", "webhook") == "webhook":
                return Outcome(False, error="no webhook signing secret for the job's owner", final=True)
            try:
                checked = await self.policy.check(target["url"])
            except WebhookRefused as error:
                return Outcome(False, error=f"refused: {error}", final=True)
            url, headers, extensions = pinned(checked)
            # An A2A push without a secret goes unsigned: A2A's own token header authenticates it.
            signature = sign(secret, delivery["id"], time.time(), body) if secret else {"webhook-id": delivery["id"]}
            headers = {**headers, **signature,
                       "content-type": "application/json", **target.get("headers", {})}
            async with httpx.AsyncClient(follow_redirects=False, timeout=self.config.timeout_s,
                                         transport=self._transport) as client:
                async with client.stream("POST", url, content=body, headers=headers, extensions=extensions) as answer:
                    await _read_capped(answer, self.config.max_response_bytes)
            if 200 <= answer.status_code < 300:
                return Outcome(True, answer.status_code)
            return Outcome(False, answer.status_code, f"the receiver answered {answer.status_code}")
        except Exception as error:  # the network's, the receiver's: retried
            return Outcome(False, error=f"{type(error).__name__}: {str(error)[:200]}")


async def _read_capped(answer, limit: int) -> int:
    """Read at most `limit` bytes of an answer (the rest is dropped unread with the connection)."""
    read = 0
    async for chunk in answer.aiter_raw():
        read += len(chunk)
        if read >= limit:
            break
    return read


@dataclass
class Secrets:
    """The signing secret of a job's owner: its key's `webhook_secret` in the keys file when the
    app has keys; else the service's (jobs.webhooks.secret_env or secret_file)."""

    keys: object | None = None  # a KeyRing
    service: str | None = None

    def __call__(self, owner: str | None) -> str | None:
        if self.keys is not None:
            entry = next((e for e in self.keys.entries() if e.id == owner), None)
            if entry is not None and entry.webhook_secret:
                return entry.webhook_secret
        return self.service


class WebhookGate:
    """What the ingress checks of a submitted webhook: the URL (after resolution) and that a
    secret will sign it. Raises RequestError naming `webhook.url`, which the routes answer 422."""

    def __init__(self, policy: UrlPolicy | None = None, service_secret: str | None = None):
        self.policy = policy or UrlPolicy()
        self.service_secret = service_secret

    async def check_url(self, url: str, field: str = "webhook.url") -> None:
        from serve_app.protocol.errors import RequestError

        try:
            await self.policy.check(url)
        except WebhookRefused as error:
            raise RequestError(field, str(error), "an https URL of a public host, or one in "
                                                  "jobs.webhooks.allowed_hosts") from None

    def check_secret(self, secret: str | None) -> None:
        from serve_app.protocol.errors import RequestError

        if secret is None:
            raise RequestError("webhook", "no signing secret: create the key with `genserve keys create` (it adds a "
                                          "webhook_secret), or without keys set jobs.webhooks.secret_env or "
                                          "secret_file", "a key or a service with a webhook secret")

    async def targets(self, spec, key_secret: str | None) -> list[dict]:
        """The job's targets for a submitted `webhook` (a protocol.jobs.WebhookSpec), checked."""
        await self.check_url(spec.url)
        self.check_secret(key_secret or self.service_secret)
        return [{"id": "webhook", "kind": "webhook", "url": spec.url, "events": list(dict.fromkeys(spec.events))}]


def build_gate(config) -> WebhookGate:
    """The ingress's gate for a `jobs.webhooks` config (the service secret read where this runs)."""
    return WebhookGate(UrlPolicy.of(config), config.secret())
