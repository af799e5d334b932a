"""Reading the genserve application's `args:` out of a Serve config file."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve_app import APP_NAME
from serve_app.config import AppArgs


def load_serve_config(path: str | Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def app_args_from_config(path: str | Path, app_name: str = APP_NAME) -> AppArgs:
    """The typed args of application `app_name` in a Serve config file."""
    config = load_serve_config(path)
    for application in config.get("applications", []):
        if application.get("name") == app_name:
            return AppArgs.model_validate(application.get("args") or {})
    raise ValueError(f"{path}: no application named {app_name!r} under 'applications'")
