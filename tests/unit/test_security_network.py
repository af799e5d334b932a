"""Safe on a shared network (issue 26): who counts as local, signed URLs that cannot crash the app
or outlive their key, the keys file's mode and reserved id, OPTIONS behind the gate, and
`genserve serve`'s bind check. On the real app (`build_api`) through Starlette's TestClient: no Ray."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest
import yaml
from fastapi import Request
from pydantic import ValidationError
from starlette.testclient import TestClient

from serve_app.api.app import build_api
from serve_app.cli import loose_keys_files, main, unprotected_bind
from serve_app.config import AppArgs, AuthConfig
from serve_app.security import keys as keys_module
from serve_app.security.guard import NO_KEYS, Auth, principal
from serve_app.security.keys import KeyRing, key_entry_yaml, new_key

LOOPBACK = ("127.0.0.1", 40000)
PROXY = ("10.1.2.3", 40000)
REMOTE = ("203.0.113.7", 40000)
FILE = "/v1/jobs/abc/files/image-0.png"


def _keys_file(path: Path, **extra) -> dict[str, str]:
    """A keys file (mode 600) with keys gen and admin (and `extra` fields on gen); their keys and ids."""
    made, entries = {}, []
    for name, scopes in (("gen", ["generate", "read"]), ("admin", ["admin"])):
        key_id, key = new_key()
        entry = key_entry_yaml(key_id, name, key, scopes)
        entries.append({**entry, **(extra if name == "gen" else {})})
        made[name], made[f"{name}_id"] = key, key_id
    path.write_text(yaml.safe_dump({"url_signing_secret": "s" * 64, "keys": entries}))
    path.chmod(0o600)
    return made


def _app(auth: Auth | None, trusted_proxies=(), cors_origins=()):
    api = build_api(cors_origins=cors_origins, trusted_proxies=trusted_proxies)
    if auth is not None:
        api.state.auth = auth

    @api.get("/v1/test/whoami")
    async def whoami(request: Request) -> dict:
        return {"key_id": principal(request).key_id, "scopes": sorted(principal(request).scopes)}

    @api.get("/v1/admin/test-probe")
    async def probe() -> dict:
        return {"ok": True}

    return api


def _client(app, client=LOOPBACK) -> TestClient:
    return TestClient(app, client=client, raise_server_exceptions=False)


# 1. Loopback trust


def test_a_keyless_config_with_trusted_proxies_fails_to_load_naming_them():
    with pytest.raises(ValidationError, match="trusted_proxies needs API keys"):
        AuthConfig(trusted_proxies=["10.0.0.0/8"])
    with pytest.raises(ValidationError, match="trusted_proxies"):
        AppArgs.model_validate({"auth": {"trusted_proxies": ["10.0.0.0/8"]}})
    AuthConfig(trusted_proxies=["10.0.0.0/8"], allow_unauthenticated=True)  # deliberately open
    AuthConfig(trusted_proxies=["10.0.0.0/8"], keys_file="keys.yaml")


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "10.0.0.0/0"])
def test_a_proxy_range_of_every_address_is_a_config_error(network):
    with pytest.raises(ValidationError, match=rf"trusted_proxies: '{network}' trusts every address"):
        AuthConfig(trusted_proxies=[network], keys_file="keys.yaml")


def test_with_keys_a_forwarded_loopback_address_without_a_key_gets_401(tmp_path):
    keys = _keys_file(tmp_path / "keys.yaml")
    app = _app(Auth(str(tmp_path / "keys.yaml"), metrics=False), trusted_proxies=["203.0.113.0/24"])
    client = _client(app, REMOTE)  # inside the trusted range
    assert client.get("/v1/test/whoami", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 401
    keyed = client.get("/v1/test/whoami", headers={"X-Forwarded-For": "127.0.0.1",
                                                     "Authorization": f"Bearer {keys['gen']}"})
    assert keyed.status_code == 200 and keyed.json()["key_id"] == keys["gen_id"]


def test_a_forwarded_client_is_never_local():
    # A trusted proxy naming 127.0.0.1 (the app is built directly: the config now refuses this).
    proxied = _client(_app(Auth(None, metrics=False), trusted_proxies=["10.0.0.0/8"]), PROXY)
    faked = proxied.get("/v1/test/whoami", headers={"X-Forwarded-For": "127.0.0.1"})
    assert faked.status_code == 403 and faked.json() == {"detail": NO_KEYS}
    # A proxy on this host that is not in trusted_proxies (nginx, a sidecar, Ray's own proxy):
    # its peer address is loopback, but the request says it speaks for another client.
    local_proxy = _client(_app(Auth(None, metrics=False)), LOOPBACK)
    for header in ({"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7"}, {"X-Real-IP": "203.0.113.7"}):
        assert local_proxy.get("/v1/test/whoami", headers=header).status_code == 403, header
    own = local_proxy.get("/v1/test/whoami")  # a caller on this machine, not forwarded
    assert own.status_code == 200 and own.json()["key_id"] == "local" and "admin" in own.json()["scopes"]
    assert local_proxy.get("/v1/admin/test-probe").status_code == 200


def test_allow_unauthenticated_never_grants_admin_and_keeps_per_address_limits():
    from serve_app.config import ClientLimits

    auth = Auth(None, allow_unauthenticated=True, metrics=False, client_limits=ClientLimits(requests_per_minute=1))
    app = _app(auth, trusted_proxies=["10.0.0.0/8"])
    for client in (_client(app, REMOTE), _client(app, LOOPBACK)):
        who = client.get("/v1/test/whoami")
        assert who.status_code == 200 and who.json() == {"key_id": "local", "scopes": ["generate", "read"]}
        refused = client.get("/v1/admin/test-probe")
        assert refused.status_code == 403 and refused.json()["scope"] == "admin"
        assert "allow_unauthenticated" in refused.json()["detail"]
    proxy = _client(app, PROXY)
    assert proxy.post("/v1/test/whoami", headers={"X-Forwarded-For": "198.51.100.1"}).status_code != 429
    assert proxy.post("/v1/test/whoami", headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 429


# 3. and 4. Signed URLs


@pytest.fixture
def signing(tmp_path):
    keys = _keys_file(tmp_path / "keys.yaml")
    auth = Auth(str(tmp_path / "keys.yaml"), metrics=False, signed_downloads_per_minute=3)
    return keys, auth, _client(_app(auth), REMOTE)


@pytest.mark.parametrize("sig", ["%C3%A9", "%00", "e" * 63, "e" * 65, "g" * 64, "%C3%A9" * 32])
def test_a_crafted_signature_is_401_not_500(signing, sig):
    keys, auth, client = signing
    expires = int(time.time()) + 600
    response = client.get(f"{FILE}?expires={expires}&kid={keys['gen_id']}&sig={sig}")
    assert response.status_code == 401, response.text
    assert client.get(f"{FILE}?expires={expires}&sig={sig}").status_code == 401


def test_a_signed_url_is_bound_to_the_key_that_asked_for_it(signing):
    keys, auth, client = signing
    url = auth.sign_path(FILE, keys["gen_id"])
    assert client.get(url).status_code not in (401, 403, 429), "past the Guard (the route has no services here)"
    other = url.replace(f"kid={keys['gen_id']}", f"kid={keys['admin_id']}")
    assert client.get(other).status_code == 401, "the signature covers the key id"
    unknown = auth.sign_path(FILE, "k_gone")
    assert client.get(unknown).status_code == 401, "a key id the keys file does not hold signs nothing"


@pytest.mark.parametrize("change", [{"revoked": True}, {"expires_at": "2020-01-01T00:00:00Z"}, {"scopes": ["generate"]},
                                    None], ids=["revoked", "expired", "no-read-scope", "deleted"])
def test_a_signed_url_dies_with_its_key(tmp_path, monkeypatch, change):
    path = tmp_path / "keys.yaml"
    keys = _keys_file(path)
    auth = Auth(str(path), metrics=False)
    client = _client(_app(auth), REMOTE)
    url = auth.sign_path(FILE, keys["gen_id"])
    assert client.get(url).status_code != 401
    monkeypatch.setattr(keys_module, "RELOAD_CHECK_S", 0.0)
    data = yaml.safe_load(path.read_text())
    if change is None:  # the entry deleted
        data["keys"] = [entry for entry in data["keys"] if entry["id"] != keys["gen_id"]]
    else:
        data["keys"][0].update(change)
    path.write_text(yaml.safe_dump(data) + "\n")
    assert client.get(url).status_code == 401


def test_job_file_urls_are_signed_for_the_key_whose_request_made_them(signing):
    from starlette.requests import Request as Incoming

    from serve_app.jobs.http import JobsApi
    from serve_app.security.guard import Principal

    keys, auth, client = signing
    asking = Principal(keys["gen_id"], frozenset({"generate", "read"}))
    request = Incoming({"type": "http", "app": client.app, "root_path": "/api", "headers": [],
                        "state": {"principal": asking}})
    url = JobsApi._file_url(request, "abc", "image-0.png")
    assert url.startswith(f"/api{FILE}?") and f"kid={keys['gen_id']}" in url
    assert auth.signed(FILE, url.split("?")[1].encode()).id == keys["gen_id"]


def test_signed_downloads_are_limited_per_client_address(signing):
    keys, auth, client = signing
    url = auth.sign_path(FILE, keys["gen_id"])
    assert [client.get(url).status_code == 429 for _ in range(3)] == [False] * 3
    limited = client.get(url)
    assert limited.status_code == 429 and limited.json()["limit"] == "signed_downloads_per_minute"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert _client(client.app, ("198.51.100.1", 1)).get(url).status_code != 429, "per address"
    assert AuthConfig().signed_downloads_per_minute == 600, "on by default"


# 6. The keys file


@pytest.mark.parametrize("key_id", ["local", "LOCAL"])
def test_the_key_id_local_is_reserved(tmp_path, key_id):
    with pytest.raises(ValidationError, match="reserved"):
        key_entry_yaml(key_id, "x", new_key()[1], ["read"])
    path = tmp_path / "keys.yaml"
    entry = {**key_entry_yaml("k_1", "x", new_key()[1], ["read"]), "id": key_id}
    path.write_text(yaml.safe_dump({"keys": [entry]}))
    with pytest.raises(ValueError, match="'local' owns the jobs made without keys"):
        KeyRing(path)


def test_a_keys_file_others_can_read_is_warned_about(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    _keys_file(path)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        KeyRing(path)
    assert not [record for record in caplog.records if "chmod 600" in record.getMessage()]
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        KeyRing(path)
    assert [record for record in caplog.records if "mode 0644" in record.getMessage()
            and f"chmod 600 {path}" in record.getMessage()]
    raw = {"applications": [{"name": "genserve", "args": {"auth": {"keys_file": str(path)}}}]}
    assert len(loose_keys_files(raw)) == 1
    path.chmod(0o600)
    assert loose_keys_files(raw) == []


def _dev_config(tmp_path, keys_file: Path) -> Path:
    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / "dev.yaml").read_text())
    config["applications"][0].setdefault("args", {}).setdefault("auth", {})["keys_file"] = str(keys_file)
    out = tmp_path / "config.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def test_genserve_serve_strict_refuses_a_keys_file_others_can_read(tmp_path, capsys):
    keys_file = tmp_path / "keys.yaml"
    _keys_file(keys_file)
    keys_file.chmod(0o640)
    assert main(["serve", str(_dev_config(tmp_path, keys_file)), "--strict"]) == 2  # before any Ray process starts
    err = capsys.readouterr().err
    assert "refusing to start" in err and "mode 0640" in err and f"chmod 600 {keys_file}" in err


def test_genserve_keys_create_tightens_a_loose_file_and_says_so(tmp_path, capsys):
    keys_file = tmp_path / "keys.yaml"
    _keys_file(keys_file)
    keys_file.chmod(0o644)
    assert main(["keys", "create", "carol", "--file", str(keys_file)]) == 0
    assert os.stat(keys_file).st_mode & 0o777 == 0o600
    assert "url_signing_secret may have been read" in capsys.readouterr().err


# 9. OPTIONS and the bind check


def test_options_needs_a_key_unless_it_is_a_cors_preflight(tmp_path):
    keys = _keys_file(tmp_path / "keys.yaml")
    plain = _client(_app(Auth(str(tmp_path / "keys.yaml"), metrics=False)), REMOTE)
    assert plain.options("/v1/jobs").status_code == 401
    assert plain.options("/v1/jobs", headers={"Authorization": f"Bearer {keys['gen']}"}).status_code != 401
    assert plain.options("/v1/admin/test-probe", headers={"Authorization": f"Bearer {keys['gen']}"}).status_code == 403
    keyless = _client(_app(Auth(None, metrics=False)), REMOTE)
    assert keyless.options("/v1/jobs").status_code == 403
    cors = _client(_app(Auth(str(tmp_path / "keys.yaml"), metrics=False), cors_origins=["https://app.example"]),
                   REMOTE)
    preflight = cors.options("/v1/jobs", headers={"Origin": "https://app.example",
                                                   "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    not_a_preflight = cors.options("/v1/jobs", headers={"Origin": "https://app.example"})
    assert not_a_preflight.status_code == 401


def test_serve_refuses_a_public_bind_without_keys_whatever_the_import_path():
    other = {"name": "toy", "import_path": "tests.toy_family:app", "args": {}}
    why = unprotected_bind({"http_options": {"host": "0.0.0.0"}, "applications": [other]})
    assert why and "'toy' has no API keys" in why
    opened = {**other, "args": {"auth": {"allow_unauthenticated": True}}}
    assert unprotected_bind({"http_options": {"host": "0.0.0.0"}, "applications": [opened]}) is None


def test_serve_resolves_a_host_name_before_taking_it_as_loopback(monkeypatch):
    app = {"name": "genserve", "import_path": "serve_app.builder:build_app", "args": {}}
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        table = {"localhost": ["192.0.2.5", "127.0.0.1"], "box": ["127.0.1.1", "::1"]}
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0)) for address in table[host]]
        if host == "nowhere.invalid":
            raise socket.gaierror("unknown")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    for host in ("localhost", "nowhere.invalid"):
        assert unprotected_bind({"http_options": {"host": host}, "applications": [app]}), host
    assert unprotected_bind({"http_options": {"host": "box"}, "applications": [app]}) is None
    assert unprotected_bind({"http_options": {"host": "::1"}, "applications": [app]}) is None
