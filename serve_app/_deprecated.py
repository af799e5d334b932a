"""Old import paths kept working: each warns once per name and forwards to the new home."""

from __future__ import annotations

import importlib
import warnings

# The date after which the old paths may go (three months after they moved).
REMOVAL = "2027-03-01"


def forwarder(old: str, new: str):
    """A module `__getattr__` for `old` that returns `new`'s attribute, with a DeprecationWarning
    naming its home: `serve_app.types` for the public request and response types (PEP 562)."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(importlib.import_module(new), name)
        public = importlib.import_module("serve_app.types")
        home = "serve_app.types" if name in public.__all__ else new
        warnings.warn(f"{old}.{name} moved: import it from {home} (the old path goes after {REMOVAL})",
                      DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
