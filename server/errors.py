"""Errors in OpenAI's shape, and the one place that maps failures to HTTP statuses.

Body: ``{"error": {"message", "type", "param", "code"}}`` with string codes. Statuses:

  400  a request that can't be served: malformed JSON, JSON that doesn't match the schema
       (wrong types, missing fields: code invalid_type / missing_required_parameter; 400 as
       OpenAI and vLLM answer them, where FastAPI's default is 422), bad sampling values, caps
       (n, max_tokens, stop, logprobs) exceeded, prompt too long, unsupported features
  401  missing or wrong API key (only when the server has one)
  404  unknown model or route            405  wrong method
  413  request body over the size cap
  429  a client's rate limit (code rate_limit_exceeded, Retry-After) or cost cap
       (insufficient_quota) reached: server/limits.py
  499  (log only) the client went away before the response was complete
  503  the engine is not running, the server is shutting down, or too many requests in flight
  504  the request ran past the server's request timeout
  500  a bug: the message is generic, the traceback goes to the server log only

Every error also has a metric type (stoke_request_errors_total{type}).
"""

from __future__ import annotations

import math
from typing import Any

# stoke_request_errors_total{type}: the label values, all exported from the start.
ERROR_METRIC_TYPES = ("timeout", "context_length", "invalid_request", "overloaded", "rate_limited",
                      "internal", "aborted")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str = "invalid_request_error", param: str | None = None,
                 metric: str = "invalid_request", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.metric = metric
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, *, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(message: str, *, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")


def response_not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No response with id '{response_id:.80}' is stored", param=param, code="not_found")


def context_length(message: str, *, param: str | None = "prompt", code: str = "context_length_exceeded") -> APIError:
    return APIError(400, message, param=param, code=code, metric="context_length")


def unavailable(message: str, *, code: str = "overloaded") -> APIError:
    """503 for load: shutting down, too many requests in flight (metric type "overloaded")."""
    return APIError(503, message, type="service_unavailable_error", code=code, metric="overloaded")


def engine_dead(message: str = "the engine is not running") -> APIError:
    """503 because the worker process is gone: a server fault (metric type "internal")."""
    return APIError(503, message, type="service_unavailable_error", code="engine_unavailable", metric="internal")


def timeout(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within the server's {seconds:g}s request timeout",
                    type="timeout_error", code="timeout", metric="timeout")


def rate_limited(message: str, *, kind: str, retry_after: float, headers: dict[str, str]) -> APIError:
    """429 as OpenAI's: type "requests" or "tokens"; Retry-After tells the openai SDK (which
    retries 429s) how long to wait."""
    return APIError(429, message, type=kind, code="rate_limit_exceeded", metric="rate_limited",
                    headers=headers | {"retry-after": str(math.ceil(retry_after)),
                                       "retry-after-ms": str(math.ceil(retry_after * 1000))})


def quota_exceeded(message: str) -> APIError:
    """429 for a spent cost cap, as OpenAI's insufficient_quota: the SDK is told not to retry."""
    return APIError(429, message, type="insufficient_quota", code="insufficient_quota", metric="rate_limited",
                    headers={"x-should-retry": "false"})


def internal() -> APIError:
    return APIError(500, "internal server error", type="internal_error", code="internal_error", metric="internal")


def unauthorized() -> APIError:
    return APIError(401, "invalid or missing API key (send it as 'Authorization: Bearer <key>')",
                    type="authentication_error", code="invalid_api_key", metric="invalid_request")


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds the server's limit of {limit} bytes",
                    code="request_too_large", metric="invalid_request")


def _param(loc: tuple[Any, ...]) -> str | None:
    """A dotted parameter name from a pydantic location, without "body" and union-member tags."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        "[" in p or p in ("str", "int", "float", "bool", "list", "dict", "none")))]
    return ".".join(parts) or None


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """FastAPI/pydantic request validation errors → 400, as OpenAI's and vLLM's (a client's
    BadRequestError), with a code that tells malformed JSON from the schema's complaints."""
    first = errors[0] if errors else {"type": "value_error", "msg": "invalid request", "loc": ()}
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    # A value no text can hold (server/protocol.py): a bad value, wherever a union put it.
    for e in errors:
        if e.get("type") == "lone_surrogate":
            param = _param(tuple(e.get("loc", ())) + (e["ctx"]["field"],))
            return APIError(400, f"'{param}' holds half a UTF-16 surrogate pair (e.g. \\ud800 alone): "
                                 "not text", param=param, code="invalid_value")
    if first.get("type") == "missing":
        if param is None:
            return APIError(400, "the request body is missing", code="missing_required_parameter")
        return APIError(400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    # pydantic's msg describes the expectation ("Input should be a valid integer"), never internals.
    msg = str(first.get("msg", "invalid value"))
    others = [e for e in errors[1:] if _param(tuple(e.get("loc", ()))) != param]
    more = f" (and {len(others)} more)" if others else ""
    if len(errors) > 1 and not others:  # one field, several accepted forms (a union)
        msg = f"{msg}, or one of the other accepted forms"
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{msg}{more}", param=param, code="invalid_type")
