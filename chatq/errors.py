"""The whole exception tree of chatq, and the one mapping to HTTP status and error body.

Every error a client sees has one shape: ``{"error": {"type", "code", "message",
"request_id"}}`` (the OpenAI error fields), in JSON or as an SSE ``error`` event.

ChatqError
├── ConfigError            a setting is missing or unsafe (raised at start)
├── EngineError            the inference engine failed to start or to run
├── LaunchError            a process chatq started exited, or was not ready in time
└── ClientError            the request cannot be served as sent (4xx)
    ├── InvalidRequest       400 invalid_request_error
    │   └── ContentRefused     400 content_policy / system_prompt_locked (the operator's rules)
    ├── Unauthorized         401 authentication_error
    ├── Forbidden            403 permission_error (a role may not do this)
    ├── NotFound             404 not_found (also another user's thing: never its content)
    ├── Conflict             409 conflict (a taken name, a conversation still answering)
    ├── ModelNotFound        404 model_not_found
    ├── RequestTimeout       408 request_timeout (the head or body did not arrive in time)
    ├── RequestTooLarge      413 request_too_large
    ├── RequestHeaderTooLarge 431 request_header_too_large (the request line and headers)
    └── Overloaded           429 rate_limit_error (queue full), with Retry-After
ServerError                  5xx, raised while serving
    ├── UpstreamUnavailable  503 the message plane (or the database, Redis) is unreachable
    ├── StreamFailed         502 the stream from the worker broke (gap, lost worker)
    └── DeadlineExceeded     504 no answer before the request's deadline
"""

from __future__ import annotations

import re
from typing import ClassVar

import msgspec

_FIELD = re.compile(r"at `\$\.?([^`]*)`")


class ChatqError(Exception):
    """Base of every error chatq raises on purpose."""


class ConfigError(ChatqError):
    """A setting is missing, malformed or unsafe."""


class EngineError(ChatqError):
    """The inference engine could not start or failed while generating."""


class LaunchError(ChatqError):
    """A process chatq started exited, or did not become ready in time."""


class ApiError(ChatqError):
    """An error with an HTTP status and a code that clients can rely on."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: str = code or type(self).default_code
        self.param = param
        self.retry_after = retry_after


class ClientError(ApiError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class InvalidRequest(ClientError):
    pass


class ContentRefused(InvalidRequest):
    """The operator's rules refuse the request's text: a content policy, a locked system prompt."""

    default_code = "content_policy"


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"
    default_code = "forbidden"


class NotFound(ClientError):
    status = 404
    default_code = "not_found"


class Conflict(ClientError):
    status = 409
    default_code = "conflict"


class ModelNotFound(ClientError):
    status = 404
    default_code = "model_not_found"


class RequestTimeout(ClientError):
    status = 408
    default_code = "request_timeout"


class RequestTooLarge(ClientError):
    status = 413
    default_code = "request_too_large"


class RequestHeaderTooLarge(ClientError):
    status = 431
    default_code = "request_header_too_large"


class Overloaded(ClientError):
    status = 429
    type = "rate_limit_error"
    default_code = "queue_full"


class ServerError(ApiError):
    pass


class UpstreamUnavailable(ServerError):
    status = 503
    default_code = "service_unavailable"


class StreamFailed(ServerError):
    status = 502
    default_code = "stream_failed"


class DeadlineExceeded(ServerError):
    status = 504
    type = "timeout"
    default_code = "deadline_exceeded"


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    type: str
    code: str
    message: str
    request_id: str | None = None
    param: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


def error_body(exc: ApiError, request_id: str | None) -> ErrorBody:
    """The standard error body for an ApiError."""
    return ErrorBody(
        ErrorDetail(
            type=exc.type,
            code=exc.code,
            message=exc.message,
            request_id=request_id,
            param=exc.param,
        )
    )


def invalid_field(exc: msgspec.ValidationError) -> str | None:
    """The field a msgspec validation error is about, as `messages.0.role`."""
    match = _FIELD.search(str(exc))
    return re.sub(r"\[(\d+)\]", r".\1", match.group(1)) or None if match else None
