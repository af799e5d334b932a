"""The front ends: the Ingress deployment and the FastAPI app it serves, one subpackage per protocol.

- `rest/`: the genserve HTTP API, one router per resource (images, videos, scores, jobs, catalog,
  health, admin);
- `openai/`: the OpenAI Images API (`/v1/images/generations`, `/v1/images/edits`);
- `mcp/`: MCP tools over streamable HTTP (`/mcp`);
- `a2a/`: the A2A agent (`/a2a`, the Agent Card).

Each translates its wire format into the request models of `serve_app.protocol` and calls the same
`serve_app.services.facade.Services`; none holds limits, validation or state of its own.
"""

from deployments.families import VIDEO_BUILTIN, get_video_family
from serve_app.protocol.schemas import VideoRequest


def builtin_video_params() -> dict[str, dict[str, dict]]:
    """{family: {parameter: JSON schema}} of the built-in video families, read from the registry."""
    families = [get_video_family(name) for name in VIDEO_BUILTIN]
    return {family.name: family.param_schema() for family in families}


# The schemas published here (OpenAPI, the MCP tools) document the built-in video families' own
# parameters, as each family's `Params` declares them.
VideoRequest.family_params_source = builtin_video_params
