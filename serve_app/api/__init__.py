"""The front ends: the Ingress deployment and the FastAPI app it serves, one subpackage per protocol.

- `rest/`: the genserve HTTP API, one router per resource (images, videos, scores, jobs, catalog,
  health, admin);
- `openai/`: the OpenAI Images API (`/v1/images/generations`, `/v1/images/edits`);
- `mcp/`: MCP tools over streamable HTTP (`/mcp`);
- `a2a/`: the A2A agent (`/a2a`, the Agent Card).

Each translates its wire format into the request models of `serve_app.protocol` and calls the same
`serve_app.services.facade.Services`; none holds limits, validation or state of its own.
"""
