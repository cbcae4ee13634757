"""Optional password authentication (CLIPSCOPE_AUTH=password): signed session cookies, a login
gate for closed browsing, and the rule that labels are written by logged-in users only."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Receive, Scope, Send

SESSION_COOKIE = "clipscope_session"
OPEN_PATHS = ("/login", "/healthz", "/static/")


def auth_enabled(request: Request) -> bool:
    return request.app.state.settings.auth == "password"


def current_user(request: Request) -> str | None:
    if not auth_enabled(request) or "session" not in request.scope:
        return None
    return request.session.get("user")


def author_for_write(request: Request, submitted: str) -> str:
    """Who a label revision is recorded as: the logged-in user with auth on (401 without one), else the typed name."""
    if not auth_enabled(request):
        return submitted
    user = current_user(request)
    if user is None:
        raise HTTPException(401, "Log in to label features.", headers={"WWW-Authenticate": 'Cookie realm="clipscope"'})
    return user


class LoginGate:
    """With closed browsing, everything but the login page, health check and static assets needs a session."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS) or scope.get("session", {}).get("user"):
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/api/"):
            body, status, headers = b'{"detail":"Log in to browse this ClipScope."}', 401, [(b"content-type", b"application/json")]
        else:
            target = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
            body, status, headers = b"", 303, [(b"location", f"/login?next={quote(target)}".encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
