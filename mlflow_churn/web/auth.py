"""Bearer tokens of the HTTP apps: checks, the generated admin token file, exposure rule.

- :func:`check_bearer`: ``Authorization: Bearer <token>`` compared with
  :func:`hmac.compare_digest`; missing -> 401 (with ``WWW-Authenticate``), wrong -> 403,
  each naming the config key that holds the token (never the token).
- :func:`token_file`: read ``path`` or create it with a random token, mode 0600, never
  through a symbolic link (O_NOFOLLOW), its directory kept 0700.
- :func:`check_exposure`: a service bound to a non-loopback address must have its tokens.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import os
import secrets
import stat
from pathlib import Path

from starlette.requests import HTTPConnection

from mlflow_churn.errors import ChurnError
from mlflow_churn.web.errors import HttpError


def bearer(conn: HTTPConnection) -> str | None:
    """The bearer token of the request, None without one."""
    header = conn.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip()


def same_token(given: str | None, token: str | None) -> bool:
    """Constant-time comparison; False when either side is missing."""
    if not given or not token:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8"))


def check_bearer(conn: HTTPConnection, tokens: dict[str, str | None], what: str) -> None:
    """HttpError 401/403 unless the request carries one of ``tokens`` (config key -> token;
    None entries are ignored). ``what`` names the protected routes in the detail."""
    keys = " or ".join(f"<{k}>" for k, v in tokens.items() if v)
    given = bearer(conn)
    if given is None:
        raise HttpError(401, f"{what} need the header 'Authorization: Bearer {keys}'",
                        headers={"WWW-Authenticate": "Bearer"})
    if not any(same_token(given, t) for t in tokens.values()):
        raise HttpError(403, f"the bearer token is not {keys}; {what} need it")


def token_file(path: Path) -> str:
    """The token in ``path``; a new random one (``secrets.token_urlsafe(32)``) written with
    mode 0600 when the file does not exist. Never follows a link: a symbolic link at ``path``
    or in place of its directory is refused (O_NOFOLLOW), not read or written through; the
    directory is kept 0700 and the file 0600. ChurnError when it cannot be read or written."""
    path = Path(path)
    try:
        if path.parent.is_symlink():
            raise ChurnError(f"the token directory {path.parent} is a symbolic link; remove it (the "
                             "token is never written through a link)")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700, follow_symlinks=False)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            with os.fdopen(fd) as fh:
                info = os.fstat(fh.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise ChurnError(f"the token file {path} is not a regular file; remove it")
                if info.st_mode & 0o077:
                    os.fchmod(fh.fileno(), 0o600)  # never leave it readable by others
                token = fh.read().strip()
            if token:
                return token
            os.unlink(path)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(token + "\n")
        return token
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ChurnError(f"the token file {path} is a symbolic link; remove it (the token is never "
                             "read or written through a link)") from None
        raise ChurnError(f"cannot read or create the token file {path}: {exc.strerror}; fix its "
                         "permissions or set the token in the config") from None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, command: str, tokens: dict[str, str | None]) -> None:
    """ChurnError when ``host`` is not a loopback address and a token of ``tokens`` is unset."""
    if is_loopback(host):
        return
    missing = [k for k, v in tokens.items() if not v]
    if missing:
        raise ChurnError(f"`{command}` refuses to bind {host} (not a loopback address) without "
                         f"{', '.join(missing)}: set {' and '.join(missing)} (config or CHURN_* variable), "
                         "or bind 127.0.0.1")


__all__ = ["bearer", "check_bearer", "check_exposure", "is_loopback", "same_token", "token_file"]
