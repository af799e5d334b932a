"""A job's Server-Sent Events (`GET /v1/jobs/{id}/events`) as typed values.

The stream sends `state` on every state change (the last one carries the whole job and, on
success, the result), `progress` per denoising step, and `error` if the job expired meanwhile.
The SSE framing itself is parsed by httpx-sse.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from serve_app.types import JobProgress, JobState, JobStatus


class JobEvent(BaseModel):
    """One event of a job's stream."""

    event: Literal["state", "progress", "error"]
    job_id: str | None = None
    state: JobState | None = Field(None, description="For `state` events: the state entered.")
    reason: str | None = None
    progress: JobProgress | None = Field(None, description="For `progress` events.")
    job: JobStatus | None = Field(None, description="On the final `state` event: the job's whole status.")
    result: dict[str, Any] | None = Field(None, description="On the final `state` event of a succeeded job.")
    detail: str | None = Field(None, description="For `error` events.")

    @property
    def final(self) -> bool:
        return self.job is not None or self.event == "error"

    @classmethod
    def from_sse(cls, event: str, data: dict) -> "JobEvent":
        if event == "progress":
            progress = {key: data[key] for key in JobProgress.model_fields if key in data}
            return cls(event="progress", job_id=data.get("job_id"), progress=JobProgress(**progress))
        if event == "state":
            return cls(event="state", job_id=data.get("job_id"), state=data.get("state"), reason=data.get("reason"),
                       job=data.get("job"), result=data.get("result"))
        return cls(event="error", detail=str(data.get("detail", data)))
