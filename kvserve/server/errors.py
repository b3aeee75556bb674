"""OpenAI-style error bodies: ApiError carries status, message, param and code; handlers turn every failure into one."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from kvserve.engine.protocol import EngineDeadError
from kvserve.sampling import ParamError

log = logging.getLogger("kvserve.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "client_closed_request", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error that becomes an OpenAI-style JSON body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    @classmethod
    def from_param_error(cls, e: ParamError, names: dict[str, str] | None = None) -> "ApiError":
        """`names` maps engine parameter names to the ones this endpoint's clients sent."""
        return cls(400, str(e), (names or {}).get(e.param, e.param), e.code)

    @classmethod
    def from_engine_dead(cls, e: EngineDeadError) -> "ApiError":
        return cls(503, str(e), code="engine_dead")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))


async def _request_validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(400, "invalid request", code="invalid_value")


async def _client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    return error_response(499, "the client closed the connection", code="client_closed_request")


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", code="internal_error")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected_error)
