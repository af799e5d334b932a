"""`genserve bench-agents`: what each agent protocol adds over a direct POST /v1/images call.

On one running app, each round sends the same image request (same seed) through each interface
in turn, so all of them run under the same machine load:

- direct: POST /v1/images (httpx), the baseline;
- openai: the official `openai` SDK's `images.generate` against /v1 (b64_json);
- mcp generate_image: the `mcp` SDK's client calling the tool, which runs a durable job and waits
  for it (so this includes the job machinery: the durable write, the runner, reading the PNG back);
- mcp get_job (finished): one tool call for a job that has already finished, i.e. the MCP round
  trip alone, beside GET /v1/jobs/{id}/result (the same read over plain HTTP);
- a2a SendMessage: the `a2a-sdk` client sending the prompt with the request's fields in a data part
  (blocking: a durable job, waited for, the PNG back as an artifact);
- a2a GetTask (finished): the finished task read back (JSON-RPC, the PNG inline as the artifact).

Overheads are medians over rounds of the per-round difference to the baseline (or to the plain
HTTP read), which cancels most of the drift in the model's own time.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

from serve_app.bench.images import Sample, _request_body, serving
from serve_app.config import app_args_from_config

DIRECT, OPENAI, MCP_GENERATE, HTTP_RESULT, MCP_GET_JOB = (
    "direct: POST /v1/images", "openai: images.generate", "mcp: generate_image", "http: GET job result",
    "mcp: get_job (finished)",
)
A2A_SEND, A2A_GET_TASK = "a2a: SendMessage", "a2a: GetTask (finished)"
# (interface, baseline): each interface's overhead is measured against its baseline in the same round.
PAIRS = ((OPENAI, DIRECT), (MCP_GENERATE, DIRECT), (MCP_GET_JOB, HTTP_RESULT), (A2A_SEND, DIRECT),
         (A2A_GET_TASK, HTTP_RESULT))


async def _rounds(base_url: str, body: dict, warmup: int, requests: int) -> dict[str, list[float]]:
    import uuid

    import httpx
    import openai
    from a2a.client import ClientConfig, ClientFactory
    from a2a.types import a2a_pb2 as pb
    from google.protobuf.json_format import ParseDict
    from google.protobuf.struct_pb2 import Value
    from mcp import Client

    names = (DIRECT, OPENAI, MCP_GENERATE, HTTP_RESULT, MCP_GET_JOB, A2A_SEND, A2A_GET_TASK)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    fields = pb.Part()
    fields.data.CopyFrom(ParseDict({key: value for key, value in body.items() if key != "prompt"}, Value()))
    # The same request in OpenAI's fields: size for width and height, genserve's own in extra_body.
    size = f"{body['width']}x{body['height']}"
    extra = {key: value for key, value in body.items() if key not in ("prompt", "width", "height")}
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http, Client(f"{base_url}/mcp") as mcp:
        sdk = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        a2a = await ClientFactory(ClientConfig(httpx_client=httpx.AsyncClient(timeout=300), streaming=False)
                                  ).create_from_url(base_url)
        for index in range(warmup + requests):
            timed = {}
            started = time.perf_counter()
            (await http.post("/v1/images", json=body)).raise_for_status()
            timed[DIRECT] = time.perf_counter() - started

            started = time.perf_counter()
            await sdk.images.generate(prompt=body["prompt"], size=size, extra_body=extra)
            timed[OPENAI] = time.perf_counter() - started

            started = time.perf_counter()
            result = await mcp.call_tool("generate_image", {"request": body, "wait_s": 120})
            timed[MCP_GENERATE] = time.perf_counter() - started
            if result.is_error or not result.structured_content:
                raise RuntimeError(f"generate_image failed: {result.content}")
            job_id = result.structured_content["job_id"]

            started = time.perf_counter()
            (await http.get(f"/v1/jobs/{job_id}/result")).raise_for_status()
            timed[HTTP_RESULT] = time.perf_counter() - started

            started = time.perf_counter()
            polled = await mcp.call_tool("get_job", {"job_id": job_id})
            timed[MCP_GET_JOB] = time.perf_counter() - started
            if polled.is_error:
                raise RuntimeError(f"get_job failed: {polled.content}")

            message = pb.Message(message_id=uuid.uuid4().hex, role=pb.ROLE_USER,
                                 parts=[pb.Part(text=body["prompt"]), fields])
            started = time.perf_counter()
            task = [r.task async for r in a2a.send_message(pb.SendMessageRequest(message=message))][0]
            timed[A2A_SEND] = time.perf_counter() - started
            if task.status.state != pb.TASK_STATE_COMPLETED or not task.artifacts:
                raise RuntimeError(f"SendMessage did not complete: {task.status}")

            started = time.perf_counter()
            got = await a2a.get_task(pb.GetTaskRequest(id=task.id))
            timed[A2A_GET_TASK] = time.perf_counter() - started
            if not got.artifacts:
                raise RuntimeError("GetTask returned no artifacts")
            if index >= warmup:
                for name, value in timed.items():
                    seconds[name].append(value)
    return seconds


def run_agents_benchmark(config: str, requests: int, warmup: int, width: int, height: int,
                         steps: int) -> tuple[list[Sample], dict[str, float]]:
    """The samples per interface, and each interface's median per-round overhead over its baseline."""
    args = app_args_from_config(config)
    body = _request_body(width, height, steps)
    with tempfile.TemporaryDirectory(prefix="genserve-bench-agents-") as data_dir:
        args = args.model_copy(update={"jobs": args.jobs.model_copy(update={"data_dir": data_dir})})
        with serving(args) as client:
            seconds = asyncio.run(_rounds(str(client.base_url).rstrip("/"), body, warmup, requests))
    overheads = {name: statistics.median(a - b for a, b in zip(seconds[name], seconds[baseline]))
                 for name, baseline in PAIRS}
    return [Sample(name, values, []) for name, values in seconds.items()], overheads


def format_agents_table(samples: list[Sample], overheads: dict[str, float]) -> str:
    baselines = dict(PAIRS)
    p50 = {sample.name: sample.p50 for sample in samples}
    lines = [f"{'interface':<26}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}{'over':>26}{'+ms p50':>9}{'ratio':>7}"]
    for sample in samples:
        row = f"{sample.name:<26}{len(sample.seconds):>4}{sample.p50 * 1000:>9.1f}{sample.percentile(95) * 1000:>9.1f}"
        if sample.name in baselines:
            base = baselines[sample.name]
            row += f"{base:>26}{overheads[sample.name] * 1000:>9.1f}{sample.p50 / p50[base]:>7.2f}"
        lines.append(row)
    lines.append("+ms: median over rounds of (interface - baseline) in the same round; ratio: p50 / baseline p50")
    return "\n".join(lines)
