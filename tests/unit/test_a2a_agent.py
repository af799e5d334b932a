"""The A2A agent over a real job dispatcher and fake deployments (no Ray), with the a2a-sdk's own
client over HTTP to `build_api`'s app: tasks are jobs (any handler over the same store answers for
them), states follow the job, artifacts carry the PNG and the ImageGenerationOutput fields, and bad
arguments are A2A errors naming the field, after which the client carries on."""

import asyncio
import base64
import dataclasses
import io
import uuid

import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import InvalidParamsError, TaskNotCancelableError, TaskNotFoundError
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.struct_pb2 import Value
from PIL import Image

from serve_app.api.a2a import agent as a2a_agent
from serve_app.api.app import build_api
from serve_app.jobs.dispatch import JobDispatcher
from serve_app.jobs.http import JobsApi
from serve_app.services.local import LocalHandle
from tests.fakes import FakeGenerator, fake_services
from tests.helpers import image_bytes, wait_until_async
from tests.unit.test_job_dispatch import ControlledGenerator


def _message(text=None, data=None, raw=None, role=pb.ROLE_USER, **fields) -> pb.Message:
    parts = []
    if text is not None:
        parts.append(pb.Part(text=text))
    if data is not None:
        part = pb.Part()
        part.data.CopyFrom(ParseDict(data, Value()))
        parts.append(part)
    if raw is not None:
        parts.append(pb.Part(raw=raw, media_type="image/png"))
    return pb.Message(message_id=str(uuid.uuid4()), role=role, parts=parts, **fields)


class Agent:
    """build_api's app (the Ingress's), its services over a running dispatcher, and an SDK client."""

    def __init__(self, store, generator):
        self.services = fake_services(generator=generator)
        self.images = self.services.images
        self.dispatcher = JobDispatcher(store, self.images, None, {"image": 1}, 2, sweep_interval_s=3600,
                                        poll_interval_s=0.05)
        self.store = store

    def app(self):
        app = build_api()
        app.state.services = dataclasses.replace(
            self.services, jobs=JobsApi(LocalHandle(self.dispatcher), self.images, None, 2))
        return app

    async def client(self, app=None, streaming=False):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app or self.app()), base_url="http://agent.test",
                                 timeout=30)
        factory = ClientFactory(ClientConfig(httpx_client=http, streaming=streaming))
        return await factory.create_from_url("http://agent.test")


def _run(store, scenario, generator=None):
    generator = generator or FakeGenerator()

    async def main():
        agent = Agent(store, generator)
        agent.dispatcher.start()
        try:
            return await scenario(agent)
        finally:
            await agent.dispatcher.stop()

    return asyncio.run(main())


async def _final_task(client, message, blocking=True) -> pb.Task | pb.Message:
    """SendMessage (not streamed): the task as it is once done (blocking) or at once, or a message."""
    request = pb.SendMessageRequest(message=message)
    request.configuration.return_immediately = not blocking
    responses = [response async for response in client.send_message(request)]
    assert len(responses) == 1
    return getattr(responses[0], responses[0].WhichOneof("payload"))


def test_the_agent_card_names_the_skills_and_an_absolute_jsonrpc_url(store):
    async def scenario(agent):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=agent.app()), base_url="http://agent.test")
        return (await http.get("/.well-known/agent-card.json")).json()

    card = _run(store, scenario)
    assert [skill["id"] for skill in card["skills"]] == ["generate-image", "score-image"], "no video deployed"
    assert card["supportedInterfaces"] == [{"url": "http://agent.test/a2a", "protocolBinding": "JSONRPC",
                                            "protocolVersion": "1.0"}]
    assert card["capabilities"]["streaming"] is True
    with_video = a2a_agent.agent_card("http://x", video=True)
    assert [skill.id for skill in with_video.skills] == ["generate-image", "animate-image", "text-to-video",
                                                         "score-image"]


def test_a_streamed_message_becomes_a_job_with_progress_and_a_png_artifact(store):
    async def scenario(agent):
        client = await agent.client(streaming=True)
        states, tasks, artifacts = [], [], []
        request = pb.SendMessageRequest(message=_message("a red fox", {"seed": 5, "num_inference_steps": 2}))
        async for response in client.send_message(request):
            kind = response.WhichOneof("payload")
            if kind == "task":
                tasks.append(response.task)
                states.append(response.task.status.state)
            elif kind == "status_update":
                states.append(response.status_update.status.state)
            elif kind == "artifact_update":
                artifacts.append(response.artifact_update.artifact)
        return tasks[0], states, artifacts, agent.store.get(tasks[0].id, with_request=True)

    task, states, artifacts, job = _run(store, scenario)
    assert job is not None and job.state == "succeeded", "the task is the job"
    assert job.request["seed"] == 5 and job.request["prompt"] == "a red fox"
    assert states[0] in (pb.TASK_STATE_SUBMITTED, pb.TASK_STATE_WORKING) and states[-1] == pb.TASK_STATE_COMPLETED
    assert len(artifacts) == 1
    png, data = artifacts[0].parts
    assert png.media_type == "image/png" and Image.open(io.BytesIO(png.raw)).format == "PNG"
    assert png.raw == store.read_file(job.id, "image-0.png")
    output = MessageToDict(data.data)
    result = job.result
    assert output["image_id"] == f"{job.id}/image-0.png"
    assert output["prompt"] == "a red fox" and output["enhanced_prompt"] == result["enhanced_prompt"]
    assert output["dimensions"] == {"width": result["width"], "height": result["height"]}
    metric = result["quality_metric"]
    score = result["images"][0]["scores"][metric]
    assert output["quality_score"] == pytest.approx(score)
    assert output["confidence"] == pytest.approx(a2a_agent.confidence(score, metric))
    assert 0 <= output["confidence"] <= 1
    assert output["generation_time_seconds"] == pytest.approx(result["timings"]["total"])
    assert f"attempt 1 (seed {result['attempts'][0]['seed']})" in output["reasoning"]


def test_get_task_from_another_app_reads_the_job_and_a_resent_message_is_the_same_task(store):
    """Two apps (two Ingress replicas) over one job store: the second answers for the first's task."""
    async def scenario(agent):
        first, second = await agent.client(), await agent.client()
        message = _message("a blue heron", {"seed": 3})
        task = await _final_task(first, message)
        again = await _final_task(second, message)
        got = await second.get_task(pb.GetTaskRequest(id=task.id))
        return task, again, got

    task, again, got = _run(store, scenario)
    assert task.status.state == pb.TASK_STATE_COMPLETED
    assert again.id == task.id, "the same message (id) again is the same job, not a second one"
    assert got.id == task.id and got.context_id == task.context_id
    assert got.status.state == pb.TASK_STATE_COMPLETED
    assert got.artifacts[0].parts[0].raw == task.artifacts[0].parts[0].raw


def test_a_tasks_context_id_is_the_messages_context_and_without_one_its_message_id(store):
    """docs/agents.md: the task's context is the message's `context_id` (or its `message_id`), read
    back from the job's idempotency key, which the store keeps with the owner in front."""
    async def scenario(agent):
        client = await agent.client()
        given = await _final_task(client, _message("a grey owl", {"seed": 1}, context_id="conversation-7"))
        bare = _message("a red owl", {"seed": 2})
        without = await _final_task(client, bare)
        got = await client.get_task(pb.GetTaskRequest(id=given.id))
        return given, without, bare.message_id, got

    given, without, message_id, got = _run(store, scenario)
    assert given.context_id == "conversation-7" and got.context_id == "conversation-7"
    assert without.context_id == message_id != without.id


def test_cancel_task_cancels_the_running_job_and_a_finished_one_is_not_cancelable(store):
    generator = ControlledGenerator(gated=True)

    async def scenario(agent):
        client = await agent.client()
        task = await _final_task(client, _message("a slow owl"), blocking=False)
        await wait_until_async(lambda: generator.started == 1, 5)
        cancelled = await client.cancel_task(pb.CancelTaskRequest(id=task.id))
        await wait_until_async(lambda: agent.store.get(task.id).state == "cancelled", 5)
        final = await client.get_task(pb.GetTaskRequest(id=task.id))
        with pytest.raises(TaskNotCancelableError, match="already"):
            await client.cancel_task(pb.CancelTaskRequest(id=task.id))
        with pytest.raises(TaskNotFoundError, match="no task"):
            await client.get_task(pb.GetTaskRequest(id="nope"))
        return task, cancelled, final

    task, cancelled, final = _run(store, scenario, generator)
    assert task.status.state in (pb.TASK_STATE_SUBMITTED, pb.TASK_STATE_WORKING)
    assert cancelled.status.state in (pb.TASK_STATE_WORKING, pb.TASK_STATE_CANCELED)
    assert final.status.state == pb.TASK_STATE_CANCELED and not final.artifacts


@pytest.mark.parametrize("message, words", [
    (_message("a fox", {"num_images": 9}), "num_images"),
    (_message("a fox", {"num_inference_steps": 9}), "num_inference_steps"),
    (_message("a fox", {"width": 300}), "width"),
    (_message("a fox", {"colour": "red"}), "colour"),
    (_message(data={"seed": 1}), "prompt"),
    (_message("a fox", {"skill": "text-to-video"}), "skill"),
    (_message("a fox", {"prompt": "a cat"}), "prompt"),
    (_message("a fox", role=pb.ROLE_AGENT), "role"),
    (_message("a fox", task_id="t1"), "task_id"),
])
def test_bad_arguments_are_a2a_errors_naming_the_field_and_nothing_runs(store, message, words):
    generator = FakeGenerator()

    async def scenario(agent):
        client = await agent.client()
        with pytest.raises(InvalidParamsError) as raised:
            await _final_task(client, message)
        fine = await _final_task(client, _message("a fox"))  # the same client carries on
        return str(raised.value), fine

    error, fine = _run(store, scenario, generator)
    assert words in error, error
    assert fine.status.state == pb.TASK_STATE_COMPLETED
    assert len(generator.calls) == 1, "only the good message reached the generator"


def test_score_image_answers_with_a_message_of_scores(store):

    async def scenario(agent):
        client = await agent.client()
        grey = image_bytes(size=(64, 64), color=(128, 128, 128))
        return await _final_task(client, _message("grey", {"skill": "score-image"}, raw=grey))

    answer = _run(store, scenario)
    assert isinstance(answer, pb.Message) and answer.role == pb.ROLE_AGENT
    scores = MessageToDict(answer.parts[0].data)
    assert scores["images"][0]["scores"]["aesthetic"] == pytest.approx(128 / 255, abs=0.01)


def test_confidence_scales_the_gate_score_over_the_metric_range():
    assert a2a_agent.confidence(25.0, "alignment") == 0.25
    assert a2a_agent.confidence(5.5, "laion") == 0.5
    assert a2a_agent.confidence(0.7, "aesthetic") == 0.7
    assert a2a_agent.confidence(-3, "combined") == 0.0 and a2a_agent.confidence(120, "alignment") == 1.0


def test_every_bad_field_reaches_the_client_as_a_field_violation(store):
    async def scenario(agent):
        client = await agent.client()
        with pytest.raises(InvalidParamsError) as raised:
            await _final_task(client, _message("a fox", {"width": 300, "num_images": 9}))
        return raised.value.data

    data = _run(store, scenario)
    assert [error["field"] for error in data["errors"]] == ["width", "num_images"]
    assert "256-2048" in data["errors"][0]["message"] and "1-4" in data["errors"][1]["message"]


def test_a_task_survives_a_restart_because_its_job_does(backend):
    """A new app, dispatcher and store connection (a restarted Ingress and JobRunner) answer
    GetTask for a task the old ones ran: nothing of it lived in their memory."""
    message = _message("a lighthouse", {"seed": 9})

    async def before(agent):
        return await _final_task(await agent.client(), message)

    async def after(agent):
        client = await agent.client()
        return await client.get_task(pb.GetTaskRequest(id=task.id)), await _final_task(client, message)

    task = _run(backend.open(), before)
    got, resent = _run(backend.open(), after)
    assert task.status.state == pb.TASK_STATE_COMPLETED
    assert got.id == task.id and got.context_id == task.context_id and got.status.state == pb.TASK_STATE_COMPLETED
    assert got.artifacts[0].parts[0].raw == task.artifacts[0].parts[0].raw
    assert resent.id == task.id, "the same message after the restart is still the same task"


def test_subscribing_to_a_task_replays_it_from_the_job_store(store):
    async def scenario(agent):
        task = await _final_task(await agent.client(), _message("a heron", {"seed": 2}))
        streaming = await agent.client(streaming=True)
        events = [response async for response in streaming.subscribe(pb.SubscribeToTaskRequest(id=task.id))]
        return task, [response.WhichOneof("payload") for response in events], events

    task, kinds, events = _run(store, scenario)
    assert kinds == ["task", "artifact_update", "status_update"], kinds
    assert events[1].artifact_update.artifact.parts[0].raw == task.artifacts[0].parts[0].raw
    assert events[2].status_update.status.state == pb.TASK_STATE_COMPLETED


def test_edit_image_takes_the_text_as_the_instruction_and_files_and_earlier_tasks_images_as_references():
    message = _message("make it night", {"skill": "edit-image", "reference_images": [{"job_id": "j1", "index": 1}]},
                       raw=image_bytes(Image.new("RGB", (64, 64))))
    skill, fields = a2a_agent.parse_message(message, video=False)
    assert skill == "edit-image" and fields["prompt"] == "make it night"
    assert fields["reference_images"][0] == {"job_id": "j1", "index": 1}
    assert base64.b64decode(fields["reference_images"][1]).startswith(b"\x89PNG")
    with pytest.raises(InvalidParamsError, match="reference_images"):
        a2a_agent.parse_message(_message("make it night", {"skill": "edit-image"}), video=False)
    assert "edit-image" in [skill.id for skill in a2a_agent.agent_card("http://x", video=False, edits=True).skills]
    assert "edit-image" not in [skill.id for skill in a2a_agent.agent_card("http://x", video=False).skills]


def test_push_configs_round_trip_through_the_job_store_and_a_bad_url_names_url(store):
    """Push configs are targets of the task's job (kept in the store, so any replica sees them); one
    sent with the message is on the job from its start; a metadata URL is InvalidParams naming url.
    Delivery itself is tests/unit/test_webhooks.py's and test_webhooks_app.py's."""
    from a2a.utils.errors import InvalidParamsError

    async def scenario(agent):
        client = await agent.client()
        request = pb.SendMessageRequest(message=_message("a grey owl", {"seed": 1}))
        request.configuration.return_immediately = True
        request.configuration.task_push_notification_config.CopyFrom(
            pb.TaskPushNotificationConfig(url="https://93.184.215.14/push", token="t"))
        [response] = [r async for r in client.send_message(request)]
        task_id = response.task.id
        made = await client.create_task_push_notification_config(
            pb.TaskPushNotificationConfig(task_id=task_id, id="b", url="https://93.184.215.14/b"))
        listed = await client.list_task_push_notification_configs(
            pb.ListTaskPushNotificationConfigsRequest(task_id=task_id))
        await client.delete_task_push_notification_config(
            pb.DeleteTaskPushNotificationConfigRequest(task_id=task_id, id=task_id))
        after = await client.list_task_push_notification_configs(
            pb.ListTaskPushNotificationConfigsRequest(task_id=task_id))
        with pytest.raises(InvalidParamsError) as refused:
            await client.create_task_push_notification_config(
                pb.TaskPushNotificationConfig(task_id=task_id, id="c", url="https://169.254.169.254/latest/"))
        return task_id, made, listed, after, refused.value

    task_id, made, listed, after, refused = _run(store, scenario)
    assert made.task_id == task_id and made.id == "b"
    assert {(c.id, c.token) for c in listed.configs} == {("b", ""), (task_id, "t")}, "the message's config: id = task"
    assert [c.id for c in after.configs] == ["b"]
    assert [t["id"] for t in store.get(task_id).targets] == ["b"]
    assert "url" in str(refused) and "link-local" in str(refused)
