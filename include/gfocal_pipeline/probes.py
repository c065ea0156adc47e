"""Network and database probes with short timeouts, for `gfocal doctor`: a SQLAlchemy connect +
SELECT 1, a Redis AUTH/SELECT/PING over a plain socket (no redis package needed), an SMTP EHLO (with
STARTTLS or implicit TLS as an Airflow SMTP connection asks), and URLs shown without their password.
Each raises (GfocalError, OSError, smtplib.SMTPException) with a one-line reason; the caller words the fix.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from gfocal_pipeline.errors import ConfigError, GfocalError

SMTP_SECURITY = ("plain", "starttls", "ssl")


def first_line(exc: BaseException) -> str:
    """An error message on one line: its first line, without a dangling "Output:" lead-in."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for lead in (" Last output:", " Output:"):
        text = text.removesuffix(lead)
    return text.rstrip(" :")


@dataclass(frozen=True)
class SmtpTarget:
    """Where alerts are mailed: host, port, `security` (plain, starttls, ssl) and where it came from."""

    host: str
    port: int
    security: str = "plain"
    source: str = "--smtp-host"


def safe_url(url: str) -> str:
    """`url` with its password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname or ''}" + (f":{parts.port}" if url_port(parts) else "")
    return parts._replace(netloc=netloc).geturl()


def url_port(parts: Any) -> int | None:
    """The port of a `urlsplit` result, None when absent or not a number."""
    try:
        return parts.port
    except ValueError:
        return None


def _connect_args(drivername: str, timeout_s: float) -> dict[str, Any]:
    """The driver's own connect timeout (libpq counts whole seconds, at least 2)."""
    if drivername.startswith("postgresql"):
        return {"connect_timeout": max(2, round(timeout_s))}
    if drivername.startswith("mysql"):
        return {"connect_timeout": max(1, round(timeout_s))}
    if drivername.startswith("sqlite"):
        return {"timeout": timeout_s}
    return {}


def probe_database(url: str, timeout_s: float, table: str | None = None) -> str:
    """Connect, run SELECT 1, and say what answered (a GfocalError naming the URL when it fails)."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    try:
        parsed = make_url(url)
        engine = sa.create_engine(
            parsed, poolclass=NullPool, connect_args=_connect_args(parsed.drivername, timeout_s)
        )
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise GfocalError(f"{safe_url(url)!r} cannot be used: {first_line(exc)}") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
            version = ".".join(str(v) for v in (connection.dialect.server_version_info or ()))
            has_table = table is not None and sa.inspect(connection).has_table(table)
    except SQLAlchemyError as exc:
        reason = first_line(getattr(exc, "orig", None) or exc)
        raise GfocalError(f"cannot connect to {shown}: {reason}") from None
    finally:
        engine.dispose()
    detail = f"{shown} answered SELECT 1 ({parsed.get_backend_name()} {version})".replace(" )", ")")
    if table is not None:
        detail += f"; table {table} " + (
            "present" if has_table else "not created yet (the first run creates it)"
        )
    return detail


def sqlite_missing(url: str) -> tuple[str, bool]:
    """For a SQLite URL whose file does not exist yet: (why it cannot be created, or '', True);
    ('', False) when there is a file to connect to (or a URL `probe_database` will refuse)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except ArgumentError:
        return "", False
    if not database or database == ":memory:" or Path(database).exists():
        return "", False
    folder = Path(database).parent
    if not folder.is_dir():
        return f"neither {database!r} nor its folder {str(folder)!r} exists", True
    if not os.access(folder, os.W_OK):
        return f"{database!r} does not exist and its folder {str(folder)!r} is not writable", True
    return "", True


def _resp(*words: str) -> bytes:
    """A Redis command in RESP."""
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _reply(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
        if len(data) > 65536:
            raise ConnectionError("no RESP reply (is this a Redis server?)")
    return data.decode("utf-8", "replace").strip()


def redis_ping(url: str, timeout_s: float) -> str:
    """AUTH (when the URL has a password), SELECT its database, PING; the server's replies."""
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", url_port(parts) or 6379
    commands = []
    if parts.password:
        user = unquote(parts.username or "")
        commands.append(
            ("AUTH", user, unquote(parts.password)) if user else ("AUTH", unquote(parts.password))
        )
    database = parts.path.strip("/")
    if database:
        commands.append(("SELECT", database))
    commands.append(("PING",))
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        sock = raw
        if parts.scheme == "rediss":
            sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
        replies = []
        for command in commands:
            sock.sendall(_resp(*command))
            reply = _reply(sock)
            if reply.startswith("-"):
                raise ConnectionError(f"{command[0]} answered {reply[1:]}")
            replies.append(reply)
    return replies[-1]


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def smtp_target_from_connection(value: str, source: str) -> SmtpTarget:
    """An Airflow SMTP connection (URI or JSON, as in AIRFLOW_CONN_SMTP_DEFAULT) as an SmtpTarget."""
    try:
        if value.strip().startswith("{"):
            data = json.loads(value)
            host, port, extra = data.get("host"), data.get("port"), data.get("extra") or {}
            extra = json.loads(extra) if isinstance(extra, str) else extra
        else:
            parts = urlsplit(value.strip())
            host, port = parts.hostname, parts.port
            extra = {key: values[-1] for key, values in parse_qs(parts.query).items()}
            extra.update(json.loads(extra.pop("__extra__", "{}")))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"{source} is not an Airflow connection URI or JSON ({exc}); e.g. "
            "smtp://mail.example.com:25?disable_tls=true&disable_ssl=true"
        ) from None
    return smtp_target(host, port, extra, source)


def smtp_target(host: object, port: object, extra: Mapping[str, Any], source: str) -> SmtpTarget:
    """An SMTP connection's host, port and extras as the SMTP provider uses them: implicit TLS unless
    `disable_ssl`, else STARTTLS unless `disable_tls`; the port defaults to 465 (TLS) or 25."""
    if not host:
        raise ConfigError(f"{source} names no host; e.g. smtp://mail.example.com:25?disable_ssl=true")
    use_ssl = not _truthy(extra.get("disable_ssl", False))
    security = "ssl" if use_ssl else ("plain" if _truthy(extra.get("disable_tls", False)) else "starttls")
    try:
        number = int(port or (465 if use_ssl else 25))
    except (TypeError, ValueError):
        raise ConfigError(f"{source} port {port!r} is not a number") from None
    return SmtpTarget(str(host), number, security, source)


def smtp_hello(target: SmtpTarget, timeout_s: float) -> str:
    """Connect, EHLO (and STARTTLS when asked), QUIT; the server's EHLO greeting."""
    context = ssl.create_default_context()
    if target.security == "ssl":
        server: smtplib.SMTP = smtplib.SMTP_SSL(target.host, target.port, timeout=timeout_s, context=context)
    else:
        server = smtplib.SMTP(target.host, target.port, timeout=timeout_s)
    try:
        code, message = server.ehlo()
        if code != 250:
            raise smtplib.SMTPException(f"EHLO answered {code} {message.decode(errors='replace')}")
        if target.security == "starttls":
            if not server.has_extn("starttls"):
                raise smtplib.SMTPException("the server does not offer STARTTLS (set disable_tls=true?)")
            server.starttls(context=context)
            code, message = server.ehlo()
        server.quit()
    finally:
        server.close()
    return f"{code} {message.decode(errors='replace').splitlines()[0]}"
