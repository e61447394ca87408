"""The one place where exceptions become client-facing errors, shared by the HTTP middleware, the
RPC server and the Lambda adapter.

    {"error": {"message": "...", "type": "invalid_request_error", "code": "context_length_exceeded"}}

EdgeError subclasses carry their HTTP status and code.  Anything else is a 500 with a request id;
its traceback goes to the server log only: a client never sees a stack trace, a path or a class.
"""

from __future__ import annotations

import logging
import uuid

from core.errors import EdgeError

log = logging.getLogger("edge")


class HTTPError(EdgeError):
    """An error raised by the HTTP layer itself (bad JSON, size limit, auth, routing)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


class ServerBusyError(EdgeError):
    """The bounded queue of inference jobs is full: come back shortly (Retry-After)."""
    status = 429
    code = "server_busy"
    retry_after = 1


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


OUT_OF_MEMORY_RETRY_AFTER = 1


def retry_after(exc: BaseException) -> int | None:
    """Seconds after which the same request may well succeed (Retry-After), or None."""
    if isinstance(exc, MemoryError):
        return OUT_OF_MEMORY_RETRY_AFTER
    return getattr(exc, "retry_after", None)


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(status, body) for an exception.  Unknown exceptions are logged with a request id.  A
    MemoryError (a kernel that could not have its scratch memory, say) is the server's passing
    condition, not the request's fault: 503, retry later."""
    if isinstance(exc, MemoryError):
        rid = uuid.uuid4().hex[:12]
        log.warning("request %s: out of memory: %s", rid, exc)
        return 503, {"error": {"message": f"the server is out of memory for now (request id {rid}); retry later",
                               "type": "server_error", "code": "out_of_memory"}}
    if isinstance(exc, EdgeError):
        status, code, message = exc.status, exc.code, str(exc)
        if status >= 500 and not isinstance(exc, HTTPError):
            # our own server-side failures (a damaged weights file...): log the detail, send the kind
            rid = uuid.uuid4().hex[:12]
            log.error("request %s failed: %s", rid, exc)
            message = f"the server could not complete the request (request id {rid})"
        body = {"message": message, "type": error_type(status), "code": code}
        if getattr(exc, "param", None):
            body["param"] = exc.param
        return status, {"error": body}
    rid = uuid.uuid4().hex[:12]
    log.error("request %s failed", rid, exc_info=exc)
    return 500, {"error": {"message": f"internal error (request id {rid})", "type": "server_error",
                           "code": "internal_error"}}


def rpc_error(exc: BaseException) -> list:
    """[code, message] for the msgpack-RPC error slot."""
    status, body = error_body(exc)
    return [body["error"]["code"], body["error"]["message"]]
