"""What every route depends on: the serving replica's `Services`."""

from __future__ import annotations

from fastapi import Request

from serve_app.services.facade import Services


def services(request: Request) -> Services:
    """The serving replica's services (a FastAPI dependency)."""
    # The app serving the request, not a module global: Serve ships the ingress (and the app it
    # refers to) to the replica by value, while this module is imported there by reference.
    return request.app.state.services
