"""Durable asynchronous jobs: a job store (SQLite or Redis), a dispatcher and its Serve deployment.

- `model`: the job record and its states;
- `store`: the `JobStore` interface;
- `fairness`: weighted fair queueing across key groups (the claim's choice, positions, shares);
- `sqlite_store`, `redis_store`: the two implementations;
- `results`: a finished sync response turned into files plus result JSON;
- `dispatch`: the plain-async dispatcher (claim, run, retry, cancel), testable without Ray;
- `runner`: the `JobRunner` Serve deployment that owns the store (`open_store`) and the dispatcher;
- `http`: what the ingress's /v1/jobs routes do (validation at submit, JSON, SSE);
- `webhooks`: a job's end told to its webhook and A2A push receivers, signed, durably, safely;
- `schemas`: deprecated; the HTTP contract of /v1/jobs is `serve_app.protocol.jobs`.
"""
