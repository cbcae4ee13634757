"""Cross-site request forgery protection.

Two layers: every unsafe request whose ``Origin`` (or ``Sec-Fetch-Site``) says it comes from
another site is refused; and every HTML form carries a token that must match the
``clipscope_csrf`` cookie (SameSite=Strict, HttpOnly) set on the browser's first visit.
Non-browser clients (scripts using the JSON API) send no Origin and are not affected.
"""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Form, HTTPException, Request
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_COOKIE = "clipscope_csrf"
CSRF_FIELD = "csrf_token"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class CsrfMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if scope["method"] in UNSAFE and self._cross_site(headers):
            await _plain(send, 403, b"Cross-site request refused.")
            return
        token = cookie_parser(headers.get("cookie", "")).get(CSRF_COOKIE)  # Starlette's lenient parser
        token = token if token and len(token) >= 32 else None
        fresh = token is None
        token = token or secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf_token"] = token

        async def send_with_cookie(message: Message) -> None:
            if fresh and message["type"] == "http.response.start":
                value = f"{CSRF_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", value.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    @staticmethod
    def _cross_site(headers: dict[str, str]) -> bool:
        if headers.get("sec-fetch-site") == "cross-site":
            return True
        origin = headers.get("origin")
        if not origin or origin == "null":
            return origin == "null"
        return urlsplit(origin).netloc != headers.get("host", "")


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": body})


def verify_form_token(request: Request, csrf_token: Annotated[str, Form()] = "") -> None:
    """Dependency of every HTML form route: the form's token must equal the cookie's."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie, csrf_token):
        raise HTTPException(403, "The form is missing its security token or it has expired; reload the page and try again.")


CsrfForm = Depends(verify_form_token)
