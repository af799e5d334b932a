"""What the JobRunner POSTs for an A2A push config (a target of kind `a2a`, see `push_configs`).

`push_body` is the task as the SDK's `BasePushNotificationSender` posts it (a StreamResponse
holding the Task), with each result file a signed URL rather than its bytes. Each delivery is also
signed (Standard Webhooks) with the owner's secret where there is one, so a receiver can verify it
came from this service; A2A's own token header is sent as the config asks.
"""

from __future__ import annotations

from collections.abc import Callable

from a2a.types import a2a_pb2 as pb
from a2a.utils.proto_utils import to_stream_response
from google.protobuf.json_format import MessageToDict

from serve_app.api.a2a.agent import _data_part, _status, context_of, image_outputs
from serve_app.jobs.model import SUCCEEDED, Job


def push_body(job: Job, delivery: dict, file_url: Callable[[str], str]) -> dict:
    """The JSON the JobRunner POSTs for an `a2a` target: the task as the SDK's sender sends it
    (`to_stream_response`), its files as signed URLs. A `jobs.webhooks.Renderer`."""
    task = pb.Task(id=job.id, context_id=context_of(job), status=_status(job))
    if job.state == SUCCEEDED and job.result:
        if job.kind == "image":
            described = [(output, output["image_id"].split("/", 1)[1]) for output in image_outputs(job)]
        else:
            described = [({k: v for k, v in job.result.items() if k not in ("file", "url")}, job.result["file"])]
        for data, name in described:
            meta = job.file(name)
            task.artifacts.append(pb.Artifact(artifact_id=f"{job.id}-{name}", name=name, parts=[
                pb.Part(url=file_url(name), media_type=meta.content_type if meta else "", filename=name),
                _data_part(data)]))
    return MessageToDict(to_stream_response(task))
