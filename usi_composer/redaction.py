"""Secrets kept out of everything the recipe prints or writes: configs, command lines, URIs,
one-line errors, tracebacks and log lines.

One helper for every output: :func:`redact` for a config (nested dicts and lists) and
:func:`redact_text` for any text. What counts as a secret:

- the value under a secret-looking key (``*api_key``, ``*secret*``, ``*token*``, ``*password*``, ...);
- in any URI inside a text, its user information (``user:pass@``) and its whole query string
  (pre-signed URLs carry ``X-Amz-Signature``, ``X-Amz-Credential``, SAS tokens there);
- anywhere in a text, the value of a ``?``/``&`` query parameter named like a signature, credential,
  token or key (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, SAS's ``sig``):
  libraries print URLs without their scheme too (urllib3: ``host/path?X-Amz-Signature=...``);
- every occurrence of the value of a secret-looking environment variable (``WANDB_API_KEY``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``HF_TOKEN``, ...).

:func:`install` applies it to what a command prints without asking: Python logging (warnings
included) and uncaught exceptions.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDACTED", "install", "redact", "redact_argv", "redact_text"]

REDACTED = "<redacted>"

# Names of keys (in the config) and environment variables whose values are secrets.
_SECRET_NAME = re.compile(
    r"(api[_-]?key|secret|token|passw(or)?d|passwd|credential|private[_-]?key|access[_-]?key|signature|"
    r"authorization|(^|_)key$)",
    re.IGNORECASE,
)
_MIN_SECRET_LEN = 6  # shorter environment values are too likely to occur by chance in paths and names
# A URI inside any text: scheme://, then up to whitespace, a quote or a bracket that ends it in prose
# (a colon, comma or full stop after it is prose too).
_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}:,.;]")
# A query parameter wherever it stands, also in a URL printed without its scheme (urllib3 prints
# ``host/path?X-Amz-Signature=...``): ``?`` or ``&``, a name, ``=``, the value up to the next one.
_PARAMETER = re.compile(r"(?<=[?&])(?P<name>[A-Za-z0-9_.~-]+)=(?P<value>[^&#\s'\"<>()\[\]{}]*)")
# Parameter names that carry a secret beyond _SECRET_NAME's: Azure SAS's ``sig``, OAuth's ``code``.
_SECRET_PARAMETER = re.compile(r"^(sig|code|auth)$", re.IGNORECASE)


def _secret_env_values(environ: Mapping[str, str] | None) -> list[str]:
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first, so a secret containing another goes whole


def _redact_uri(match: re.Match[str]) -> str:
    uri = match.group(0)
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: not a URI we can take apart, hide it whole
        return f"{uri.split('://', 1)[0]}://{REDACTED}"
    netloc = parts.netloc
    if "@" not in netloc and not parts.query:
        return uri  # nothing secret (and a redacted URI stays as it is)
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_parameter(match: re.Match[str]) -> str:
    name, value = match.group("name"), match.group("value")
    secret = value and value != REDACTED and (_SECRET_NAME.search(name) or _SECRET_PARAMETER.match(name))
    return f"{name}={REDACTED}" if secret else match.group(0)


def _redact_str(text: str, env_secrets: Sequence[str]) -> str:
    for secret in env_secrets:
        text = text.replace(secret, REDACTED)
    if "://" in text:
        text = _URI.sub(_redact_uri, text)
    return _PARAMETER.sub(_redact_parameter, text) if "=" in text else text


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with URI credentials and query strings, secret query parameters and secret environment
    values replaced by ``<redacted>``."""
    return _redact_str(text, _secret_env_values(environ))


def redact(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of ``value`` (nested dicts, lists, strings) fit for printing or logging: values under
    secret-looking keys become ``<redacted>`` (empty ones stay empty), every string as :func:`redact_text`."""
    env_secrets = _secret_env_values(environ)

    def walk(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {
                k: REDACTED if _SECRET_NAME.search(str(k)) and x not in (None, "") else walk(x) for k, x in v.items()
            }
        if isinstance(v, list | tuple):
            return [walk(x) for x in v]
        return _redact_str(v, env_secrets) if isinstance(v, str) else v

    return walk(value)


def redact_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """Command-line arguments with secrets redacted: a ``key=value`` override whose key looks secret
    loses its value, every argument as :func:`redact_text`."""
    env_secrets = _secret_env_values(environ)
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        secret_key = sep and "://" not in key and _SECRET_NAME.search(key.rsplit(".", 1)[-1]) and value
        out.append(f"{key}={REDACTED}" if secret_key else _redact_str(arg, env_secrets))
    return out


class _RedactingFilter(logging.Filter):
    """Rewrites each record's message (its arguments formatted in) with :func:`redact_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:  # the traceback text, formatted here
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = _RedactingFilter()


def install(level: int = logging.WARNING) -> None:
    """For a command-line tool: its log lines, warnings and uncaught exceptions print with secrets
    redacted (idempotent).

    Logging gets one stderr handler at ``level`` (what Python's last-resort handler prints when no
    handler is configured, so nothing new appears), with the redacting filter on every handler the
    root logger has; warnings go through logging; an uncaught exception's traceback is redacted.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
        root.addHandler(handler)
        if root.level == logging.WARNING:  # the default: keep it, or lower it to the level asked for
            root.setLevel(level)
    for handler in root.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    logging.captureWarnings(True)
    if getattr(sys.excepthook, "redacting", False):
        return
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        import traceback

        sys.stderr.write(redact_text("".join(traceback.format_exception(kind, error, tb))))

    excepthook.redacting = True  # type: ignore[attr-defined]
    excepthook.previous = previous  # type: ignore[attr-defined]
    sys.excepthook = excepthook
