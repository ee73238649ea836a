"""The short catalogue of homefire errors.

Everything inside raises these; exactly one place (``homefire.serve.ingress``) turns
them into OpenAI-style HTTP errors ``{"error": {"message", "type", "param", "code"}}``.
Each carries only plain arguments so it pickles across Ray processes.
"""

from __future__ import annotations


class HomefireError(Exception):
    """Base class. ``status`` and ``type`` say how the HTTP edge reports it."""

    status: int = 500
    type: str = "internal_error"
    #: Seconds a client should wait before trying again (sent as ``Retry-After`` on 429 and 503).
    retry_after_s: float | None = None
    #: The request never reached a working engine: the ingress may send it again (once nothing was answered).
    retryable: bool = False

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code)
        self.message = message
        self.param = param
        self.code = code

    def __str__(self) -> str:
        return self.message

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ConfigError(HomefireError, ValueError):
    """A config file or argument is invalid; the message names the key and the fix."""

    status = 400
    type = "invalid_config"


class InvalidRequest(HomefireError, ValueError):
    """A request field is invalid; ``param`` names the field."""

    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413


class AuthenticationError(HomefireError):
    status = 401
    type = "authentication_error"


class ModelNotFound(HomefireError, LookupError):
    status = 404
    type = "invalid_request_error"


class AdapterNotFound(ModelNotFound):
    pass


class EngineStartTimeout(HomefireError, TimeoutError):
    """An engine or replica did not become ready within its named timeout."""

    status = 503
    type = "service_unavailable"


class ServiceUnavailable(HomefireError):
    status = 503
    type = "service_unavailable"
    retry_after_s = 1.0


class Overloaded(ServiceUnavailable):
    """The model's queue is full: the request was refused at once instead of waiting unboundedly."""

    retry_after_s = 2.0


class EngineDead(ServiceUnavailable):
    """The engine (or the replica holding it) died before this request produced output; a new one is starting."""

    retryable = True
    retry_after_s = 5.0


class QuotaExceeded(HomefireError):
    status = 429
    type = "rate_limit_error"
    retry_after_s = 1.0


class EngineError(HomefireError):
    """The engine failed while generating."""

    status = 500
    type = "internal_error"
