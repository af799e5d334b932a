import socket
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], T], timeout_s: float, interval_s: float = 0.25, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as error:  # the service may not be up yet
            last_error = error
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not met within {timeout_s}s (last error: {last_error!r})")


async def wait_until_async(condition: Callable, timeout_s: float, interval_s: float = 0.02, what: str = "condition"):
    """`wait_until` inside an event loop: polls `condition` (sync or async) between awaits."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(interval_s)
    raise TimeoutError(f"{what} not met within {timeout_s}s")
