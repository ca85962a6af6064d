"""One error shape for every failure: OpenAI's {"error": {message, type, param, code}}.

Routes and services raise `APIError` (or let validation fail); the handlers registered once in
`build_app` turn everything into that shape. Unexpected exceptions become a 500 that says so and
is logged with its traceback; bad input never reaches that path.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from editserve.edits.errors import (
    AlreadyUndone,
    EditNotFound,
    EditRefused,
    InvalidEdit,
    MethodUnavailable,
    StorageRefused,
)
from editserve.engine.limits import QueueFull, RequestTooLarge

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem, as 'field.path: what is wrong', and the field path."""
    errors = exc.errors()
    if not errors:
        return "the request is invalid", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail})".replace(" ()", ""), None
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return "the request body is empty: send a JSON object", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    kind = first.get("type")
    message = _FRIENDLY.get(kind or "", first.get("msg", "invalid value"))
    if not param and kind in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object (send Content-Type: application/json)"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


# pydantic's wording where a plainer one helps.
_FRIENDLY = {"missing": "this field is required", "too_short": "must not be empty"}

_STATUS_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    503: "unavailable_error",  # what a request needs is not installed here
    507: "storage_error",
}

# The one place where the edit domain's refusals become HTTP statuses.
EDIT_STATUSES: dict[type[EditRefused], int] = {
    InvalidEdit: 400,
    EditNotFound: 404,
    AlreadyUndone: 409,
    MethodUnavailable: 503,
    StorageRefused: 507,
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        body = error_body(exc.message, exc.type, exc.param, exc.code)
        return _json(exc.status, body, exc.headers)

    @app.exception_handler(EditRefused)
    async def _edit_refused(_: Request, exc: EditRefused) -> JSONResponse:
        status = next((s for cls, s in EDIT_STATUSES.items() if isinstance(exc, cls)), 400)
        kind = _STATUS_TYPES.get(status, "invalid_request_error")
        return _json(status, error_body(exc.message, kind, exc.param))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return _json(400, error_body(message, "invalid_request_error", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        message = str(exc.detail)
        if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
            message = f"{message.lower()}: {request.method} {request.url.path}"
        elif message == "There was an error parsing the body":  # FastAPI's words, not JSON errors
            message = "the request body could not be read: send UTF-8 JSON nested less deeply"
        return _json(exc.status_code, error_body(message, kind))

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        body = error_body(str(exc), "rate_limit_error", code="queue_full")
        return _json(429, body, {"retry-after": str(exc.retry_after_s)})

    @app.exception_handler(RequestTooLarge)
    async def _too_large(_: Request, exc: RequestTooLarge) -> JSONResponse:
        body = error_body(str(exc), "invalid_request_error", exc.param, "context_length_exceeded")
        return _json(400, body)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> JSONResponse:
        # Nobody reads this; 499 (nginx's "client closed request") keeps the log and metrics honest.
        return _json(499, error_body("the client closed the connection", "client_closed"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _json(500, error_body(f"internal error: {exc.__class__.__name__}", "server_error"))
