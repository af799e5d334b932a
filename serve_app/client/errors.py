"""What the client raises. Every error names what went wrong as the server said it."""

from __future__ import annotations


class GenserveError(Exception):
    """Base of the client's errors."""


class RequestRejected(GenserveError):
    """The service refused the request (4xx): bad input (422, each item names its field), a blocked
    prompt (400), an unknown job (404), a job in the wrong state (409), ..."""

    def __init__(self, status: int, detail, method: str = "", url: str = ""):
        self.status = status
        self.detail = detail
        super().__init__(f"{method} {url} -> {status}: {_describe(detail)}".strip())


class ServiceBusy(GenserveError):
    """503 or 429 (back-pressure, a replica being replaced) still, after the retries the client was
    allowed, or on a call it must not retry. `retry_after_s` is the server's last hint, if any."""

    def __init__(self, status: int, detail, retry_after_s: float | None, attempts: int):
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.attempts = attempts
        hint = f"; retry after {retry_after_s:g}s" if retry_after_s is not None else ""
        super().__init__(f"service busy ({status}) after {attempts} attempt(s): {_describe(detail)}{hint}")


class ServerError(GenserveError):
    """A 5xx other than 503: the service failed (504: a stage ran past its timeout)."""

    def __init__(self, status: int, detail):
        self.status = status
        self.detail = detail
        super().__init__(f"server error {status}: {_describe(detail)}")


class Unreachable(GenserveError):
    """No answer: the service is down, the URL is wrong, or the network failed."""


class JobFailed(GenserveError):
    """A job waited on ended failed or cancelled; `job` is its final `JobStatus`."""

    def __init__(self, job):
        self.job = job
        super().__init__(f"job {job.id} {job.state}" + (f": {job.error}" if job.error else ""))


def _describe(detail) -> str:
    if isinstance(detail, list):  # a 422: [{"loc": [...], "msg": ...}, ...]
        return "; ".join(item.get("msg", str(item)) if isinstance(item, dict) else str(item) for item in detail)
    return str(detail)
