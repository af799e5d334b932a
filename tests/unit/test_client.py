"""The Python client against a stubbed transport: retries only where safe, Retry-After honoured
within a bounded total wait, errors typed, the API key sent, job waits fed by the event stream,
and nothing heavy imported."""

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from serve_app.client import AsyncClient, Client, JobFailed, RequestRejected, ServiceBusy, Unreachable
from serve_app.client.retry import RetryPolicy, retry_after

IMAGE = {
    "id": "img-1", "created": 1, "model": "flux-schnell", "prompt": "a fox", "enhanced_prompt": "a fox, detailed",
    "negative_prompt": None, "style": None, "enhancer": "template", "width": 256, "height": 256,
    "num_inference_steps": 2, "guidance_scale": 0.0, "quality_metric": "alignment", "quality_threshold": 0,
    "passed": True, "images": [], "attempts": [], "timings": {"total": 0.1},
}
NOW = 1_700_000_000.0


def job_status(state: str, job_id: str = "j1", **extra) -> dict:
    base = f"/v1/jobs/{job_id}"
    return {"id": job_id, "kind": "image", "state": state, "attempts": 1, "max_attempts": 3,
            "cancel_requested": False, "created_at": NOW, "timings": {}, "history": [],
            "links": {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}, **extra}


class Stub:
    """A scripted server: each call takes the next answer; every request is kept."""

    def __init__(self, *answers: httpx.Response):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0)


def busy(retry_after_s: str | None = "2", status: int = 503) -> httpx.Response:
    headers = {"Retry-After": retry_after_s} if retry_after_s is not None else {}
    return httpx.Response(status, headers=headers, json={"detail": "queue full"})


def client_for(stub, max_wait_s: float = 30.0):
    slept: list[float] = []
    client = Client("http://genserve.test", transport=httpx.MockTransport(stub),
                    retry=RetryPolicy(max_wait_s=max_wait_s), sleep=slept.append)
    return client, slept


def test_a_seeded_image_request_is_retried_after_the_servers_retry_after():
    stub = Stub(busy("2"), busy("3"), httpx.Response(200, json=IMAGE))
    client, slept = client_for(stub)
    response = client.images(prompt="a fox", seed=7)
    assert response.model == "flux-schnell" and response.enhanced_prompt == "a fox, detailed"
    assert slept == [2.0, 3.0]
    assert len(stub.requests) == 3
    assert json.loads(stub.requests[0].content) == {"prompt": "a fox", "seed": 7}


def test_an_unseeded_image_request_is_not_retried():
    stub = Stub(busy("1"))
    client, slept = client_for(stub)
    with pytest.raises(ServiceBusy) as caught:
        client.images(prompt="a fox")
    assert caught.value.status == 503 and caught.value.retry_after_s == 1.0 and caught.value.attempts == 1
    assert slept == [] and len(stub.requests) == 1


def test_retries_stop_once_the_total_wait_would_pass_its_bound():
    stub = Stub(busy("4"), busy("4"), busy("4"))
    client, slept = client_for(stub, max_wait_s=10)
    with pytest.raises(ServiceBusy) as caught:
        client.models()
    assert slept == [4.0, 4.0]  # a third wait would make 12 s > 10
    assert caught.value.attempts == 3


def test_without_retry_after_the_wait_backs_off_exponentially_and_429_is_retried_too():
    stub = Stub(busy(None, 429), busy(None, 503), busy(None, 429), httpx.Response(200, json={"models": []}))
    client, slept = client_for(stub)
    assert client.models() == {"models": []}
    assert slept == [0.5, 1.0, 2.0]


def test_retry_after_as_an_http_date():
    assert retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0) == pytest.approx(5.0)
    assert retry_after("7") == 7.0
    assert retry_after("soon") is None and retry_after(None) is None


def test_job_submits_carry_an_idempotency_key_and_a_retry_reuses_it():
    stub = Stub(busy("1"), httpx.Response(202, json=job_status("queued", queue_position=1)))
    client, _ = client_for(stub)
    job = client.submit_image(prompt="a fox", num_inference_steps=2)
    assert job.state == "queued" and job.queue_position == 1
    keys = [request.headers["Idempotency-Key"] for request in stub.requests]
    assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) >= 32
    assert json.loads(stub.requests[0].content) == {"kind": "image", "request": {"prompt": "a fox",
                                                                                 "num_inference_steps": 2}}


def test_bad_input_is_refused_before_anything_is_sent():
    stub = Stub()
    client, _ = client_for(stub)
    with pytest.raises(Exception) as caught:
        client.images(prompt="a fox", width=100)
    assert "width" in str(caught.value)
    assert stub.requests == []


def test_a_422_is_raised_with_the_servers_detail():
    detail = [{"loc": ["body", "model"], "msg": "model: must be one of ['flux-schnell']"}]
    client, _ = client_for(Stub(httpx.Response(422, json={"detail": detail})))
    with pytest.raises(RequestRejected) as caught:
        client.images(prompt="a fox", model="nope", seed=1)
    assert caught.value.status == 422 and caught.value.detail == detail
    assert "model: must be one of" in str(caught.value)


def test_the_api_key_comes_from_the_argument_or_the_environment(monkeypatch):
    stub = Stub(httpx.Response(200, json={}), httpx.Response(200, json={}), httpx.Response(200, json={}))
    monkeypatch.setenv("GENSERVE_API_KEY", "from-env")
    Client("http://x", transport=httpx.MockTransport(stub)).models()
    Client("http://x", api_key="given", transport=httpx.MockTransport(stub)).models()
    monkeypatch.delenv("GENSERVE_API_KEY")
    Client("http://x", transport=httpx.MockTransport(stub)).models()
    assert [request.headers.get("Authorization") for request in stub.requests] == [
        "Bearer from-env", "Bearer given", None]


def test_the_url_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GENSERVE_URL", "http://elsewhere:9000/")
    assert Client().url == "http://elsewhere:9000"


def test_an_unreachable_service_is_its_own_error():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    client = Client("http://genserve.test", transport=httpx.MockTransport(refuse))
    with pytest.raises(Unreachable):
        client.models()


def sse(*events: tuple[str, dict]) -> bytes:
    return "".join(f"id: {n}\nevent: {name}\ndata: {json.dumps(data)}\n\n"
                   for n, (name, data) in enumerate(events)).encode()


def event_stream(final: dict) -> httpx.Response:
    body = sse(("state", {"job_id": "j1", "state": "queued", "at": NOW, "attempt": 0}),
               ("state", {"job_id": "j1", "state": "running", "at": NOW, "attempt": 1}),
               ("progress", {"job_id": "j1", "attempt": 1, "stage": "generate", "round": 1, "step": 1, "steps": 2,
                             "updated_at": NOW}),
               ("progress", {"job_id": "j1", "attempt": 1, "stage": "generate", "round": 1, "step": 2, "steps": 2,
                             "updated_at": NOW}),
               ("state", {"job_id": "j1", "state": final["state"], "at": NOW, "attempt": 1, "job": final}))
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


def test_wait_follows_the_event_stream_with_progress_to_the_final_status():
    client, _ = client_for(Stub(event_stream(job_status("succeeded"))))
    seen = []
    final = client.wait("j1", on_event=seen.append)
    assert final.state == "succeeded"
    assert [(event.event, event.state or event.progress.step) for event in seen] == [
        ("state", "queued"), ("state", "running"), ("progress", 1), ("progress", 2), ("state", "succeeded")]


def test_wait_raises_job_failed_with_the_final_status():
    client, _ = client_for(Stub(event_stream(job_status("failed", error="out of memory"))))
    with pytest.raises(JobFailed) as caught:
        client.wait("j1")
    assert caught.value.job.state == "failed" and "out of memory" in str(caught.value)


def test_wait_reads_the_status_when_the_stream_ends_early():
    cut = httpx.Response(200, headers={"content-type": "text/event-stream"},
                         content=sse(("state", {"job_id": "j1", "state": "running", "at": NOW, "attempt": 1})))
    client, _ = client_for(Stub(cut, httpx.Response(200, json=job_status("succeeded"))))
    assert client.wait("j1").state == "succeeded"


def test_the_async_client_retries_and_waits_the_same_way():
    slept = []

    async def sleep(seconds):
        slept.append(seconds)

    stub = Stub(busy("2"), httpx.Response(200, json=IMAGE), event_stream(job_status("succeeded")))

    async def main():
        async with AsyncClient("http://genserve.test", transport=httpx.MockTransport(stub), sleep=sleep) as client:
            image = await client.images(prompt="a fox", seed=3)
            seen = []
            final = await client.wait("j1", on_event=seen.append)
            return image, final, seen

    image, final, seen = asyncio.run(main())
    assert image.id == "img-1" and final.state == "succeeded" and slept == [2.0]
    assert sum(event.event == "progress" for event in seen) == 2


def test_importing_the_client_loads_no_torch_ray_or_diffusers():
    code = ("import sys; import serve_app.client; "
            "print(sorted(m for m in ('torch', 'ray', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
