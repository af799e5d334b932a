"""Deprecated: the request and response types live in `serve_app.types`. This path (the README's
before `serve_app.api.schemas`) warns and forwards until its removal date."""

from serve_app._deprecated import forwarder

__getattr__ = forwarder("serve_app.schemas", "serve_app.protocol.schemas")
