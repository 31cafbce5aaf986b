"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and which status each failure gets.

One table (`STATUSES`) maps what can go wrong while serving to an HTTP status: the
request's own fault is a 400, engines that cannot answer a 503. Anything else is a
bug and a 500 whose body says so; it never becomes a 400 by accident.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from moa.engine import EngineError, InvalidRequest
from moa.runner import PipelineError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "service_unavailable", 504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


# exception type -> (status, code), first match wins
STATUSES: tuple[tuple[type[BaseException], int, str | None], ...] = (
    (InvalidRequest, 400, None),  # the request itself: bad messages, prompt beyond the context
    (PipelineError, 503, "engine_failure"),  # every engine call a pipeline needed failed
    (EngineError, 503, "engine_failure"),
)


def as_api_error(exc: BaseException) -> APIError:
    """The APIError a failure is answered with (unknown failures: 500, naming the exception)."""
    if isinstance(exc, APIError):
        return exc
    for kind, status, code in STATUSES:
        if isinstance(exc, kind):
            return APIError(status, str(exc), code=code)
    return APIError(500, f"internal error ({type(exc).__name__}: {exc}); the server log has the traceback",
                    code="internal_error")


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body(status, message, param, code), status_code=status, headers=headers)


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The framework's own errors (a body that is not JSON, an unknown path or method) in OpenAI's shape too."""
    message = "the request body is not valid JSON" if "parsing the body" in str(exc.detail) else str(exc.detail)
    return error_response(exc.status_code, message, code="invalid_json" if exc.status_code == 400 else None,
                          headers=getattr(exc, "headers", None))


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI says 422; OpenAI clients expect 400 with the offending parameter named."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(400, message, param=param, code="invalid_value")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error this server answers, in OpenAI's shape."""

    error: ErrorDetail


_WHY = {400: "invalid request (a bad field names it in `param`)", 401: "missing or invalid API key",
        404: "no such model or pipeline", 413: "request body too large",
        429: "server busy or rate limit reached (see Retry-After)", 500: "internal error (a bug)",
        503: "engines starting or failing (see Retry-After)", 504: "no answer within the request timeout"}


def documented_errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these statuses: the OpenAI error body, and Retry-After where it is sent."""
    retry = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}
    return {status: {"model": ErrorBody, "description": _WHY[status], **({"headers": retry} if status in (429, 503)
                                                                          else {})} for status in statuses}


def without_422(schema: dict) -> dict:
    """FastAPI documents its 422 on every route with a body; this server answers 400 instead."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema
