import os

# Imported now, while no other thread runs: pytest rewrites plugin modules (hypothesis is one) when
# they are first imported, and CPython 3.11.7's AST recursion counter is shared between threads, so a
# first import at the terminal summary, after tests left server threads behind, can fail with
# "SystemError: AST constructor recursion depth mismatch" (fixed in later CPython releases).
import hypothesis  # noqa: F401
import pytest
import starlette.testclient  # noqa: F401  (the same, for test modules that import it inside a test)

# Tests start throwaway local Ray clusters bound to loopback; Ray 2.60's token auth would make the
# `serve` CLI used by some tests need the token, so it is off for the test session only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Keep every test cluster on loopback: Ray otherwise advertises the machine's outward address for
# its services and metrics targets. (Ray's own switch for single-machine clusters.)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing entirely
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; torch sees none on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
