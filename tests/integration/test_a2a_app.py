"""The A2A agent on the shared dev app, with the a2a-sdk's own client over real HTTP: the Agent Card,
a streamed image task with progress and a PNG artifact, GetTask and CancelTask on jobs, text to
video with an MP4 artifact, and bad arguments answered with A2A's error naming the field."""

import asyncio
import re
import uuid
from pathlib import Path

import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import InvalidParamsError, TaskNotCancelableError
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.struct_pb2 import Value
from PIL import Image

from tests.helpers import image_bytes, wait_until_async

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def base(dev_app) -> str:
    return str(dev_app["client"].base_url).rstrip("/")


def _message(text=None, data=None) -> pb.Message:
    parts = [pb.Part(text=text)] if text is not None else []
    if data is not None:
        part = pb.Part()
        part.data.CopyFrom(ParseDict(data, Value()))
        parts.append(part)
    return pb.Message(message_id=str(uuid.uuid4()), role=pb.ROLE_USER, parts=parts)


async def _client(base: str, streaming: bool):
    http = httpx.AsyncClient(timeout=300)
    return await ClientFactory(ClientConfig(httpx_client=http, streaming=streaming)).create_from_url(base)


async def _stream(client, message):
    events = []
    async for response in client.send_message(pb.SendMessageRequest(message=message)):
        kind = response.WhichOneof("payload")
        events.append((kind, getattr(response, kind)))
    return events


def test_the_agent_card_is_served_with_every_skill(base):
    card = httpx.get(f"{base}/.well-known/agent-card.json").json()
    assert [skill["id"] for skill in card["skills"]] == ["generate-image", "edit-image", "animate-image",
                                                         "text-to-video", "score-image"]
    assert card["supportedInterfaces"][0]["url"] == f"{base}/a2a"
    assert card["supportedInterfaces"][0]["protocolVersion"] == "1.0"


def test_a_streamed_image_task_reports_progress_and_ends_with_a_png_and_its_output(base, dev_app):
    async def run():
        client = await _client(base, streaming=True)
        events = await _stream(client, _message("a castle on a hill", {"seed": 5, "num_inference_steps": 4}))
        got = await (await _client(base, streaming=False)).get_task(pb.GetTaskRequest(id=events[0][1].id))
        return events, got

    events, got = asyncio.run(run())
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "task" and kinds[-1] == "status_update", kinds
    task_id = events[0][1].id
    progress = [event.status.message.parts[0].text for kind, event in events
                if kind == "status_update" and event.status.state == pb.TASK_STATE_WORKING and event.status.message.parts]
    # Progress is the job's latest state, not a log: a watcher that wakes after two reports sees only the
    # second, and the last report can land after the result. So: some steps, of 4, never going back.
    steps = [int(re.fullmatch(r"generate: step (\d)/4", text).group(1)) for text in progress]
    assert steps and steps == sorted(steps) and 1 <= steps[0] and steps[-1] <= 4, progress
    assert events[-1][1].status.state == pb.TASK_STATE_COMPLETED
    artifact = next(event.artifact for kind, event in events if kind == "artifact_update")
    png, data = artifact.parts
    assert png.media_type == "image/png" and png.raw.startswith(PNG)
    output = MessageToDict(data.data)
    job = dev_app["client"].get(f"/v1/jobs/{task_id}/result").json()
    assert output["image_id"] == f"{task_id}/image-0.png" and output["seed"] == 5
    assert output["enhanced_prompt"] == job["enhanced_prompt"] and output["dimensions"] == {
        "width": job["width"], "height": job["height"]}
    assert 0 <= output["confidence"] <= 1 and "attempt 1 (seed 5)" in output["reasoning"]
    assert dev_app["client"].get(job["images"][0]["url"]).content == png.raw, "the artifact is the job's file"
    assert got.status.state == pb.TASK_STATE_COMPLETED and got.artifacts[0].parts[0].raw == png.raw


def test_a_task_sent_without_waiting_is_a_job_to_get_or_cancel(base, dev_app):
    async def run():
        client = await _client(base, streaming=False)
        request = pb.SendMessageRequest(message=_message("a slow tower", {"num_inference_steps": 4}))
        request.configuration.return_immediately = True
        task = [response.task async for response in client.send_message(request)][0]
        cancelled = await client.cancel_task(pb.CancelTaskRequest(id=task.id))
        return task, cancelled

    task, cancelled = asyncio.run(run())
    assert task.status.state in (pb.TASK_STATE_SUBMITTED, pb.TASK_STATE_WORKING)
    job = dev_app["client"].get(f"/v1/jobs/{task.id}").json()
    assert job["cancel_requested"] or job["state"] == "cancelled"
    assert cancelled.status.state in (pb.TASK_STATE_WORKING, pb.TASK_STATE_CANCELED)

    async def finished():
        client = await _client(base, streaming=False)

        async def done():
            return (await client.get_task(pb.GetTaskRequest(id=task.id))).status.state != pb.TASK_STATE_WORKING

        await wait_until_async(done, 120, interval_s=0.2, what="the cancelled task to stop")
        with pytest.raises(TaskNotCancelableError):
            await client.cancel_task(pb.CancelTaskRequest(id=task.id))
        return await client.get_task(pb.GetTaskRequest(id=task.id))

    final = asyncio.run(finished())
    assert final.status.state == pb.TASK_STATE_CANCELED


def test_text_to_video_ends_with_an_mp4_artifact(base):
    async def run():
        client = await _client(base, streaming=False)
        message = _message("waves on rocks", {"skill": "text-to-video", "num_frames": 4, "width": 256,
                                              "height": 256, "seed": 1})
        return [response.task async for response in client.send_message(pb.SendMessageRequest(message=message))][0]

    task = asyncio.run(run())
    assert task.status.state == pb.TASK_STATE_COMPLETED, task.status
    mp4, data = task.artifacts[0].parts
    assert mp4.media_type == "video/mp4" and mp4.raw[4:8] == b"ftyp"
    described = MessageToDict(data.data)
    assert described["mode"] == "text-to-video"
    # The video's sampled frames scored (dev.yaml's tiny scorers) and its temporal consistency.
    scores = described["scores"]
    assert scores["sampled_frames"] == [0, 1, 2, 3] and {"alignment", "hps", "pickscore"} <= set(scores["mean"])
    assert -1 <= scores["temporal_consistency"] <= 1


def test_bad_arguments_are_invalid_params_naming_the_field_and_the_client_goes_on(base):

    async def run():
        client = await _client(base, streaming=True)
        errors = []
        for data in ({"num_inference_steps": 9}, {"width": 250}, {"colour": "red"},
                     {"skill": "text-to-video", "num_frames": 99}):
            with pytest.raises(InvalidParamsError) as raised:
                await _stream(client, _message("a fox", data))
            errors.append(raised.value.data["errors"][0]["field"])
        score = pb.Message(message_id=str(uuid.uuid4()), role=pb.ROLE_USER, parts=[
            pb.Part(text="grey"), pb.Part(raw=image_bytes(size=(64, 64), color=(90, 90, 90)), media_type="image/png"),
            _message(data={"skill": "score-image"}).parts[0]])
        return errors, await _stream(client, score)

    errors, scored = asyncio.run(run())
    assert errors == ["num_inference_steps", "width", "colour", "num_frames"]
    assert scored[0][0] == "message" and "scores" in MessageToDict(scored[0][1].parts[0].data)["images"][0]


def test_the_documented_a2a_example_runs(base, tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "agents.md").read_text()
    section = text[text.index("## A2A agent"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1).replace("http://127.0.0.1:8000", base)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/agents.md", "exec"), {"__name__": "docs_example"})
    with Image.open(tmp_path / "lighthouse.png") as png:
        assert png.format == "PNG" and png.size == (256, 256)
    printed = capsys.readouterr().out.split("\n")
    confidences = [float(line) for line in printed if re.fullmatch(r"[0-9.]+(e-?[0-9]+)?", line)]
    assert printed[-2] == "TASK_STATE_COMPLETED " and len(confidences) == 1 and 0 <= confidences[0] <= 1, printed
