"""Deprecated: the jobs wire types live in `serve_app.types` (defined in `serve_app.protocol.jobs`).
This path warns and forwards until its removal date."""

from serve_app._deprecated import forwarder

__getattr__ = forwarder("serve_app.jobs.schemas", "serve_app.protocol.jobs")
