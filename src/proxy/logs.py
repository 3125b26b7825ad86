"""Structured logs: one JSON object a line, each carrying the request's id; secrets masked.

Prompts are personal data: by default a log line holds a prompt's length and a short hash (enough
to tell repeats apart), never its text. The token never appears: every line goes through
`errors.redact()` as a last line of defence, but nothing logs it in the first place.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import time
from typing import Any

from .errors import redact

__all__ = ["JSONFormatter", "logging_config", "prompt_fields", "request_id_var"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
"""The id of the request being handled (set by `RequestContextMiddleware`)."""

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName", "color_message"}
)


class JSONFormatter(logging.Formatter):
    """Format a record as one JSON line: `ts`, `level`, `logger`, `msg`, `request_id`, then every
    field passed with `extra=`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            line["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in line and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, default=str, ensure_ascii=False))


def prompt_fields(prompt: str, *, include_text: bool = False) -> dict[str, Any]:
    """What a log line says about a prompt: its length and a short hash, and its text only when
    the operator opted in (`SDPROXY_LOG_PROMPTS=true`)."""
    fields: dict[str, Any] = {
        "prompt_len": len(prompt),
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16],
    }
    if include_text:
        fields["prompt"] = prompt
    return fields


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict (also uvicorn's `log_config`): JSON lines on stderr for
    the proxy, uvicorn and httpx; uvicorn's own access log is off (the proxy writes one line per
    request, with its id)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JSONFormatter}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "proxy": {"level": level},
            "sdclient": {"level": level},
            "uvicorn": {"level": "INFO"},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"level": "WARNING", "propagate": False, "handlers": []},
            "httpx": {"level": "WARNING"},
        },
    }
