"""Secrets a config names but never holds: the Redis passwords and the LLM and remote API tokens.

A config says where a secret is, an environment variable (`*_env`) or a file (`*_file`, a mounted
Secret), and each replica reads it where it runs: a config is a deployment argument, which the Ray
dashboard shows. No error raised here quotes a secret, not even one byte of it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlsplit


class SecretMissing(ValueError):
    """A secret the config names could not be read; the message names the field, never the value."""


def read_secret(env: str | None, file: str | None, *, field: str, required: bool = False) -> str | None:
    """The secret in `file` (it wins) or in $`env`, read here; None when neither holds one.

    `field` is the config keys' common prefix (`jobs.redis_password` for `jobs.redis_password_env`
    and `_file`), for the messages. `required`: a source that is named but gives nothing is an error.
    """
    if file is not None:
        return _from_file(Path(file).expanduser(), field, required)
    value = os.environ.get(env) if env else None
    if not value and required and env:
        raise SecretMissing(f"{field}_env names ${env}, which is not set where this runs; set it, or name a file "
                            f"in {field}_file")
    return value or None


def _from_file(path: Path, field: str, required: bool) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError as error:  # its text names the path and the reason, never the contents
        raise SecretMissing(f"{field}_file: cannot read {path}: {error.strerror}") from None
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:  # its own text would quote the offending byte
        raise SecretMissing(f"{field}_file: {path} is not UTF-8 text") from None
    if not value and required:
        raise SecretMissing(f"{field}_file: {path} is empty")
    return value or None


def warn_password_in_url(url: str | None, field: str, password_field: str, env: str | None) -> None:
    """DeprecationWarning when `url` (config key `field`) holds a password: it still works, but the URL
    is a deployment argument. `password_field`: the keys to use instead, `env` the variable they name."""
    if url is None or not urlsplit(url).password:
        return
    where = f"${env} ({password_field}_env)" if env else f"an environment variable ({password_field}_env)"
    warnings.warn(f"{field} holds a password: a deployment argument, shown by the Ray dashboard. Set it in "
                  f"{where} or a file ({password_field}_file) instead", DeprecationWarning, stacklevel=3)
