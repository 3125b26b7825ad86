"""Tokens kept out of the log lines that the HTTP libraries under the client write.

httpcore logs every answer's headers at DEBUG level; a server that echoes the token (in an
``x-request-id``, say) would put it in those lines, which the client never sees. While a client is
open its token is registered here, and a filter on httpx's and httpcore's loggers replaces every
registered token in their records by ``***``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

__all__ = ["forget_token", "mask_token"]

# httpcore logs under its submodules' names: a filter applies to the logger it is attached to only.
_LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy")


class _TokenMask(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.tokens: Counter[str] = Counter()
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        tokens = list(self.tokens)
        if tokens:
            message = record.getMessage()
            masked = message
            for token in tokens:
                masked = masked.replace(token, "***")
            if masked != message:
                record.msg, record.args = masked, None
        return True


_MASK = _TokenMask()
_installed = False


def mask_token(token: str) -> None:
    """Mask ``token`` in httpx's and httpcore's log records until :func:`forget_token`."""
    global _installed
    with _MASK.lock:
        if not _installed:
            for name in _LOGGERS:
                logging.getLogger(name).addFilter(_MASK)
            _installed = True
        _MASK.tokens[token] += 1


def forget_token(token: str) -> None:
    """Undo one :func:`mask_token` of ``token``."""
    with _MASK.lock:
        _MASK.tokens[token] -= 1
        if _MASK.tokens[token] <= 0:
            del _MASK.tokens[token]
