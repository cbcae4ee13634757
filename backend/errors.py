"""Refusals as pages for browsers: a request outside ``/api`` whose client asks for HTML (a browser
following a stale link, an out-of-range page number, a feature that does not exist) gets
``frontend/templates/error.html`` with the same status and message; the API, probes, scripts and
tests (which do not ask for HTML) keep FastAPI's JSON ``{"detail": ...}``. A database that cannot
be reached (PostgreSQL restarting, SQLite locked past its timeout) is a 503 with ``Retry-After``,
answered the same two ways, rather than a bare 500.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from clipscope.errors import validation_reason


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def wants_html(request: Request) -> bool:
    """A page request from a browser: not under ``/api`` and ``Accept`` names ``text/html``."""
    return not _is_api(request) and "text/html" in request.headers.get("accept", "")


def validation_message(exc: RequestValidationError) -> str:
    """Each refused input as "where: why", e.g. ``page (query): Input should be greater than or equal to 1``."""
    parts = []
    for error in exc.errors():
        where, *path = error.get("loc", ()) or ("request",)
        name = ".".join(str(p) for p in path)
        parts.append(f"{name} ({where}): {validation_reason(error)}" if name else validation_reason(error))
    return "; ".join(parts) or "The request is not valid."


def _page(request: Request, status_code: int, message: str, headers: dict | None = None) -> Response:
    context = {"status": status_code, "reason": HTTPStatus(status_code).phrase, "message": message}
    return request.app.state.templates.TemplateResponse(request, "error.html", context, status_code=status_code, headers=headers)


def _negotiated(request: Request, response: Response) -> Response:
    """Outside ``/api`` the answer depends on ``Accept``; a cache must know (a 404 may be cached)."""
    if not _is_api(request):
        response.headers.append("vary", "Accept")
    return response


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if wants_html(request):
        message = str(exc.detail)
        if exc.status_code == 404 and message == HTTPStatus.NOT_FOUND.phrase:  # no route: Starlette's bare 404
            message = f"ClipScope has no page at {request.url.path}."
        return _negotiated(request, _page(request, exc.status_code, message, exc.headers))
    return _negotiated(request, await http_exception_handler(request, exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    if wants_html(request):
        return _negotiated(request, _page(request, 422, validation_message(exc)))
    return _negotiated(request, await request_validation_exception_handler(request, exc))


async def _database_unavailable(request: Request, exc: OperationalError) -> Response:
    logging.getLogger(__name__).error("database unavailable for %s %s: %s", request.method, request.url.path, exc.orig or exc)
    refusal = HTTPException(503, "The database cannot be reached right now; try again in a moment.", headers={"Retry-After": "5"})
    return await _http_error(request, refusal)


def install(app: FastAPI) -> None:
    """Route the app's HTTP refusals (raised ones and unknown URLs alike), invalid inputs and an
    unreachable database through the above."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
