"""The keys file: API keys as SHA-256 hashes, with scopes, limits and an optional expiry.

    # keys.yaml (mode 600; named by the config's auth.keys_file)
    url_signing_secret: 3f9c...          # HMAC key of signed file URLs (`genserve keys create` adds one)
    keys:
      - id: k_8f2a61c0                   # what jobs, metrics and logs record; never secret
        name: alice
        sha256: 0b1d...                  # sha256 of the key as sent; the key itself is never stored
        scopes: [generate, read]
        limits: {requests_per_minute: 120, concurrent_requests: 4, active_jobs: 20, queued_jobs: 10, daily_images: 2000}
        expires_at: 2027-06-30T00:00:00Z # optional
        revoked: false                   # optional; or delete the entry
        webhook_secret: whsec_...        # signs this key's webhooks (`genserve keys create` adds one)
        group: research                  # optional: shares the GPU as one with the group's other keys
        weight: 1                        # a key without a group: its share of GPU time (0 pauses its jobs)
    groups:                              # optional: named groups and their weights
      research: {weight: 3}

The file is re-read when its modification time or size changes (checked at most once a second),
so adding, revoking or rotating a key needs no restart. A file that stops parsing keeps the keys
last read and logs why; a missing or broken file at start fails the app's start.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.names import SCOPES, Scope

logger = logging.getLogger("ray.serve")
KEY_PREFIX = "gsk_"
RELOAD_CHECK_S = 1.0
RESERVED_ID = "local"  # no key may have this id: it owns the jobs made without keys (guard.LOCAL_OWNER)


class KeyLimits(BaseModel):
    """Per-key limits; None is unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(None, ge=1, description="Requests of any kind in any 60 s.")
    concurrent_requests: int | None = Field(
        None, ge=1, description="Synchronous generation requests (/v1/images, /v1/videos, /v1/scores, enhance) at once.")
    active_jobs: int | None = Field(None, ge=1, description="Jobs queued plus running at once.")
    daily_images: int | None = Field(
        None, ge=1, description="Images generated per day (a video counts its frames), charged when accepted.")
    queued_jobs: int | None = Field(None, ge=1, description="Jobs waiting in the queue at once (running ones not counted).")


class GroupEntry(BaseModel):
    """A group of keys that shares the GPU as one (fair queueing, docs/jobs.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, ge=0, description="Its share of recent GPU time against the others'; 0 pauses it.")


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    name: str = ""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: tuple[Scope, ...] = ("generate", "read")
    limits: KeyLimits = KeyLimits()
    expires_at: datetime | None = None
    revoked: bool = False
    webhook_secret: str | None = Field(
        None, pattern=r"^whsec_[A-Za-z0-9+/=]{24,}$",
        description="Signs this key's webhooks (Standard Webhooks); `genserve keys create` prints it once.")
    group: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                              description="The group (under `groups:`) whose share of the GPU its jobs run in.")
    weight: float = Field(1.0, ge=0, description="Without a group: its share of recent GPU time; 0 pauses its jobs.")

    @property
    def fair_group(self) -> str:
        """Whose share its jobs run in: its group, else the key itself."""
        return self.group or self.id

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.lower() == RESERVED_ID:
            raise ValueError(f"key id {value!r} is reserved: {RESERVED_ID!r} owns the jobs made without keys, so a key "
                             "of that name would see them all; pick another id")
        return value

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or self.expires_at.timestamp() > now)


class KeysFileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url_signing_secret: str | None = Field(None, min_length=32)
    keys: list[KeyEntry] = []
    groups: dict[str, GroupEntry] = {}

    @field_validator("keys")
    @classmethod
    def _unique_ids(cls, keys: list[KeyEntry]) -> list[KeyEntry]:
        ids = [key.id for key in keys]
        repeated = sorted({key_id for key_id in ids if ids.count(key_id) > 1})
        if repeated:
            raise ValueError(f"key ids must be unique; repeated: {repeated}")
        return keys

    @model_validator(mode="after")
    def _groups_exist(self) -> "KeysFileModel":
        for key in self.keys:
            if key.group is not None and key.group not in self.groups:
                raise ValueError(f"key {key.id!r}: group {key.group!r} is not under groups: (named: "
                                 f"{sorted(self.groups) or 'none'})")
            if key.group is not None and key.group in {other.id for other in self.keys}:
                raise ValueError(f"group {key.group!r} has a key's id; name groups apart from keys")
        return self

    def weights(self) -> dict[str, float]:
        """Each fair-queueing group's weight: named groups, and every key without one."""
        weights = {name: group.weight for name, group in self.groups.items()}
        weights.update({key.id: key.weight for key in self.keys if key.group is None})
        return weights


def loose_mode(mode: int) -> int:
    """The group and other permission bits of a keys file's mode (0 when only its owner may use
    it). The file holds the URL-signing secret: whoever reads it can sign any job's file URLs,
    and whoever writes it can add a key."""
    return stat.S_IMODE(mode) & 0o077 if os.name == "posix" else 0


def loose_mode_message(path: str | os.PathLike, mode: int) -> str:
    return (f"keys file {str(path)!r} can be read or written by group or others (mode "
            f"{stat.S_IMODE(mode):04o}); it holds the URL-signing secret: `chmod 600 {path}`")


def check_keys_file_mode(path: str | os.PathLike) -> str | None:
    """What is wrong with a keys file's permissions, or None."""
    mode = Path(path).stat().st_mode
    return loose_mode_message(path, mode) if loose_mode(mode) else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: whsec_ and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_key() -> tuple[str, str]:
    """(key id, key): the key is 256 random bits; the id is public and names the key in records."""
    return f"k_{secrets.token_hex(4)}", KEY_PREFIX + secrets.token_urlsafe(32)


def load_keys_file(path: str | os.PathLike) -> KeysFileModel:
    text = Path(path).read_text()
    return KeysFileModel.model_validate(yaml.safe_load(text) or {})


class KeyRing:
    """The keys of one keys file, re-read when the file changes. Thread-safe."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = None
        self._checked = 0.0
        try:
            self._model = self._read()
        except FileNotFoundError:
            raise FileNotFoundError(f"auth.keys_file {str(self.path)!r} does not exist on this node; create it with "
                                    f"`genserve keys create NAME --file {self.path}`") from None
        except Exception as error:
            raise ValueError(f"auth.keys_file {str(self.path)!r} is not a valid keys file: {error}") from None

    def _read(self) -> KeysFileModel:
        info = self.path.stat()
        model = load_keys_file(self.path)
        if loose_mode(info.st_mode):
            logger.warning("%s", loose_mode_message(self.path, info.st_mode))
        self._stamp = (info.st_mtime_ns, info.st_size)
        return model

    def _fresh(self) -> KeysFileModel:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return self._model
        with self._lock:
            self._checked = now
            try:
                info = self.path.stat()
                if (info.st_mtime_ns, info.st_size) != self._stamp:
                    self._model = self._read()
                    logger.info("keys file %s re-read: %d keys", self.path, len(self._model.keys))
            except Exception as error:  # keep the last good keys; say why (never the file's text)
                logger.error("keys file %s could not be re-read, keeping the keys read before: %s",
                             self.path, type(error).__name__)
        return self._model

    def authenticate(self, key: str, now: float | None = None) -> KeyEntry | None:
        """The entry of a usable key, else None. Every entry's hash is compared, in constant time,
        whatever matches, so the time taken says nothing about which keys exist."""
        digest = hash_key(key).encode()
        found = None
        for entry in self._fresh().keys:
            if hmac.compare_digest(digest, entry.sha256.encode()):
                found = entry
        now = time.time() if now is None else now
        return found if found is not None and found.usable(now) else None

    def usable_entry(self, key_id: str, now: float | None = None) -> KeyEntry | None:
        """The entry with this id while it is usable (neither revoked, expired nor deleted), else None."""
        now = time.time() if now is None else now
        return next((entry for entry in self._fresh().keys if entry.id == key_id and entry.usable(now)), None)

    def entries(self) -> list[KeyEntry]:
        return list(self._fresh().keys)

    def weights(self) -> dict[str, float]:
        """Fair-queueing weights by group, as the file says now."""
        return self._fresh().weights()

    def signing_secret(self) -> bytes | None:
        secret = self._fresh().url_signing_secret
        return None if secret is None else secret.encode()


def key_entry_yaml(key_id: str, name: str, key: str, scopes: list[str], limits: dict | None = None,
                   expires_at: str | None = None, webhook_secret: str | None = None) -> dict:
    entry: dict = {"id": key_id, "name": name, "sha256": hash_key(key), "scopes": list(scopes)}
    if webhook_secret:
        entry["webhook_secret"] = webhook_secret
    if limits:
        entry["limits"] = limits
    if expires_at:
        entry["expires_at"] = expires_at
    KeyEntry.model_validate(entry)
    return entry


def add_to_keys_file(path: str | os.PathLike, entry: dict) -> None:
    """Append an entry (creating the file, mode 600, and its URL signing secret if missing), atomically."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    data = data or {}
    data.setdefault("url_signing_secret", secrets.token_hex(32))
    data.setdefault("keys", [])
    data["keys"].append(entry)
    KeysFileModel.model_validate(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a leftover partial file keeps its own mode through O_CREAT
    with os.fdopen(descriptor, "w") as out:
        yaml.safe_dump(data, out, sort_keys=False)
    os.replace(partial, path)


__all__ = ["SCOPES", "KeyEntry", "KeyLimits", "KeyRing", "hash_key", "new_key", "key_entry_yaml", "add_to_keys_file",
           "check_keys_file_mode"]
