"""A stand-in for the Hugging Face hub's HTTP file API, serving local folders as repos, served by
uvicorn on loopback in a background thread. `HF_ENDPOINT` points huggingface_hub at it, so the
real download code (`HfApi.list_repo_tree`, `hf_hub_download`, `snapshot_download`) runs unchanged.

The routes are the ones huggingface_hub 2.4 calls to list and fetch a model repo:
- `GET /api/models/{repo}/revision/{rev}`: repo info (its commit sha and files);
- `GET /api/models/{repo}/tree/{rev}?recursive=true`: the file list with sizes;
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: one file, with the commit and ETag headers the client reads.
A repo listed in `gated` answers 401 with the hub's `X-Error-Code: GatedRepo` unless the request
carries `Authorization: Bearer <token>`. Every request path is kept in `requests`.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from tests.helpers import free_port, wait_until

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path], gated: dict[str, str] | None = None):
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.gated = gated or {}  # repo -> the token that may read it
        self.requests: list[str] = []
        self.port = free_port()
        app = Starlette(routes=[
            Route("/api/models/{org}/{name}/revision/{rev}", self._info),
            Route("/api/models/{org}/{name}/tree/{rev}", self._tree),
            Route("/{org}/{name}/resolve/{rev}/{path:path}", self._file, methods=["GET", "HEAD"]),
        ])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _files(self, repo: str) -> list[Path]:
        folder = self.repos[repo]
        return sorted(path for path in folder.rglob("*") if path.is_file())

    def _refuse(self, request: Request) -> tuple[str, Response | None]:
        repo = f"{request.path_params['org']}/{request.path_params['name']}"
        self.requests.append(request.url.path)
        if repo not in self.repos:
            return repo, JSONResponse({"error": "Repository not found"}, 404, headers={"X-Error-Code": "RepoNotFound"})
        token = self.gated.get(repo)
        if token is not None and request.headers.get("authorization") != f"Bearer {token}":
            return repo, JSONResponse({"error": f"Access to model {repo} is restricted."}, 401,
                                      headers={"X-Error-Code": "GatedRepo",
                                               "X-Error-Message": f"Access to model {repo} is restricted."})
        return repo, None

    async def _info(self, request: Request) -> Response:
        repo, refused = self._refuse(request)
        if refused:
            return refused
        folder = self.repos[repo]
        siblings = [{"rfilename": str(path.relative_to(folder))} for path in self._files(repo)]
        return JSONResponse({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                             "gated": repo in self.gated and "auto", "siblings": siblings})

    async def _tree(self, request: Request) -> Response:
        repo, refused = self._refuse(request)
        if refused:
            return refused
        folder = self.repos[repo]
        entries = [{"type": "file", "path": str(path.relative_to(folder)), "size": path.stat().st_size,
                    "oid": _etag(path)} for path in self._files(repo)]
        return JSONResponse(entries)

    async def _file(self, request: Request) -> Response:
        repo, refused = self._refuse(request)
        if refused:
            return refused
        path = self.repos[repo] / request.path_params["path"]
        if not path.is_file():
            return JSONResponse({"error": "Entry not found"}, 404, headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_etag(path)}"'}
        if request.method == "HEAD":
            return Response(headers={**headers, "Content-Length": str(path.stat().st_size)})
        return FileResponse(path, headers=headers)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        wait_until(lambda: self._server.started, timeout_s=30, what="the fake hub to start")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            self._thread.join(timeout=10)


def _etag(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
