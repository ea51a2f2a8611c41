"""The one exception tree of confguard. Every error an operator can see is one of these.

Messages are written for operators: what went wrong, what it means, what to do. They never
contain secrets or tokens. Lower-level errors (httpx, websockets, yaml, OS) are translated
at the edge into this tree.

    ConfguardError
    ├── ConfigError              bad config.yaml or list file; carries file:line:col
    │   └── ConfigErrors         several of them, found in one pass
    ├── CredentialsError         no client id/secret found in the environment or files
    ├── AuthError                the token endpoint refused or failed (bad secret, outage)
    ├── ApiError                 a Genesys REST call failed; carries status, message, correlation id
    │   ├── BadRequestError      400
    │   ├── UnauthorizedError    401 (token expired or revoked; already retried once)
    │   ├── ForbiddenError       403 (missing permission; .missing_permissions)
    │   ├── NotFoundError        404 (conversation or participant gone)
    │   ├── ConflictError        409 (conflicting operation in progress)
    │   ├── RateLimitedError     429 (.retry_after seconds)
    │   ├── ServerError          5xx
    │   └── TransportError       no HTTP answer at all (connect refused, timeout, TLS, reset)
    ├── SubscriptionError        topics rejected, too many channels, channel creation failed
    ├── StreamError              the notification WebSocket failed in a way retries cannot mend
    ├── TargetError              `confguard eject` could not resolve exactly one party
    ├── AuditError               the audit trail cannot be written, or verification failed
    └── ReplayError              a recorded events file or expectation file is unusable
"""

from __future__ import annotations

from collections.abc import Sequence


class ConfguardError(Exception):
    """Base of every confguard error. `str(err)` is a complete one-line message for operators."""


class ConfigError(ConfguardError):
    """A configuration problem, located as precisely as the input allows.

    `str()` gives `FILE:LINE:COL: message` (line and column 1-based) when a position is known.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 col: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.col = col
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.file or ""
        if self.line is not None:
            where += f":{self.line}:{self.col or 1}"
        return f"{where}: {self.message}" if where else self.message


class ConfigErrors(ConfigError):
    """The configuration problems found in one pass (`errors`, in file order). `str()` is
    one `FILE:LINE:COL: message` line per problem. `config`: what could be
    validated all the same (the configuration without the rules that failed), for callers
    that go on to check more (e.g. compile the remaining rules), or None."""

    def __init__(self, errors: list[ConfigError], *, config: object = None) -> None:
        self.errors = sorted(errors, key=lambda e: (e.file or "", e.line or 0, e.col or 0))
        self.config = config
        first = self.errors[0]
        super().__init__(first.message, file=first.file, line=first.line, col=first.col)

    def __str__(self) -> str:
        return "\n".join(" ".join(str(e).split()) for e in self.errors)

    @staticmethod
    def raise_all(errors: list[ConfigError], *, config: object = None) -> None:
        """Raise nothing (no errors), the one error as it is (when there is no `config` to
        hand on), or a ConfigErrors of them all."""
        flat: list[ConfigError] = []
        for e in errors:
            flat.extend(e.errors if isinstance(e, ConfigErrors) else [e])
        if len(flat) == 1 and config is None:
            raise flat[0]
        if flat:
            raise ConfigErrors(flat, config=config)


class CredentialsError(ConfguardError):
    """No usable OAuth client credentials were found."""


class AuthError(ConfguardError):
    """The OAuth token endpoint did not issue a token."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ApiError(ConfguardError):
    """A Genesys Cloud REST call failed.

    Attributes: `status` (HTTP status, 0 for transport errors), `message` (the ErrorBody
    message, or a description), `code` (ErrorBody code), `correlation_id` (the
    `inin-correlation-id` header or ErrorBody `contextId`), `method` and `path`.
    """

    status: int = 0

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 correlation_id: str | None = None, method: str = "", path: str = "",
                 details: Sequence[str] = ()) -> None:
        if status is not None:
            self.status = status
        self.message = message
        self.code = code
        self.correlation_id = correlation_id
        self.method = method
        self.path = path
        self.details = tuple(details)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        head = f"{self.method} {self.path}: " if self.method else ""
        status = f"HTTP {self.status}: " if self.status else ""
        corr = f" (correlation id {self.correlation_id})" if self.correlation_id else ""
        return f"{head}{status}{self.message}{corr}"


class BadRequestError(ApiError):
    status = 400


class InvalidIdError(BadRequestError):
    """An id that is not safe in a REST path (`daemon.core.ids.is_path_id`): refused before
    anything is sent (`status` 400, `code` `invalid_id`)."""


class NotSentError(ApiError):
    """A request abandoned before its body was written (a lease deadline passed, or a send
    gate closed): Genesys cannot have acted on it. `status` 0."""


class UnauthorizedError(ApiError):
    status = 401


class ForbiddenError(ApiError):
    """403. `missing_permissions` lists what the error body names, e.g.
    `conversation:communication:disconnect`."""

    status = 403

    @property
    def missing_permissions(self) -> list[str]:
        import re

        text = " ".join((self.message, *self.details))
        return sorted(set(re.findall(r"\b[a-zA-Z]+(?::[a-zA-Z*]+){2}\b", text)))


class NotFoundError(ApiError):
    status = 404


class ConflictError(ApiError):
    status = 409


class RateLimitedError(ApiError):
    """429. `retry_after` is the server's `Retry-After` in seconds, when it gave one;
    `limit` the body's `limit` object (`{"key", "namespace", "value"}`), when it had one
    (Genesys since June 2023, "not guaranteed")."""

    status = 429

    def __init__(self, message: str, *, retry_after: float | None = None,
                 limit: dict[str, object] | None = None, **kw: object) -> None:
        self.retry_after = retry_after
        self.limit = limit
        super().__init__(message, **kw)  # type: ignore[arg-type]


class ServerError(ApiError):
    status = 500


class TransportError(ApiError):
    """No HTTP answer: connection refused or reset, timeout, TLS failure."""

    status = 0


class SubscriptionError(ConfguardError):
    """Notification topics could not all be subscribed; the message names topics and permissions."""


class StreamError(ConfguardError):
    """The notification stream failed in a way that reconnecting cannot mend."""


class TargetError(ConfguardError):
    """`confguard eject` could not resolve exactly one live party."""


class AuditError(ConfguardError):
    """The audit trail could not be written, or `audit verify` found a broken chain."""


class ReplayError(ConfguardError):
    """A recorded events file or an expectation file cannot be used."""


def api_error_for_status(status: int) -> type[ApiError]:
    """The ApiError subclass for an HTTP status (>= 400)."""
    if status >= 500:
        return ServerError
    return {
        400: BadRequestError,
        401: UnauthorizedError,
        403: ForbiddenError,
        404: NotFoundError,
        409: ConflictError,
        429: RateLimitedError,
    }.get(status, ApiError)
