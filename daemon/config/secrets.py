"""Secrets and the paths named in config.yaml: one reader, one rule for relative paths.

Contract:
- Every relative path in config.yaml (list files, `audit.path`, `control.callers.*.token_file`,
  `genesys.client_id_file`/`client_secret_file`, `ha.dsn_file`) is relative to the folder of
  config.yaml: `resolve_path(p, base_dir)`.
  Compatibility: before this rule `genesys.client_*_file` and `ha.dsn_file` were relative
  to the working directory. Such a path that does not exist beside config.yaml but does
  from the working directory is still read, with a `config_path_relative_to_cwd` warning
  naming the key (`legacy_cwd=True`); it will stop working in a later release.
- `read_secret(path, what)` is the one secret-file reader (files named in the config and
  systemd credentials alike): UTF-8, surrounding whitespace stripped, an empty or unreadable
  file is an error `"<what>: cannot read <path>: <reason>"` / `"<what>: <path> is empty"`.
  The value never appears in a message or a log.
- `systemd_credential(name)`: `$CREDENTIALS_DIRECTORY/<name>` when present; `env_first`:
  the first non-empty of several environment variables. `env` arguments default to
  `os.environ` (tests pass a dict).
- `resolve_credentials` (Genesys OAuth client) and `resolve_ha_dsn` (PostgreSQL DSN) say
  the order in which they look.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from daemon.errors import ConfguardError, ConfigError, CredentialsError

CLIENT_ID_ENVS = ("GENESYSCLOUD_OAUTHCLIENT_ID", "GENESYS_CLOUD_CLIENT_ID")
CLIENT_SECRET_ENVS = ("GENESYSCLOUD_OAUTHCLIENT_SECRET", "GENESYS_CLOUD_CLIENT_SECRET")
REGION_ENVS = ("GENESYSCLOUD_REGION", "GENESYS_CLOUD_REGION")


class ClientFiles(Protocol):
    """What `resolve_credentials` reads of `models.GenesysSettings` (a protocol, so this
    module does not import the models, which import it)."""

    @property
    def client_id_file(self) -> str | None: ...
    @property
    def client_secret_file(self) -> str | None: ...


class SigningKeySource(Protocol):
    """What `resolve_signing_key_file` reads of `models.AuditSettings`."""

    @property
    def signing_key_file(self) -> str | None: ...


class DsnSource(Protocol):
    """What `resolve_ha_dsn` reads of `models.HaSettings`."""

    @property
    def dsn(self) -> str | None: ...
    @property
    def dsn_file(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Credentials:
    """OAuth client credentials. `repr` hides the secret so it never reaches a log."""

    client_id: str
    client_secret: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(client_id={self.client_id!r}, client_secret='***')"


def resolve_path(p: str, base_dir: Path | None, *, legacy_cwd: str | None = None) -> Path:
    """The path `p` from config.yaml: absolute as is, relative against `base_dir` (the
    folder of config.yaml; None: the working directory, for settings built without a file).

    `legacy_cwd` (the key's dotted name) keeps the old working-directory rule of that key
    alive: when `base_dir / p` does not exist but `p` does, `p` is used and a
    `config_path_relative_to_cwd` warning is logged."""
    path = Path(p)
    if path.is_absolute() or base_dir is None:
        return path
    beside = base_dir / path
    if legacy_cwd is not None and not beside.exists() and path.exists() and beside.resolve() != path.resolve():
        import structlog  # here, not at import: daemon.core imports daemon.config, and structlog loads asyncio

        structlog.get_logger(__name__).warning(
            "config_path_relative_to_cwd", key=legacy_cwd, path=p, base_dir=str(base_dir),
            detail="relative paths are relative to config.yaml's folder; "
                   "this one was found from the working directory: make it absolute or move it")
        return path
    return beside


def env_first(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> str | None:
    """The first non-empty (after stripping) of the environment variables `names`."""
    env = os.environ if env is None else env
    for n in names:
        v = env.get(n, "").strip()
        if v:
            return v
    return None


def systemd_credential(name: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The file of systemd credential `name` (`$CREDENTIALS_DIRECTORY/<name>`, as
    `LoadCredential=` makes it), or None when the service was not given it."""
    env = os.environ if env is None else env
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / name).is_file():
        return Path(cred_dir) / name
    return None


#: Bytes a secret file (token, DSN, client id/secret) may hold.
MAX_SECRET_BYTES = 64 * 1024


def read_file(path: Path, what: str, *, max_bytes: int,
              error: type[ConfguardError] = ConfigError) -> str:
    """The UTF-8 text of `path`, which must be a regular file of at most `max_bytes` bytes.

    Opened non-blocking and checked with fstat before any read, so a FIFO (which would wait
    for a writer), a device such as /dev/zero (endless) or a directory is refused at once,
    and at most `max_bytes + 1` bytes are ever read. Raises `error` with the message
    `{what}: cannot read {path}: {reason}` (never the content); `what` may itself contain
    `{path}` and `{reason}` to shape the whole message instead."""
    def fail(reason: str) -> ConfguardError:
        shown = str(path) if "\x00" not in str(path) else repr(str(path)[:300])
        if "{reason}" in what:
            return error(what.format(path=shown, reason=reason))
        return error(f"{what}: cannot read {shown}: {reason}")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise fail(_reason(exc) if isinstance(exc, OSError) else "a NUL character in the path") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise fail(f"it is {kind}; only regular files are read")
        if st.st_size > max_bytes:
            raise fail(f"it is {st.st_size} bytes, more than the {max_bytes} allowed")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise fail(_reason(exc)) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise fail(f"it is more than the {max_bytes} bytes allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise fail("UnicodeDecodeError") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def read_secret(path: Path, what: str, error: type[ConfguardError] = ConfigError) -> str:
    """The content of secret file `path`, stripped. Raises `error` naming `what` and the
    path (never the content) when it cannot be read, is not a regular file of at most
    MAX_SECRET_BYTES, is not UTF-8, or is empty."""
    value = read_file(path, what, max_bytes=MAX_SECRET_BYTES, error=error).strip()
    if not value:
        raise error(f"{what}: {path} is empty")
    return value


def _secret(file_setting: str | None, key: str, envs: tuple[str, ...], credential: str,
            env: Mapping[str, str], base_dir: Path | None) -> str | None:
    if file_setting:
        path = resolve_path(file_setting, base_dir, legacy_cwd=key)
        return read_secret(path, key, CredentialsError)
    from_env = env_first(envs, env)
    if from_env:
        return from_env
    cred = systemd_credential(credential, env)
    if cred is not None:
        return read_secret(cred, f"systemd credential {credential}", CredentialsError)
    return None


def resolve_credentials(settings: ClientFiles, env: Mapping[str, str] | None = None, *,
                        base_dir: Path | None = None) -> Credentials:
    """Find the client id and secret: config-named files (relative to `base_dir`, the folder
    of config.yaml), then environment, then systemd credentials
    (`$CREDENTIALS_DIRECTORY/genesys_client_id`, `.../genesys_client_secret`)."""
    env = os.environ if env is None else env
    cid = _secret(settings.client_id_file, "genesys.client_id_file", CLIENT_ID_ENVS,
                  "genesys_client_id", env, base_dir)
    secret = _secret(settings.client_secret_file, "genesys.client_secret_file", CLIENT_SECRET_ENVS,
                     "genesys_client_secret", env, base_dir)
    if not cid or not secret:
        missing = "client id" if not cid else "client secret"
        raise CredentialsError(
            f"no OAuth {missing} found: set {CLIENT_ID_ENVS[0]} and {CLIENT_SECRET_ENVS[0]} "
            f"(or {CLIENT_ID_ENVS[1]}/{CLIENT_SECRET_ENVS[1]}), or genesys.client_id_file and "
            f"genesys.client_secret_file, or systemd credentials genesys_client_id/genesys_client_secret")
    return Credentials(cid, secret)


def resolve_ha_dsn(settings: DsnSource, env: Mapping[str, str] | None = None, *,
                   base_dir: Path | None = None) -> str:
    """The PostgreSQL DSN for `ha.backend: postgres`: `ha.dsn`, else `ha.dsn_file` (relative
    to `base_dir`, the folder of config.yaml), else the systemd credential `ha_dsn`
    (`$CREDENTIALS_DIRECTORY/ha_dsn`). Raises ConfigError naming where it looked (never the
    DSN itself: it may carry a password)."""
    if settings.dsn:
        return settings.dsn
    if settings.dsn_file:
        return read_secret(resolve_path(settings.dsn_file, base_dir, legacy_cwd="ha.dsn_file"), "ha.dsn_file")
    credential = systemd_credential("ha_dsn", env)
    if credential is not None:
        return read_secret(credential, "systemd credential ha_dsn")
    raise ConfigError("ha.backend is postgres but no database is named: set ha.dsn or "
                      "ha.dsn_file, or the systemd credential ha_dsn")


def resolve_signing_key_file(settings: SigningKeySource, env: Mapping[str, str] | None = None, *,
                             base_dir: Path | None = None) -> Path | None:
    """The audit checkpoint signing key's file: `audit.signing_key_file` (relative to
    `base_dir`), else the systemd credential `audit_signing_key`, else None (no
    checkpoints). Only the path: the key is read by `daemon.service.checkpoint`."""
    if settings.signing_key_file:
        return resolve_path(settings.signing_key_file, base_dir)
    return systemd_credential("audit_signing_key", env)
