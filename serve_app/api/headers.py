"""Browser-facing response headers, on every HTTP answer of the app (the Guard's refusals too).

- Everywhere: `X-Content-Type-Options: nosniff` (a job file is only ever the type it is served
  as), and no framing by another site (`frame-ancestors 'none'`, with `X-Frame-Options` for older
  browsers): the console and the docs pages must not be clickjacked.
- The console (`/ui`): a strict Content-Security-Policy, so a script injected into a prompt or a
  job's fields can never run, nor send the key the console keeps in sessionStorage anywhere but
  this origin. Its static files load only from `self`; images and videos also from the `data:` and
  `blob:` URLs the console makes of previews and downloaded files (serve_app/ui/static/app.js).
- A route that sets its own Content-Security-Policy keeps it (job files: serve_app.jobs.http.FILE_HEADERS).
"""

from __future__ import annotations

CONSOLE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
               "media-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
               "frame-ancestors 'none'")
# Elsewhere only framing is restricted: the docs pages run inline scripts from a CDN (auth.docs).
DEFAULT_CSP = "frame-ancestors 'none'"
CONSOLE_PREFIX = "/ui"


def csp_for(path: str) -> str:
    return CONSOLE_CSP if path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/") else DEFAULT_CSP


class SecurityHeaders:
    """ASGI middleware: adds the headers above to every HTTP response that does not set them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        root = scope.get("root_path", "")
        path = scope.get("path", "/")
        path = path[len(root):] if root and path.startswith(root) else path
        added = [(b"content-security-policy", csp_for(path).encode()), (b"x-content-type-options", b"nosniff"),
                 (b"x-frame-options", b"DENY")]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in added if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
