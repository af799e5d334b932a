"""A keys file for tests: named keys with their scopes, as `genserve keys create` writes them."""

from __future__ import annotations

import yaml

from serve_app.security.keys import key_entry_yaml, new_key


def write_keys(path, scopes: dict[str, list[str]]) -> dict[str, str]:
    """Write a keys file at `path` with one key per name (its scopes); {name: key}."""
    made, entries = {}, []
    for name, granted in scopes.items():
        key_id, key = new_key()
        entries.append(key_entry_yaml(key_id, name, key, granted))
        made[name] = key
    path.write_text(yaml.safe_dump({"url_signing_secret": "s" * 64, "keys": entries}))
    path.chmod(0o600)
    return made


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
