"""Domain errors and their HTTP mapping, in one place (after KServe's `errors.py`).

Code raises these where a problem is found; `register_error_handlers` turns each into a JSON
`{"error": "..."}` response with the right status. Routes never build error responses.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from normserve.service.access_log import REQUEST_ID_HEADER
from normserve.service.schemas import ErrorResponse

log = logging.getLogger("normserve.errors")


class NormserveError(Exception):
    status_code = 500
    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(NormserveError):
    status_code = 400


class UnsupportedMediaType(NormserveError):
    status_code = 415


class PayloadTooLarge(NormserveError):
    status_code = 413


class ModelNotFound(NormserveError):
    status_code = 404


class ModelNotReady(NormserveError):
    status_code = 503


class NotAcceptable(NormserveError):
    status_code = 406


class InferenceError(NormserveError):
    status_code = 500


class Overloaded(NormserveError):
    """The model's queue is full: refused at once, with a hint when to retry."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class RequestTimeout(NormserveError):
    """The request's inference did not finish within NORMSERVE_REQUEST_TIMEOUT_S."""

    status_code = 504


class Unauthorized(NormserveError):
    """Missing or wrong API key (only when `NORMSERVE_API_KEY` is set)."""

    status_code = 401

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        # RFC 6750 §3: the Bearer challenge, with error="invalid_token" when a key was sent but is wrong.
        challenge = 'Bearer realm="normserve"' + (', error="invalid_token"' if invalid_token else "")
        self.headers = {"WWW-Authenticate": challenge}


# What each status means, for the OpenAPI description of the routes that can answer it.
_MEANINGS = {
    400: "bad input: undecodable or truncated image, wrong field, too small, malformed tensors",
    401: "missing or wrong API key (only when NORMSERVE_API_KEY is set)",
    404: "unknown model or version",
    406: "the Accept header asks for an image type the route cannot answer with",
    413: "request body or image too large",
    415: "unsupported Content-Type or image format",
    422: "invalid query or path parameter",
    500: "the model failed while running (ONNX Runtime error); the server keeps serving",
    503: "model not ready, server draining, or the model's queue is full (see Retry-After)",
    504: "the request's inference did not finish within NORMSERVE_REQUEST_TIMEOUT_S",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the error statuses a route can answer, all `{"error": "..."}`."""
    return {code: {"model": ErrorResponse, "description": _MEANINGS[code]} for code in codes}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def domain_error_response(request: Request, exc: NormserveError) -> JSONResponse:
    request.state.error = type(exc).__name__  # the failure reason label in the metrics
    if exc.status_code >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message)
    return error_response(exc.status_code, exc.message, exc.headers)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    return error_response(422, _validation_message(exc))


def disconnected_response(request: Request) -> JSONResponse:
    """The client left while its body was read, or the server gave up on the body
    (NORMSERVE_BODY_TIMEOUT_S, service/http_limits.py): an answer nobody reads, and no traceback."""
    request.state.error = "ClientDisconnect"
    return error_response(400, "client disconnected before the request body was received")


def register_error_handlers(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception) -> JSONResponse:
        return domain_error_response(request, cast(NormserveError, exc))

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        return validation_error_response(cast(RequestValidationError, exc))

    async def http(_: Request, exc: Exception) -> JSONResponse:
        exc = cast(StarletteHTTPException, exc)
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        # Answered outside every middleware (Starlette's ServerErrorMiddleware), so the request
        # id the access-log middleware chose is added here.
        request_id = getattr(request.state, "request_id", None)
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        return error_response(500, f"internal error ({type(exc).__name__})", headers)

    async def disconnected(request: Request, _: Exception) -> JSONResponse:
        return disconnected_response(request)

    app.add_exception_handler(NormserveError, domain)
    app.add_exception_handler(ClientDisconnect, disconnected)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, unexpected)
